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

import numpy as np
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
    pool: Tensor | None = None  # (N,E') bool experts each token could use (its pool); None = all E'
    # Filled by the MoE layer only when the forward is asked to capture (``capture=True``), detached:
    # expert_norms (N,k') fp32 ||E_i(h_t)|| of every chosen routed expert (``experts`` order); moe_input (B,S,d)
    # the MoE layer's input h (after the block's ffn_norm); moe_output (B,S,d) its output y (routed + shared
    # experts, before the residual add).
    expert_norms: Tensor | None = None
    moe_input: Tensor | None = None
    moe_output: Tensor | None = None


def segment_ids(doc_ids: Tensor) -> Tensor:
    """Flat segment id b*S + g, g = index of the token's contiguous segment in row b. (B,S) -> (N,) long."""
    b, s = doc_ids.shape
    row = torch.arange(b, device=doc_ids.device).unsqueeze(1) * s  # (B,1)
    return (row + segment_index(doc_ids)).reshape(-1)


def _compact(seg: Tensor) -> tuple[Tensor, int]:
    """Flat segment ids (N,) -> compact ids 0..G-1 in the same order (N,) and G. On CPU the count G is read for
    free (no device); elsewhere the static bound N is kept (no host synchronisation)."""
    n = seg.shape[0]
    present = torch.zeros(n, dtype=torch.long, device=seg.device).index_fill_(0, seg, 1)  # (N,) flat id used
    rank = present.cumsum(0) - 1  # (N,) compact id of every used flat id
    return rank.index_select(0, seg), int(rank[-1]) + 1 if seg.device.type == "cpu" else n


def document_pools(probs: Tensor, seg: Tensor, pool_sizes: Tensor, max_pool: int) -> Tensor:
    """Pool membership (N,E') bool: expert e is in the pool of token t's segment (top-P of its summed probs).

    probs: (N,E') unmasked softmax (no grad needed); seg: (N,) flat segment ids in [0,N); pool_sizes: (N,)
    long pool size per segment id; max_pool: host-side upper bound of pool_sizes (clipped to E').
    """
    e = probs.shape[1]
    seg_c, g = _compact(seg)  # only real segments are ranked
    # same accumulation order per segment as before compaction: bitwise identical preferences
    pref = torch.zeros(g, e, dtype=probs.dtype, device=probs.device).index_add_(0, seg_c, probs)  # (G,E')
    flat_of = torch.zeros(g, dtype=torch.long, device=probs.device).scatter_(0, seg_c, seg)  # (G,) flat id
    members = _top_members(pref, pool_sizes.index_select(0, flat_of), min(max_pool, e))  # (G,E')
    return members.index_select(0, seg_c)  # (N,E')


def _top_members(pref: Tensor, sizes: Tensor, max_pool: int) -> Tensor:
    """(R,E') preferences, (R,) pool sizes <= max_pool -> (R,E') bool: each row's top-size experts."""
    if pref.device.type == "cpu":
        return _top_members_cpu(pref, sizes)
    r, e = pref.shape
    top = pref.argsort(dim=-1, descending=True)[:, :max_pool]  # (R,Pmax) best first, ties in torch's order
    keep = torch.arange(max_pool, device=pref.device) < sizes.unsqueeze(1)  # (R,Pmax)
    return torch.zeros(r, e, dtype=torch.bool, device=pref.device).scatter_(1, top, keep)


def _top_members_cpu(pref: Tensor, sizes: Tensor) -> Tensor:
    """CPU: each row's top-size experts by value threshold.

    Sorting values with numpy (SIMD sort) costs a fifth of torch's CPU argsort over many short rows (the running
    pools rank every token). A row whose P-th and (P+1)-th largest preferences tie has no unique top-P: those
    rows (rare outside constructed inputs) take torch's argsort, so every pool is the one the argsort ranking
    (the CUDA path) chooses.
    """
    e = pref.shape[1]
    values = torch.from_numpy(np.sort(pref.detach().numpy(), axis=-1))  # (R,E') ascending
    p = sizes.clamp(min=1, max=e).unsqueeze(1)  # (R,1)
    full = p >= e  # (R,1) no restriction
    kth = values.gather(1, e - p).masked_fill_(full, float("-inf"))  # (R,1) the P-th largest preference
    next_ = values.gather(1, (e - p - 1).clamp(min=0))  # (R,1) the (P+1)-th largest
    member = pref >= kth  # (R,E') exactly P experts unless the boundary ties
    tie = ((next_ == kth) & ~full).squeeze(1)  # (R,)
    if tie.any():  # host read: free on the CPU
        rows = tie.nonzero().squeeze(1)
        top = pref.index_select(0, rows).argsort(dim=-1, descending=True)  # (T,E')
        keep = torch.arange(e) < p.index_select(0, rows)  # (T,E')
        member[rows] = torch.zeros(len(rows), e, dtype=torch.bool).scatter_(1, top, keep)
    return member


