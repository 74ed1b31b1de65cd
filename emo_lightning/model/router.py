"""Routers: standard top-k and the EMO document-pool router (vectorised, no host synchronisation).

Expert numbering: routable experts are ``0 .. E'-1`` (the router's rows, the index of ``counts``); the shared
experts are ``E' .. E-1``. They have no router row and are applied to every token with gate weight 1.0.

EMO forward (per layer), with N = B*S tokens and flat segment id ``seg = b*S + doc_id`` (at most N segments,
so the number of documents never needs to be known on the host):

    z    = h @ W^T (fp32)                       (N,E')
    q    = softmax(z).detach()                  (N,E')  unmasked, no gradient through the pool choice
    c    = compact id of seg in 0..G-1          (N,)    only the G segments present are ranked (G read on CPU,
                                                        bound N elsewhere: no host synchronisation)
    pref = zeros(G,E').index_add_(0, c, q)      (G,E')  summed preference per segment
    P    ~ UniformInt[pool_min, pool_max]       (N,)    per flat segment id, seeded generator; pool_eval in eval
    bias = 0 on the top-P of each pref row, -inf elsewhere, gathered back to tokens by c   (N,E')
    s    = softmax(z + bias)                    (N,E')  0 outside the pool, sums to 1 inside
    w, idx = topk(s, k')                        (N,k')  not renormalised (unless normalize_weights: w / sum w)

With ``pool_scope="running"`` the preference of token t is the sum of q over its document's tokens up to and
including t (a segmented cumulative sum, (N,E'), ``running_preference``), so every token has its own causal pool.

Auxiliary-loss-free balancing (``balance`` bias or both): a per-expert bias b (E',) enters both *choices* — the
preference that picks a pool is summed from softmax(z + b), and the top-k' is taken on z + b + pool mask — but
never the gate weights, which stay the pool softmax s of the unbiased z. ``update_bias`` moves b once per
optimizer step from the step's global expert counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emo_lightning.model.attention import segment_index, segment_positions
from emo_lightning.model.config import PoolScope, RouterConfig, derive_seed

if TYPE_CHECKING:
    from emo_lightning.model.decoding import LayerCache

_POOL_STREAM = 0x5EED  # seed-derivation tag for pool-size generators


@dataclass
class RouterOutput:
    """Routing of one layer for one forward (N = B*S tokens, flattened)."""

    experts: Tensor  # (N,k') long, routed expert ids in [0,E'), by descending weight
    weights: Tensor  # (N,k') fp32, gate weights (grad); sum to 1 per token only with normalize_weights
    scores: Tensor  # (N,E') fp32, masked softmax s (grad)
    z_loss: Tensor  # () mean over tokens of logsumexp(z_m)^2 (grad)
    counts: Tensor  # (E',) long, token-slot assignments per routable expert (no grad)
    pool_sizes: Tensor  # (B,S) long, effective pool size of segment g at [b,g], -1 for absent segments
    logits: Tensor  # (N,E') fp32 unmasked router logits z (grad)


def segment_ids(doc_ids: Tensor) -> Tensor:
    """Flat segment id b*S + g, g = index of the token's contiguous segment in row b. (B,S) -> (N,) long."""
    b, s = doc_ids.shape
    row = torch.arange(b, device=doc_ids.device).unsqueeze(1) * s  # (B,1)
    return (row + segment_index(doc_ids)).reshape(-1)


def pool_bias(probs: Tensor, seg: Tensor, pool_sizes: Tensor, max_pool: int) -> Tensor:
    """Additive pool mask: 0 where expert e is in the pool of token t's segment, -inf outside.

    probs: (N,E') unmasked softmax (no grad needed); seg: (N,) flat segment ids in [0,N); pool_sizes: (N,)
    long pool size per segment id; max_pool: host-side upper bound of pool_sizes (clipped to E').
    Returns (N,E') in probs' dtype. (Added to the logits: its backward is free, unlike masked_fill's.)
    """
    n, e = probs.shape
    dev = probs.device
    max_pool = min(max_pool, e)
    # Compact the flat segment ids to 0..G-1 (same order) so that only real segments are ranked. On CPU the
    # count G is read for free (no device); elsewhere the static bound N is kept (no host synchronisation).
    present = torch.zeros(n, dtype=torch.long, device=dev).index_fill_(0, seg, 1)  # (N,) flat id used
    rank = present.cumsum(0) - 1  # (N,) compact id of every used flat id
    seg_c = rank.index_select(0, seg)  # (N,) compact segment of every token
    g = int(rank[-1]) + 1 if dev.type == "cpu" else n
    # same accumulation order per segment as before compaction: bitwise identical preferences
    pref = torch.zeros(g, e, dtype=probs.dtype, device=dev).index_add_(0, seg_c, probs)  # (G,E')
    flat_of = torch.zeros(g, dtype=torch.long, device=dev).scatter_(0, seg_c, seg)  # (G,) flat id of row
    seg_bias = _top_pool_bias(pref, pool_sizes.index_select(0, flat_of), max_pool, probs.dtype)  # (G,E')
    return seg_bias.index_select(0, seg_c)  # (N,E')


