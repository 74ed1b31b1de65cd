"""Decoder-only MoE transformer (pre-norm RMSNorm, RoPE, SwiGLU experts, untied LM head)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from emo_lightning.model.attention import Attention, AttentionMask, RMSNorm, Rotary
from emo_lightning.model.config import ModelConfig
from emo_lightning.model.decoding import DecodeCache, LayerCache
from emo_lightning.model.losses import GlobalLoadBalance, load_balance, z_loss
from emo_lightning.model.moe import ExpertImpl, MoELayer, RoutedExperts, SharedExperts
from emo_lightning.model.router import Router, RouterOutput, segment_ids
from emo_lightning.model.routing import Routing


@dataclass
class LayerRouting:
    """Routing statistics of one MoE layer for one forward.

    Expert ids: routable 0..E'-1, shared E'..E-1. ``pool_sizes`` is (B, G) with G = S (an upper bound on the
    number of segments per row, no host sync): column g is the row's g-th contiguous segment (``doc_id ==
    g`` with the packer's ids); -1 for absent segments; the standard router (and unrestricted documents)
    report E'.
    """

    counts: Tensor  # (E',) long, local token-slot assignments of this forward (no grad)
    lb: Tensor  # () unweighted load-balance value of this layer (detached)
    z: Tensor  # () unweighted router z-loss of this layer (detached)
    pool_sizes: Tensor  # (B,G) long
    experts: Tensor | None = None  # (B,S,k) long, routed (by descending weight) then shared, if return_routes
    weights: Tensor | None = None  # (B,S,k) fp32, shared experts 1.0, if return_routes (detached)
    # (B,S,E') unmasked softmax of the raw logits (no bias) over routable experts, if return_routes and route_probs
    probs: Tensor | None = None
    # (B,G,E') bool pool the router used for segment g (all False: absent; all True: unrestricted; running
    # pools: the union of its tokens' pools), if return_routes
    pool_mask: Tensor | None = None
    # Only with ``capture_moe`` (detached; Easy-EP scores): the MoE layer's input h_t (after ffn_norm), its output
    # y_t (routed + shared experts, before the residual add), and ||E_i(h_t)|| of every chosen routed expert
    # (the first k' columns of ``experts``, same order).
    moe_input: Tensor | None = None  # (B,S,d)
    moe_output: Tensor | None = None  # (B,S,d)
    expert_norms: Tensor | None = None  # (B,S,k') fp32


@dataclass
class ModelOutput:
    logits: Tensor  # (B,S,V)
    lb_loss: Tensor  # () sum over layers of (lb_weight / L) * lb_l (grad)
    z_loss: Tensor  # () sum over layers of (z_weight / L) * z_l (grad)
    aux_loss: Tensor  # () lb_loss + z_loss + lm_z_loss
    layers: list[LayerRouting] = field(default_factory=list)
    lm_z_loss: Tensor | None = None  # () lm_head_z_weight * z_loss(logits) (0 when the weight is 0)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, expert_impl: ExpertImpl = "auto") -> None:
        super().__init__()
        a = cfg.arch
        self.attn_norm = RMSNorm(a.d_model, a.norm_eps)
        self.attn = Attention(a)
        self.ffn_norm = RMSNorm(a.d_model, a.norm_eps)
        self.moe = MoELayer(a, cfg.router, layer_idx, impl=expert_impl)

    def forward(
        self,
        x: Tensor,
        mask: AttentionMask,
        doc_ids: Tensor,
        cache: LayerCache | None = None,
        allowed: Tensor | None = None,
        capture: bool = False,
    ) -> tuple[Tensor, RouterOutput]:
        x = x + self.attn(self.attn_norm(x), mask, cache)
        y, r = self.moe(self.ffn_norm(x), doc_ids, cache, allowed, capture)
        return x + y, r


_INIT_CHUNK = 1 << 24  # elements per trunc_normal_ call


@torch.no_grad()
def _trunc_normal_chunked(weight: Tensor, std: float) -> None:
    """``trunc_normal_`` (+-3 std, global RNG) over consecutive chunks of the flattened weight: torch's rejection
    sampler allocates several weight-sized temporaries, which for the 100k-row embedding and LM head of 1b14b
    (0.8 GB each in fp32) would be a multi-GB peak during construction."""
    flat = weight.view(-1)
    for start in range(0, flat.numel(), _INIT_CHUNK):
        nn.init.trunc_normal_(flat[start : start + _INIT_CHUNK], std=std, a=-3 * std, b=3 * std)


@dataclass(frozen=True)
class ParameterSummary:
    """Parameters a (rank-local) model holds: ``dense`` (everything but experts), ``shared`` experts, ``routed``
    experts (``local_experts`` of the ``routable_experts`` per layer); ``bytes`` of parameters and buffers."""

    dense: int
    shared: int
    routed: int
    local_experts: int
    routable_experts: int
    bytes: int

    @property
    def total(self) -> int:
        return self.dense + self.shared + self.routed

    def line(self, rank: int, world: int) -> str:
        """``rank r/W: P parameters (dense D, shared S, routed X of E per layer), B MB``."""
        return (
            f"rank {rank}/{world}: {self.total:,} parameters (dense {self.dense:,}, shared {self.shared:,}, "
            f"routed {self.routed:,}: {self.local_experts} of {self.routable_experts} experts per layer), "
            f"{self.bytes / 1e6:,.1f} MB"
        )


class EMOTransformer(nn.Module):
    """``model(input_ids (B,S), doc_ids (B,S), *, balance=None, return_routes=False) -> ModelOutput``."""

    def __init__(self, cfg: ModelConfig, expert_impl: ExpertImpl = "auto") -> None:
        """Built on the meta device (shapes only, no memory, no random draws), then materialised on the
        default device (:meth:`materialize`) unless that is ``meta``: the one-process build and a rank-local
        expert-parallel build (meta -> placement -> materialize) run the same initialisation."""
        super().__init__()
        self.cfg = cfg
        a = cfg.arch
        device = torch.get_default_device()
        with torch.device("meta"):
            self.embed = nn.Embedding(a.vocab_size, a.d_model)
            self.blocks = nn.ModuleList(Block(cfg, i, expert_impl) for i in range(a.n_layers))
            self.norm = RMSNorm(a.d_model, a.norm_eps)
            self.lm_head = nn.Linear(a.d_model, a.vocab_size, bias=False)
        if device.type != "meta":
            self.materialize(device)

    def materialize(self, device: torch.device | str | None = None) -> EMOTransformer:
        """Allocate the parameters and buffers this module holds on ``device`` (default: the default device) and
        initialise them (:meth:`init_weights`). Allocates only what is there: after expert placement, the
        rank's own experts."""
        self.to_empty(device=torch.get_default_device() if device is None else device)
        self.init_weights()
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """Truncated normal (+-3 std, init_std) for every matrix, ones for norms, RoPE tables. Dense weights use
        the global RNG in module order (nothing else draws from it here, whatever experts a rank holds); every
        expert (routed and shared) uses its own generator seeded by (router.seed, layer, global expert id)."""
        std = self.cfg.arch.init_std
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, Rotary):
                m.reset_parameters()
            elif isinstance(m, (nn.Linear, nn.Embedding)):
                _trunc_normal_chunked(m.weight, std)
            elif isinstance(m, MoELayer):
                m.reset_parameters(std)

    def parameter_summary(self) -> ParameterSummary:
        """What this module holds (dense, shared-expert and routed-expert parameters): see the startup line."""
        routed = [m for m in self.modules() if isinstance(m, RoutedExperts)]
        shared = [m for m in self.modules() if isinstance(m, SharedExperts)]

        def count(mods: list[nn.Module]) -> int:
            return sum(p.numel() for m in mods for p in m.parameters())

        n_routed, n_shared = count(routed), count(shared)
        tensors = [*self.parameters(), *self.buffers()]
        return ParameterSummary(
            dense=sum(p.numel() for p in self.parameters()) - n_routed - n_shared,
            shared=n_shared,
            routed=n_routed,
            local_experts=max((m.num_experts for m in routed), default=0),
            routable_experts=self.cfg.router.num_routed,
            bytes=sum(t.numel() * t.element_size() for t in tensors),
        )

    @classmethod
    def from_state_dict(
        cls, cfg: ModelConfig, state: Mapping[str, Tensor], device: torch.device | str = "cpu"
    ) -> EMOTransformer:
        """A model holding ``state`` (strict: every key, same shapes), without drawing any random weights:
        built on the meta device, allocated on ``device``, RoPE tables recomputed, then loaded."""
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device=device)
        for m in model.modules():
            if isinstance(m, Rotary):
                m.reset_parameters()
        model.load_state_dict(state, strict=True)
        return model

    def routers(self) -> list[Router]:
        return [b.moe.router for b in self.blocks]

    @contextmanager
    def routing(self, routing: Routing) -> Iterator[EMOTransformer]:
        """Eval mode with every router set to the inference ``routing`` (``model/routing.py``), restored
        afterwards (mode and training flag). Pools are clamped to [k', E'] (a pool of at least E' is no pool).
        ``causal:P:N`` runs the routers unrestricted: its pools come from :meth:`prefix_pools` as ``allowed``."""
        routers = self.routers()
        saved = [(r.pool_eval, r.pool_scope) for r in routers]
        was_training = self.training
        pool = routing.pool if routing.kind in ("pool", "running") else None
        self.eval()
        for r in routers:
            r.pool_eval = None if pool is None else max(r.routed_k, min(pool, r.num_routed))
            r.pool_scope = "running" if routing.kind == "running" else "document"
        try:
            yield self
        finally:
            for r, (p, scope) in zip(routers, saved, strict=True):
                r.pool_eval, r.pool_scope = p, scope
            self.train(was_training)

    @torch.no_grad()
    def prefix_pools(self, prefixes: Tensor, lengths: Tensor, pool: int) -> Tensor:
        """The ``causal:P:N`` pools: every layer's document pool of ``pool`` routable experts that the routers
        choose (selection bias included) from a document's first tokens alone.

        prefixes: (D,N) long, row d holds document d's first ``lengths[d]`` tokens (the rest is ignored);
        -> (L,D,E') bool. Pass ``pools[:, doc]`` as ``allowed`` to route each token inside its document's pool.
        """
        n = prefixes.shape[1]
        doc_ids = (torch.arange(n, device=prefixes.device) >= lengths.unsqueeze(1)).long()  # (D,N) prefix 0
        with self.routing(Routing("pool", pool)):
            out = self(prefixes, doc_ids, return_routes=True, route_probs=False)
        return torch.stack([lr.pool_mask[:, 0] for lr in out.layers])  # (L,D,E') segment 0: the prefix

    @torch.no_grad()
    def update_expert_bias(self, counts: Tensor) -> None:
        """One auxiliary-loss-free balancing step for every router (``router.balance`` bias or both).

        counts: (L,E') token-slot assignments of the whole optimizer step over all ranks (``GlobalLoadBalance``).
        """
        for router, layer_counts in zip(self.routers(), counts, strict=True):
            router.update_bias(layer_counts)

    def reseed_routers(self, seed: int) -> None:
        """Reset every router's pool-size generator to (seed, layer) (e.g. fold in the data-parallel rank)."""
        for r in self.routers():
            r.reseed(seed)

    def forward(
        self,
        input_ids: Tensor,
        doc_ids: Tensor | None = None,
        *,
        balance: GlobalLoadBalance | None = None,
        return_routes: bool = False,
        route_probs: bool = True,
        cache: DecodeCache | None = None,
        allowed: Tensor | None = None,
        capture_moe: bool = False,
    ) -> ModelOutput:
        """input_ids, doc_ids: (B,S) long (doc_ids None = one document per row).

        ``route_probs=False`` skips the (B,S,E') ``probs`` softmax of ``return_routes`` (e.g. for monitoring).
        ``cache``: incremental decoding (``model/decoding.py``): the first forward is the prefill of the prompts
        (row b's first segment is its document), every later one one new token per row. ``allowed``:
        (L,B|1,S|1,E') bool, the routable experts each token may use in each layer (a subset of experts, the
        causal pool of its document; ``model/routing.py``); None = all. ``capture_moe``: every ``LayerRouting``
        also gets the MoE layer's input, output and chosen experts' output norms (``moe_input``, ``moe_output``,
        ``expert_norms``), e.g. for Easy-EP expert scores; nothing is kept or computed for them otherwise.
        """
        rc, n_layers = self.cfg.router, self.cfg.arch.n_layers
        if doc_ids is None:
            doc_ids = torch.zeros_like(input_ids)
        b, s = input_ids.shape
        mask = cache.start(doc_ids) if cache is not None else None
        if mask is None:
            mask = AttentionMask.build(doc_ids, self.cfg.arch)
        x = self.embed(input_ids)  # (B,S,d)
        routes: list[RouterOutput] = []
        for i, blk in enumerate(self.blocks):
            layer_cache = None if cache is None else cache.layers[i]
            x, r = blk(x, mask, doc_ids, layer_cache, None if allowed is None else allowed[i], capture_moe)
            routes.append(r)
        if cache is not None:
            cache.finish(s)
        logits = self.lm_head(self.norm(x))  # (B,S,V)

        counts = torch.stack([r.counts for r in routes])  # (L,E') long
        pbar = torch.stack([r.scores.mean(0) for r in routes])  # (L,E') mean pool softmax (the reference)
        if balance is not None:
            c, t = balance.update(counts, pbar, b * s)
            lb = load_balance(c, t, pbar, rc.routed_k)  # (L,)
        else:
            lb = load_balance(counts, float(b * s), pbar, rc.routed_k)
        z = torch.stack([r.z_loss for r in routes])  # (L,)
        lb_weight = 0.0 if rc.balance == "bias" else rc.lb_weight  # "bias": no auxiliary loss (logged only)
        lb_loss = (lb_weight / n_layers) * lb.sum()
        z_total = (rc.z_weight / n_layers) * z.sum()
        w_lm = self.cfg.arch.lm_head_z_weight
        lm_z = w_lm * z_loss(logits) if w_lm > 0 else logits.new_zeros((), dtype=torch.float32)

        seg = segment_ids(doc_ids) if return_routes else None
        layers = []
        for i, r in enumerate(routes):
            lr = LayerRouting(r.counts, lb[i].detach(), z[i].detach(), r.pool_sizes)
            if return_routes:
                lr.experts, lr.weights = self._full_routes(r, b, s)
                if route_probs:
                    lr.probs = r.logits.detach().softmax(-1).view(b, s, -1)
                lr.pool_mask = self._segment_pools(r, seg).view(b, s, -1)
            if capture_moe:
                lr.moe_input, lr.moe_output = r.moe_input, r.moe_output
                lr.expert_norms = r.expert_norms.view(b, s, -1)
            layers.append(lr)
        return ModelOutput(logits, lb_loss, z_total, lb_loss + z_total + lm_z, layers, lm_z)

    @staticmethod
    def _segment_pools(r: RouterOutput, seg: Tensor) -> Tensor:
        """(N,E') bool indexed by flat segment id: the union of the pools its tokens routed in (absent: none)."""
        n, e = r.scores.shape
        token_pool = (
            torch.ones(n, e, device=seg.device) if r.pool is None else r.pool.float()
        )  # (N,E') 1 where the token could use the expert
        return torch.zeros(n, e, device=seg.device).index_add_(0, seg, token_pool) > 0

    def _full_routes(self, r: RouterOutput, b: int, s: int) -> tuple[Tensor, Tensor]:
        """Append shared experts (ids E'..E-1, weight 1.0). -> experts, weights: (B,S,k)."""
        rc = self.cfg.router
        n = b * s
        shared = torch.arange(rc.num_routed, rc.num_experts, device=r.experts.device).expand(n, rc.num_shared)
        experts = torch.cat([r.experts, shared], dim=1).view(b, s, rc.top_k)
        weights = torch.cat([r.weights.detach(), r.weights.new_ones(n, rc.num_shared)], dim=1).view(
            b, s, rc.top_k
        )
        return experts, weights
