"""Dropless MoE: router -> dispatch (sort by expert) -> RoutedExperts(x_sorted, counts) -> combine.

The expert computation only sees ``(x_sorted, counts)``. ``MoELayer`` hands both to its pluggable ``exchange``
(``exchange(x_sorted, counts, experts) -> y_sorted``): :class:`LocalExchange` (one process, or experts
replicated) just applies ``experts``; expert parallelism (``emo_lightning.parallel``) plugs in an all-to-all
exchange and a ``RoutedExperts`` holding only the rank's experts, without touching routing, dispatch, the
expert maths or combine.

``RoutedExperts`` implementations:
* ``loop``: ``x.split(counts)`` + ``W.unbind(0)``, one SwiGLU per non-empty expert. Fastest on CPU (see
  ECOSYSTEM_NOTES); never indexes ``W[e]`` (autograd would allocate a full-size gradient per expert).
* ``grouped_mm``: ``torch._grouped_mm`` with cumulative offsets, no host sync; used by ``auto`` on
  CUDA in bf16: bf16 tokens, or fp32 tokens under bf16 autocast (Lightning's ``bf16-mixed``, where the
  residual stream stays fp32), which it casts to bf16 itself (autocast may not cover ``_grouped_mm``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emo_lightning.model.config import ArchConfig, RouterConfig, derive_seed
from emo_lightning.model.router import Router, RouterOutput

if TYPE_CHECKING:
    from emo_lightning.model.decoding import LayerCache

ExpertImpl = Literal["auto", "loop", "grouped_mm"]
_EXPERT_STREAM = 0xE4E2  # seed-derivation tag for expert initialisation


@dataclass
class DispatchPlan:
    """Sorted token-slot layout. M = N*k slots."""

    x_sorted: Tensor  # (M,d) token copies grouped by expert (ascending id, stable)
    counts: Tensor  # (E,) long, slots per expert
    order: Tensor  # (M,) flat slot index (t*k + j) of every sorted row
    num_tokens: int
    k: int


def dispatch(x: Tensor, experts: Tensor, num_experts: int) -> DispatchPlan:
    """x: (N,d); experts: (N,k) long ids in [0,num_experts)."""
    n, k = experts.shape
    flat = experts.reshape(-1)  # (M,)
    order = flat.argsort(stable=True)  # (M,)
    counts = torch.zeros(num_experts, dtype=torch.long, device=x.device).index_add_(
        0, flat, torch.ones_like(flat)
    )
    x_sorted = x.index_select(0, order // k)  # (M,d)
    return DispatchPlan(x_sorted, counts, order, n, k)


def combine(y_sorted: Tensor, weights: Tensor, plan: DispatchPlan) -> Tensor:
    """Un-sort and weight: y_sorted (M,d), weights (N,k) -> (N,d) = sum_j w[t,j] * y[t,j] (deterministic)."""
    inv = torch.empty_like(plan.order).scatter_(
        0, plan.order, torch.arange(plan.order.numel(), device=plan.order.device)
    )
    y = y_sorted.index_select(0, inv).view(plan.num_tokens, plan.k, -1)  # (N,k,d)
    return torch.bmm(weights.to(y.dtype).unsqueeze(1), y).squeeze(1)  # (N,d)


def _trunc_normal(shape: tuple[int, ...], std: float, gen: torch.Generator) -> Tensor:
    """Drawn on the CPU (the generator's device) whatever the default device: the same values everywhere."""
    out = torch.empty(shape, device="cpu")
    return nn.init.trunc_normal_(out, std=std, a=-3 * std, b=3 * std, generator=gen)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: autocast's where it is on for x's device type, else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _swiglu(x: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
    """x: (n,d); w_in: (d,2h) = [gate | up]; w_out: (h,d)."""
    g, u = (x @ w_in).chunk(2, dim=-1)
    return (F.silu(g) * u) @ w_out


class RoutedExperts(nn.Module):
    """A stack of SwiGLU experts applied to expert-sorted tokens.

    ``w_in``: (E,d,2h) gate|up, ``w_out``: (E,h,d). ``expert_offset`` is the global id of the first local
    expert (for expert parallelism): expert i is initialised from ``(seed, layer, expert_offset + i)``
    regardless of rank.
    """

    def __init__(
        self, num_experts: int, d_model: int, hidden: int, expert_offset: int = 0, impl: ExpertImpl = "auto"
    ) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        self.expert_offset = expert_offset
        self.impl: ExpertImpl = impl
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, 2 * hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, d_model))

    @torch.no_grad()
    def reset_parameters(self, std: float, seed: int, layer_idx: int) -> None:
        for i in range(self.num_experts):
            gen = torch.Generator().manual_seed(
                derive_seed(seed, layer_idx, self.expert_offset + i, _EXPERT_STREAM)
            )
            self.w_in[i].copy_(_trunc_normal((self.d_model, 2 * self.hidden), std, gen))
            self.w_out[i].copy_(_trunc_normal((self.hidden, self.d_model), std, gen))

    def _use_grouped(self, x: Tensor, dtype: torch.dtype) -> bool:
        if self.impl == "grouped_mm":
            return True
        return self.impl == "auto" and x.is_cuda and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")

    def forward(self, x_sorted: Tensor, counts: Tensor) -> Tensor:
        """x_sorted: (M,d) grouped by expert; counts: (E,) long -> (M,d)."""
        dtype = compute_dtype(x_sorted)
        if self._use_grouped(x_sorted, dtype):
            x, w_in, w_out = x_sorted.to(dtype), self.w_in.to(dtype), self.w_out.to(dtype)
            offs = counts.cumsum(0).to(torch.int32)  # (E,)
            g, u = torch._grouped_mm(x, w_in, offs=offs).chunk(2, dim=-1)  # (M,h) each
            return torch._grouped_mm(F.silu(g) * u, w_out, offs=offs)  # (M,d) in dtype
        w_in, w_out = self.w_in.to(x_sorted.dtype), self.w_out.to(x_sorted.dtype)
        sizes = counts.tolist()  # host sizes: needed by split (cheap on CPU; CUDA uses grouped_mm)
        outs = [
            _swiglu(xe, wi, wo)
            for xe, wi, wo in zip(x_sorted.split(sizes), w_in.unbind(0), w_out.unbind(0), strict=True)
            if xe.shape[0] > 0
        ]
        if not outs:
            return x_sorted.new_zeros(x_sorted.shape)
        return torch.cat(outs, dim=0)