def _top_pool_bias(pref: Tensor, sizes: Tensor, max_pool: int, dtype: torch.dtype) -> Tensor:
    """(R,E') preferences, (R,) pool sizes -> (R,E') bias: 0 on each row's top-size experts, -inf elsewhere."""
    r, e = pref.shape
    dev = pref.device
    # full ranking: argsort is faster than topk on CPU for these short rows, and exact under ties
    top = pref.argsort(dim=-1, descending=True)[:, :max_pool]  # (R,Pmax) best first
    keep = torch.arange(max_pool, device=dev) < sizes.unsqueeze(1)  # (R,Pmax)
    neg_inf = torch.full((), float("-inf"), dtype=dtype, device=dev)
    src = torch.where(keep, torch.zeros((), dtype=dtype, device=dev), neg_inf)  # (R,Pmax)
    return torch.full((r, e), float("-inf"), dtype=dtype, device=dev).scatter_(1, top, src)


def running_preference(probs: Tensor, doc_ids: Tensor) -> Tensor:
    """Token t's summed q over its segment's tokens 0..t, fp64. probs: (N,E'); doc_ids: (B,S) -> (B,S,E').

    fp64 running sums rank like the fp32 per-document sum; for a segment starting at a row's first token the
    value is exactly the sequential sum q_0 + ... + q_t (what incremental decoding accumulates).
    """
    b, s = doc_ids.shape
    q = probs.view(b, s, -1).double()
    cum = q.cumsum(1)  # (B,S,E')
    first = torch.arange(s, device=probs.device) - segment_positions(doc_ids)  # (B,S) segment start
    before = (cum - q).gather(1, first.unsqueeze(-1).expand_as(q))  # (B,S,E') sum before the start
    return cum - before


def running_pool_bias(
    pref: Tensor, seg: Tensor, pool_sizes: Tensor, max_pool: int, dtype: torch.dtype
) -> Tensor:
    """Causal pool mask: token t's pool is the top-P of its running preference ``pref`` (N,E').

    seg, pool_sizes, max_pool: as in ``pool_bias``. The last token of a segment gets the segment's document
    pool (up to ties). Returns (N,E') additive mask in ``dtype``, 0 inside and -inf outside each token's pool.
    """
    max_pool = min(max_pool, pref.shape[-1])
    return _top_pool_bias(pref, pool_sizes.index_select(0, seg), max_pool, dtype)


def pool_mask(probs: Tensor, seg: Tensor, pool_sizes: Tensor, max_pool: int) -> Tensor:
    """Token-level pool membership (N,E') bool; same arguments as ``pool_bias``."""
    return pool_bias(probs, seg, pool_sizes, max_pool) == 0