def running_preference(probs: Tensor, doc_ids: Tensor, workspace: Tensor | None = None) -> Tensor:
    """Token t's summed q over its segment's tokens 0..t, fp64. probs: (N,E'); doc_ids: (B,S) -> (N,E').

    fp64 running sums rank like the fp32 per-document sum; for a segment starting at a row's first token the
    value is exactly the sequential sum q_0 + ... + q_t (what incremental decoding accumulates), elsewhere the
    row's running sum minus its value before the segment's first token. ``workspace``: (2,N,E') fp64 memory to
    compute in, in place (the result is a view of it).
    """
    b, s = doc_ids.shape
    n, e = probs.shape
    if workspace is None:
        workspace = probs.new_empty((2, n, e), dtype=torch.float64)
    cum = workspace[0].copy_(probs).view(b, s, e).cumsum_(1).view(n, e)  # (N,E') running sums of each row
    first = torch.arange(s, device=probs.device) - segment_positions(doc_ids)  # (B,S) segment start
    start = (torch.arange(b, device=probs.device).unsqueeze(1) * s + first).reshape(n)  # (N,) flat index
    seg_c, g = _compact(start)  # the start token identifies the segment
    start_of = torch.zeros(g, dtype=torch.long, device=probs.device).scatter_(0, seg_c, start)  # (G,)
    q_start = probs.index_select(0, start_of).double()  # (G,E')
    before = cum.index_select(0, start_of) - q_start  # (G,E') sum before each segment's start
    return cum.sub_(torch.index_select(before, 0, seg_c, out=workspace[1]))


def running_pools(pref: Tensor, seg: Tensor, pool_sizes: Tensor, max_pool: int) -> Tensor:
    """Causal pool membership (N,E') bool: token t's pool is the top-P of its running preference ``pref``
    (N,E'). seg, pool_sizes, max_pool: as in ``document_pools``. The last token of a segment gets the segment's
    document pool (up to ties)."""
    return _top_members(pref, pool_sizes.index_select(0, seg), min(max_pool, pref.shape[-1]))