class SharedExperts(nn.Module):
    """n_sh always-on SwiGLU experts (gate 1.0) fused into one dense SwiGLU of hidden n_sh*h.

    Exact: sum_i SwiGLU_i(x) == SwiGLU with concatenated gate/up columns and down rows. Shared expert i has
    the global id ``first_id + i`` for initialisation.
    """

    def __init__(self, num_shared: int, d_model: int, hidden: int, first_id: int) -> None:
        super().__init__()
        self.num_shared, self.d_model, self.hidden, self.first_id = num_shared, d_model, hidden, first_id
        self.w_in = nn.Parameter(torch.empty(d_model, 2 * num_shared * hidden))  # [gates | ups]
        self.w_out = nn.Parameter(torch.empty(num_shared * hidden, d_model))

    @torch.no_grad()
    def reset_parameters(self, std: float, seed: int, layer_idx: int) -> None:
        h, hs = self.hidden, self.num_shared * self.hidden
        for i in range(self.num_shared):
            gen = torch.Generator().manual_seed(
                derive_seed(seed, layer_idx, self.first_id + i, _EXPERT_STREAM)
            )
            wi = _trunc_normal((self.d_model, 2 * h), std, gen)  # same draw order as RoutedExperts
            wo = _trunc_normal((h, self.d_model), std, gen)
            self.w_in[:, i * h : (i + 1) * h].copy_(wi[:, :h])
            self.w_in[:, hs + i * h : hs + (i + 1) * h].copy_(wi[:, h:])
            self.w_out[i * h : (i + 1) * h].copy_(wo)

    def expert_weights(self, i: int) -> tuple[Tensor, Tensor]:
        """(w_in (d,2h), w_out (h,d)) of shared expert i, in RoutedExperts layout."""
        h, hs = self.hidden, self.num_shared * self.hidden
        w_in = torch.cat(
            [self.w_in[:, i * h : (i + 1) * h], self.w_in[:, hs + i * h : hs + (i + 1) * h]], dim=1
        )
        return w_in, self.w_out[i * h : (i + 1) * h]

    def forward(self, x: Tensor) -> Tensor:
        """x: (N,d) -> (N,d)."""
        return _swiglu(x, self.w_in.to(x.dtype), self.w_out.to(x.dtype))