class Router(nn.Module):
    """Linear router over the E' routable experts, standard or EMO document-pool.

    Pool sizes are drawn from a per-router CPU ``torch.Generator`` seeded by ``(cfg.seed, layer_idx)``. The
    generator is not checkpointed: a training loop that needs exact resume reseeds it from what identifies the
    draw (``reseed(derive_seed(seed, rank, step))``, as ``EMOLitModule`` does every optimizer step). ``eval_pool`` (default
    ``cfg.pool_eval``, ``None`` = unrestricted) sets the pool in eval mode; ``pool_scope`` (default
    ``cfg.pool_scope``) whether a pool is chosen from the whole document or from each token's prefix.
    """

    def __init__(self, cfg: RouterConfig, d_model: int, layer_idx: int = 0) -> None:
        super().__init__()
        self.kind = cfg.kind
        self.num_routed, self.k = cfg.num_routed, cfg.routed_k
        self.pool_min, self.pool_max, pool_eval = cfg.resolved_pools()
        self.normalize_weights = cfg.normalize_weights
        self.eval_pool: int | None = pool_eval
        self.pool_scope: PoolScope = cfg.pool_scope
        # (B,S,E') bool pool chosen outside the router (e.g. from a document's first tokens, see
        # emo_lightning.experts.causal_pool); when set it replaces the document pool, in any mode and kind.
        self.forced_pool: Tensor | None = None
        self.layer_idx = layer_idx
        self.weight = nn.Parameter(torch.empty(self.num_routed, d_model))  # (E',d)
        self.bias_gamma = cfg.bias_gamma
        if cfg.uses_bias:  # a buffer: checkpointed (resume is exact), not trained by the optimizer
            self.register_buffer("expert_bias", torch.zeros(self.num_routed))  # (E',)
        else:
            self.expert_bias: Tensor | None = None
        self.generator = torch.Generator(device="cpu")
        self.reseed(cfg.seed)

    @torch.no_grad()
    def update_bias(self, counts: Tensor) -> None:
        """One auxiliary-loss-free step: b += gamma * sign(mean - counts), re-centred to zero mean.

        counts: (E',) token-slot assignments of the whole optimizer step (every micro-batch and data-parallel
        rank, so every rank computes the same bias)."""
        if self.expert_bias is None:
            return
        counts = counts.to(self.expert_bias.device, torch.float64)
        self.expert_bias += self.bias_gamma * torch.sign(counts.mean() - counts).to(self.expert_bias.dtype)
        self.expert_bias -= self.expert_bias.mean()

    def reseed(self, seed: int) -> None:
        """Reset the pool-size generator to ``(seed, layer_idx)``."""
        self.generator.manual_seed(derive_seed(seed, self.layer_idx, _POOL_STREAM))

    def _pool_sizes(self, n: int, device: torch.device) -> tuple[Tensor | None, int]:
        """Pool size per flat segment id (n,) and its host-side maximum; None = no restriction anywhere."""
        e = self.num_routed
        if self.kind != "emo":
            return None, e
        if not self.training:
            if self.eval_pool is None or self.eval_pool >= e:
                return None, e
            return torch.full((n,), self.eval_pool, dtype=torch.long, device=device), self.eval_pool
        p = torch.randint(self.pool_min, self.pool_max + 1, (n,), generator=self.generator)  # (n,)
        if device.type == "cuda":
            p = p.pin_memory()  # a truly asynchronous host-to-device copy: no stream synchronisation
        return p.to(device, non_blocking=True), self.pool_max

    def forward(self, h: Tensor, doc_ids: Tensor, cache: LayerCache | None = None) -> RouterOutput:
        """h: (B,S,d) normalised hidden; doc_ids: (B,S) segment ids. ``cache``: incremental decoding (running
        pools keep each row's document preference in ``cache.pref``; see ``model/decoding.py``)."""
        b, s, d = h.shape
        n, e = b * s, self.num_routed
        with torch.autocast(device_type=h.device.type, enabled=False):  # router logits stay fp32 under AMP
            logits = F.linear(h.reshape(n, d).float(), self.weight.float())  # (N,E') fp32, unmasked
        z = logits
        bias = self.expert_bias  # (E',) selection only, or None
        choose = logits.detach() if bias is None else logits.detach() + bias  # (N,E') scores that choose
        seg = segment_ids(doc_ids)  # (N,)
        sizes, pmax = self._pool_sizes(n, h.device)
        if self.forced_pool is not None:
            forced = self.forced_pool.reshape(n, e)
            z = z.masked_fill(~forced, float("-inf"))
            sizes = torch.zeros(n, dtype=torch.long, device=h.device).scatter_reduce_(
                0, seg, forced.sum(-1), "amax", include_self=False
            )  # (N,) pool size per flat segment id
        elif sizes is not None and self.pool_scope == "running":  # (N,E') -inf outside each token's own pool
            q = choose.softmax(-1)  # (N,E')
            if cache is not None and cache.pref is not None:  # decode step: one token per row
                pref = cache.pref + q.double()  # (B,E') the same addition as the prefix cumsum
            else:
                pref = running_preference(q, doc_ids).reshape(n, e)  # (N,E')
            if cache is not None:  # keep each row's document preference (its first segment's last token)
                first_seg = (doc_ids == doc_ids[:, :1]).long().cumprod(1)  # (B,S) 1 on the first segment
                last = first_seg.sum(1) - 1  # (B,) its last token (0 in a decode step)
                cache.pref = pref.view(b, s, e)[torch.arange(b, device=h.device), last]  # (B,E')
            z = z + running_pool_bias(pref, seg, sizes, pmax, z.dtype)
        elif sizes is not None and cache is not None:
            raise ValueError(
                "document pools look ahead: decode with running pools (pool_scope) or full routing"
            )
        elif sizes is not None:
            z = z + pool_bias(choose.softmax(-1), seg, sizes, pmax)  # (N,E') -inf outside the pool
        s_ = z.softmax(-1)  # (N,E')
        w, idx = s_.topk(self.k, dim=-1)  # (N,k')
        # logsumexp(z_m) = z_e - log s_e for any in-pool e; the top-1 expert is well conditioned (s >= 1/E').
        # Same value and gradient (= s) as torch.logsumexp, without exp() of -inf (slow on CPU).
        lse = logits.gather(1, idx[:, :1]).squeeze(1) - w[:, 0].log()  # (N,)
        if bias is not None:  # choose on z + b inside the pool; weigh with s (by descending weight)
            chosen = (z.detach() + bias).topk(self.k, dim=-1).indices  # (N,k')
            w, order = s_.gather(1, chosen).sort(dim=-1, descending=True)
            idx = chosen.gather(1, order)
        flat = idx.reshape(-1)
        counts = torch.zeros(e, dtype=torch.long, device=h.device).index_add_(0, flat, torch.ones_like(flat))
        present = torch.zeros(n, dtype=torch.bool, device=h.device).index_fill_(0, seg, True)  # (N,)
        eff = torch.full((n,), e, dtype=torch.long, device=h.device) if sizes is None else sizes.clamp(max=e)
        pool_sizes = torch.where(present, eff, torch.full_like(eff, -1)).view(b, s)
        if self.normalize_weights:
            w = w / w.sum(-1, keepdim=True)  # (N,k') the top-1 weight is >= 1/E': no division by zero
        return RouterOutput(idx, w, s_, lse.square().mean(), counts, pool_sizes, logits)