class Router(nn.Module):
    """Linear router over the E' routable experts, standard or EMO document-pool.

    Pool sizes are drawn from a per-router CPU ``torch.Generator`` seeded by ``(cfg.seed, layer_idx)``. The
    generator is not checkpointed: a training loop that needs exact resume reseeds it from what identifies the
    draw (``reseed(derive_seed(seed, rank, step))``, as ``EMOLitModule`` does every optimizer step).
    ``pool_eval`` (``None`` = unrestricted) is the pool size in eval mode and ``pool_scope`` whether a pool is
    chosen from the whole document or from each token's prefix; both start from the config and are changed only
    by ``EMOTransformer.routing`` (the inference routing modes of ``model/routing.py``).
    """

    def __init__(self, cfg: RouterConfig, d_model: int, layer_idx: int = 0) -> None:
        super().__init__()
        self.kind = cfg.kind
        self.num_routed, self.routed_k = cfg.num_routed, cfg.routed_k
        self.pool_min, self.pool_max, pool_eval = cfg.resolved_pools()
        self.normalize_weights = cfg.normalize_weights
        self.pool_eval: int | None = pool_eval
        self.pool_scope: PoolScope = cfg.pool_scope
        self.layer_idx = layer_idx
        self.weight = nn.Parameter(torch.empty(self.num_routed, d_model))  # (E',d)
        self.bias_gamma = cfg.bias_gamma
        if cfg.uses_bias:  # a buffer: checkpointed (resume is exact), not trained by the optimizer
            self.register_buffer("expert_bias", torch.zeros(self.num_routed))  # (E',)
        else:
            self.expert_bias: Tensor | None = None
        self.generator = torch.Generator(device="cpu")
        self.reseed(cfg.seed)
        self._running_workspace: Tensor | None = None  # see _workspace

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

    def _workspace(self, n: int, device: torch.device) -> Tensor | None:
        """(2,N,E') fp64 memory for the running preference, kept across forwards on the CPU (the C allocator
        hands large blocks back to the system: faulting a fresh 8 MB in per layer and forward cost as much as the
        running sum itself). CUDA's caching allocator needs none."""
        if device.type != "cpu":
            return None
        shape = (2, n, self.num_routed)
        if self._running_workspace is None or self._running_workspace.shape != shape:
            self._running_workspace = torch.empty(shape, dtype=torch.float64)
        return self._running_workspace

    def _pool_sizes(self, n: int, device: torch.device) -> tuple[Tensor | None, int]:
        """Pool size per flat segment id (n,) and its host-side maximum; None = no restriction anywhere."""
        e = self.num_routed
        if self.kind != "emo":
            return None, e
        if not self.training:
            if self.pool_eval is None or self.pool_eval >= e:
                return None, e
            return torch.full((n,), self.pool_eval, dtype=torch.long, device=device), self.pool_eval
        p = torch.randint(self.pool_min, self.pool_max + 1, (n,), generator=self.generator)  # (n,)
        if device.type == "cuda":
            p = p.pin_memory()  # a truly asynchronous host-to-device copy: no stream synchronisation
        return p.to(device, non_blocking=True), self.pool_max

    def forward(
        self, h: Tensor, doc_ids: Tensor, cache: LayerCache | None = None, allowed: Tensor | None = None
    ) -> RouterOutput:
        """h: (B,S,d) normalised hidden; doc_ids: (B,S) segment ids. ``cache``: incremental decoding (running
        pools keep each row's document preference in ``cache.pref``; see ``model/decoding.py``). ``allowed``:
        (B|1,S|1,E') bool, the experts each token may use at all (a subset, a causal pool); None = all."""
        b, s, d = h.shape
        n, e = b * s, self.num_routed
        with torch.autocast(device_type=h.device.type, enabled=False):  # router logits stay fp32 under AMP
            logits = F.linear(h.reshape(n, d).float(), self.weight.float())  # (N,E') fp32, unmasked
        z = logits
        bias = self.expert_bias  # (E',) selection only, or None
        choose = logits.detach() if bias is None else logits.detach() + bias  # (N,E') scores that choose
        allow = None
        if allowed is not None:  # -inf outside: no pool, choice or weight ever reaches a disallowed expert
            allow = allowed.expand(b, s, e).reshape(n, e)  # (N,E') bool
            outside = torch.where(allow, 0.0, float("-inf"))  # (N,E')
            z, choose = z + outside, choose + outside
        seg = segment_ids(doc_ids)  # (N,)
        sizes, pmax = self._pool_sizes(n, h.device)
        pool = None  # (N,E') bool: each token's pool
        if sizes is not None and self.pool_scope == "running":
            q = choose.softmax(-1)  # (N,E')
            if cache is not None and cache.pref is not None:  # decode step: one token per row
                pref = cache.pref + q.double()  # (B,E') the same addition as the prefix cumsum
            else:
                pref = running_preference(q, doc_ids, self._workspace(n, h.device))  # (N,E')
            if cache is not None:  # keep each row's document preference (its first segment's last token)
                first_seg = (doc_ids == doc_ids[:, :1]).long().cumprod(1)  # (B,S) 1 on the first segment
                last = first_seg.sum(1) - 1  # (B,) its last token (0 in a decode step)
                cache.pref = pref.view(b, s, e)[torch.arange(b, device=h.device), last]  # (B,E')
            pool = running_pools(pref, seg, sizes, pmax)
        elif sizes is not None and cache is not None:
            raise ValueError(
                "document pools look ahead: decode with running pools (pool_scope) or full routing"
            )
        elif sizes is not None:
            pool = document_pools(choose.softmax(-1), seg, sizes, pmax)  # (N,E')
        if pool is not None:  # additive -inf outside the pool: its backward is free, unlike masked_fill's
            z = z + torch.where(pool, 0.0, float("-inf"))  # (N,E')
        s_ = z.softmax(-1)  # (N,E')
        w, idx = s_.topk(self.routed_k, dim=-1)  # (N,k')
        # logsumexp(z_m) = z_e - log s_e for any in-pool e; the top-1 expert is well conditioned (s >= 1/E').
        # Same value and gradient (= s) as torch.logsumexp, without exp() of -inf (slow on CPU).
        lse = logits.gather(1, idx[:, :1]).squeeze(1) - w[:, 0].log()  # (N,)
        if bias is not None:  # choose on z + b inside the pool; weigh with s (by descending weight)
            chosen = (z.detach() + bias).topk(self.routed_k, dim=-1).indices  # (N,k')
            w, order = s_.gather(1, chosen).sort(dim=-1, descending=True)
            idx = chosen.gather(1, order)
        flat = idx.reshape(-1)
        counts = torch.zeros(e, dtype=torch.long, device=h.device).index_add_(0, flat, torch.ones_like(flat))
        if allow is not None:
            pool = allow if pool is None else pool & allow
        present = torch.zeros(n, dtype=torch.bool, device=h.device).index_fill_(0, seg, True)  # (N,)
        if allow is not None:  # the pool a segment really had: its tokens' largest
            eff = torch.zeros(n, dtype=torch.long, device=h.device).scatter_reduce_(
                0, seg, pool.sum(-1), "amax", include_self=False
            )  # (N,) per flat segment id
        elif sizes is None:
            eff = torch.full((n,), e, dtype=torch.long, device=h.device)
        else:
            eff = sizes.clamp(max=e)
        pool_sizes = torch.where(present, eff, torch.full_like(eff, -1)).view(b, s)
        if self.normalize_weights:
            w = w / w.sum(-1, keepdim=True)  # (N,k') the top-1 weight is >= 1/E': no division by zero
        return RouterOutput(idx, w, s_, lse.square().mean(), counts, pool_sizes, logits, pool)