class LocalExchange(nn.Module):
    """The token exchange of a layer whose routable experts are all local: apply them (no communication).

    An exchange maps expert-sorted token copies to expert outputs in the same order:
    ``forward(x_sorted (M,d), counts (E',) long, experts) -> (M,d)``; an expert-parallel one sends rows to the
    ranks holding their experts and brings the outputs back around ``experts(rows, local_counts)``.
    """

    def forward(self, x_sorted: Tensor, counts: Tensor, experts: nn.Module) -> Tensor:
        return experts(x_sorted, counts)


class MoELayer(nn.Module):
    """Router + routed experts + shared experts. forward(h (B,S,d), doc_ids (B,S)) -> (y (B,S,d),
    RouterOutput)."""

    def __init__(
        self, arch: ArchConfig, rcfg: RouterConfig, layer_idx: int = 0, impl: ExpertImpl = "auto"
    ) -> None:
        super().__init__()
        self.layer_idx, self.seed = layer_idx, rcfg.seed
        self.num_routed = rcfg.num_routed
        self.router = Router(rcfg, arch.d_model, layer_idx)
        self.experts = RoutedExperts(rcfg.num_routed, arch.d_model, arch.expert_hidden, impl=impl)
        self.shared = (
            SharedExperts(rcfg.num_shared, arch.d_model, arch.expert_hidden, first_id=rcfg.num_routed)
            if rcfg.num_shared > 0
            else None
        )
        self.exchange: nn.Module = LocalExchange()  # expert parallelism swaps in an all-to-all exchange

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """Router from the global RNG (selection bias, if any, zero); every expert from its (seed, layer, global
        expert id) generator. Covers every tensor of the layer: models are built on the meta device."""
        nn.init.trunc_normal_(self.router.weight, std=std, a=-3 * std, b=3 * std)
        if getattr(self.router, "expert_bias", None) is not None:
            self.router.expert_bias.zero_()
        self.experts.reset_parameters(std, self.seed, self.layer_idx)
        if self.shared is not None:
            self.shared.reset_parameters(std, self.seed, self.layer_idx)

    def forward(
        self,
        h: Tensor,
        doc_ids: Tensor,
        cache: LayerCache | None = None,
        allowed: Tensor | None = None,
        capture: bool = False,
    ) -> tuple[Tensor, RouterOutput]:
        """``cache``: incremental decoding state (running pools); ``allowed``: (B|1,S|1,E') experts a token may
        use (see ``Router.forward``). ``capture``: also fill the returned ``RouterOutput``'s ``moe_input``,
        ``moe_output`` and ``expert_norms`` (detached; what Easy-EP expert scores need), at no cost otherwise."""
        b, s, d = h.shape
        r = self.router(h, doc_ids, cache, allowed)
        x = h.reshape(b * s, d)  # (N,d)
        plan = dispatch(x, r.experts, self.num_routed)
        y_sorted = self.exchange(plan.x_sorted, plan.counts, self.experts)  # (M,d) expert outputs, sorted
        y = combine(y_sorted, r.weights, plan)  # (N,d)
        if self.shared is not None:
            y = y + self.shared(x)
        y = y.view(b, s, d)
        if capture:
            norms = y_sorted.detach().float().norm(dim=-1)  # (M,) in sorted order
            slots = torch.empty_like(norms).index_copy_(0, plan.order, norms)  # (M,) slot t*k + j
            r.expert_norms = slots.view(plan.num_tokens, plan.k)  # (N,k')
            r.moe_input, r.moe_output = h.detach(), y.detach()
        return y, r
