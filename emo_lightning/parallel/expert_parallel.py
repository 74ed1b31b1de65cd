"""Expert parallelism for the dropless EMO MoE layer, on DeepSpeed's MoE machinery.

Placement: the E expert slots of a layer (routable ids 0..E'-1, then the n_sh shared ids) are split into
``ep_size`` contiguous blocks of ``E / ep_size``; expert-parallel rank r holds the routable experts with
global ids in ``[r * E_local, (r + 1) * E_local)``. The shared experts are used by every token, so they stay
replicated on every rank (dense, data-parallel parameters); their slots at the end of the last block are
empty placeholders that keep DeepSpeed's per-expert checkpoint files complete.

Token movement per layer (ours: router, dispatch, expert maths, combine; DeepSpeed's: groups and collectives):

1. ``dispatch`` sorts the local token copies by global expert id;
2. the per-expert counts are exchanged with one ``deepspeed.comm.all_to_all_single`` on the expert-parallel
   group (``deepspeed.utils.groups``), so every rank knows how many rows it receives for each local expert;
3. ``exchange="variable"`` (default): one variable-split ``deepspeed.comm.all_to_all_single`` moves exactly
   the routed rows (no padding, no drops); ``exchange="padded"``: rows go into an equal-split buffer with
   capacity = the global max count per (source, expert) (no drops) moved by DeepSpeed's
   ``sharded_moe._AllToAll``;
4. the receiver regroups rows by local expert and runs :class:`RoutedExperts` (the same dropless SwiGLU
   computation as one process); the inverse all-to-all brings the outputs back, and ``combine`` weights them.

Both all-to-alls are autograd functions whose backward is the reverse exchange, so expert gradients land on
the rank that holds the expert. ``ExpertParallelMoE`` subclasses ``deepspeed.moe.layer.MoE`` so the engine
finds it (ZeRO's MoE parameter groups, expert groups, per-expert checkpoint files); its expert parameters
carry DeepSpeed's markers (``allreduce=False``, ``group_name="ep_size_<n>"``).
"""

from __future__ import annotations

from typing import Any, Literal

import deepspeed.comm as ds_dist
import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import _AllToAll
from deepspeed.utils import groups
from torch import Tensor, nn

from emo_lightning.errors import ConfigError
from emo_lightning.model.moe import MoELayer, RoutedExperts, combine, dispatch
from emo_lightning.model.router import RouterOutput

Exchange = Literal["variable", "padded"]
EXPERT_KEY = "deepspeed_moe.experts.deepspeed_experts"  # DeepSpeed's per-expert checkpoint key pattern
_EXPERT_PARAMS = ("w_in", "w_out")
_SLOT_KEY = "shared_slot"  # placeholder entry for a shared expert's slot


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name of the expert-parallel group of size ``ep_size``."""
    return f"ep_size_{ep_size}"


def validate_expert_parallel(ep_size: int, world_size: int, num_experts: int, num_shared: int) -> None:
    """Raise ``ConfigError`` (a user error) naming ``trainer.strategy.init_args.ep_size`` for an impossible placement."""
    key = "trainer.strategy.init_args.ep_size"
    if ep_size < 1:
        raise ConfigError(f"{key} must be >= 1, got {ep_size}")
    if world_size % ep_size:
        raise ConfigError(
            f"{key}={ep_size} must divide the data-parallel world size {world_size} "
            f"(num_nodes x devices); choose one of {[d for d in range(1, world_size + 1) if world_size % d == 0]}"
        )
    if num_experts % ep_size:
        raise ConfigError(
            f"{key}={ep_size} must divide model.router.num_experts={num_experts} (experts are placed in "
            f"{ep_size} equal contiguous blocks)"
        )
    if ep_size > 1 and num_shared >= num_experts // ep_size:
        raise ConfigError(
            f"{key}={ep_size}: each expert-parallel rank holds num_experts/ep_size={num_experts // ep_size} "
            f"slots and the last one also the model.router.num_shared={num_shared} shared slot(s); it would "
            "hold no routable expert: use a smaller ep_size"
        )


class _AllToAllV(torch.autograd.Function):
    """Variable-split all-to-all (``deepspeed.comm.all_to_all_single``); backward is the reverse exchange."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        ds_dist.all_to_all_single(
            out, x.contiguous(), output_split_sizes=out_splits, input_split_sizes=in_splits, group=group
        )
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        out_splits, in_splits = ctx.splits
        return _AllToAllV.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


class _DeepSpeedExperts(RoutedExperts):
    """:class:`RoutedExperts` (stacked weights) whose state dict uses DeepSpeed's per-expert keys.

    ``w_in (E_local,d,2h)`` is saved as ``deepspeed_experts.<local id>.w_in (d,2h)`` (what the engine's
    per-expert checkpoint files expect), plus an empty ``shared_slot`` entry for each shared-expert slot of
    the block. Overriding ``_save_to_state_dict`` / ``_load_from_state_dict`` (not hooks: Lightning removes
    state-dict hooks before building an inference engine).
    """

    num_slots: int = 0

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for name in _EXPERT_PARAMS:
            stacked = getattr(self, name)
            stacked = stacked if keep_vars else stacked.detach()
            for i in range(self.num_experts):
                destination[f"{prefix}deepspeed_experts.{i}.{name}"] = stacked[i]
        for i in range(self.num_experts, self.num_slots):
            destination[f"{prefix}deepspeed_experts.{i}.{_SLOT_KEY}"] = torch.zeros(0)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        if f"{prefix}deepspeed_experts.0.{_EXPERT_PARAMS[0]}" in state_dict:
            for name in _EXPERT_PARAMS:
                keys = [f"{prefix}deepspeed_experts.{i}.{name}" for i in range(self.num_experts)]
                state_dict[f"{prefix}{name}"] = torch.stack([state_dict.pop(k) for k in keys])
            for i in range(self.num_experts, self.num_slots):
                state_dict.pop(f"{prefix}deepspeed_experts.{i}.{_SLOT_KEY}", None)
        super()._load_from_state_dict(state_dict, prefix, *args)


class _LocalExperts(nn.Module):
    """``deepspeed_moe`` of :class:`ExpertParallelMoE`: the local :class:`RoutedExperts` and the EP group."""

    def __init__(self, experts: RoutedExperts) -> None:
        super().__init__()
        self.experts = experts
        self.ep_group: Any = None

    def _set_ep_group(self, group: Any) -> None:
        """Called by the engine (every time an engine is built: idempotent, unlike DeepSpeed's MOELayer)."""
        self.ep_group = group


class ExpertParallelMoE(MoE):
    """Drop-in replacement of :class:`MoELayer` (same ``router`` / ``shared`` submodules and ``forward``)
    holding only this rank's routable experts.

    Build it with :meth:`from_layer`. ``num_experts`` / ``num_local_experts`` count slots (shared included) so
    DeepSpeed's checkpoint ids ``ep_rank * num_local_experts + i`` are the global expert ids.
    """

    def __init__(
        self,
        layer: MoELayer,
        num_slots: int,
        ep_size: int,
        ep_rank: int,
        exchange: Exchange = "variable",
    ) -> None:
        nn.Module.__init__(self)  # DeepSpeed's MoE.__init__ would build its own gate and experts
        if exchange not in ("variable", "padded"):
            raise ConfigError(
                "trainer.strategy.init_args.exchange", f"must be variable|padded, got {exchange!r}"
            )
        self.ep_size, self.ep_rank, self.exchange = ep_size, ep_rank, exchange
        self.expert_group_name = expert_group_name(ep_size)
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False
        self.num_experts = num_slots
        self.num_local_experts = num_slots // ep_size
        self.layer_idx, self.seed, self.num_routed = layer.layer_idx, layer.seed, layer.num_routed
        first = ep_rank * self.num_local_experts
        self.first_expert = first
        self.num_local_routed = max(0, min(first + self.num_local_experts, layer.num_routed) - first)
        full = layer.experts
        local = _DeepSpeedExperts(
            self.num_local_routed, full.d_model, full.hidden, expert_offset=first, impl=full.impl
        )
        local.num_slots = self.num_local_experts
        with torch.no_grad():
            local.w_in.copy_(full.w_in[first : first + self.num_local_routed])
            local.w_out.copy_(full.w_out[first : first + self.num_local_routed])
        for p in local.parameters():
            p.allreduce = False  # DeepSpeed's expert-parameter markers (what its Experts module sets)
            p.group_name = self.expert_group_name
        self.router = layer.router
        self.shared = layer.shared
        self.deepspeed_moe = _LocalExperts(local)

    @classmethod
    def from_layer(
        cls, layer: MoELayer, num_slots: int, ep_size: int, ep_rank: int, exchange: Exchange = "variable"
    ) -> ExpertParallelMoE:
        return cls(layer, num_slots, ep_size, ep_rank, exchange)

    @property
    def experts(self) -> RoutedExperts:
        return self.deepspeed_moe.experts

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """As :meth:`MoELayer.reset_parameters`: local experts from their global ids (placement-independent)."""
        nn.init.trunc_normal_(self.router.weight, std=std, a=-3 * std, b=3 * std)
        self.experts.reset_parameters(std, self.seed, self.layer_idx)
        if self.shared is not None:
            self.shared.reset_parameters(std, self.seed, self.layer_idx)

    # -------------------------------------------------------------------------------------------- forward
    def forward(  # type: ignore[override]
        self, h: Tensor, doc_ids: Tensor, cache: Any = None
    ) -> tuple[Tensor, RouterOutput]:
        b, s, d = h.shape
        r = self.router(h, doc_ids, cache)
        x = h.reshape(b * s, d)
        plan = dispatch(x, r.experts, self.num_routed)
        if self.ep_size == 1:
            y_sorted = self.experts(plan.x_sorted, plan.counts)
        else:
            y_sorted = self._exchange_compute(plan.x_sorted, plan.counts)
        y = combine(y_sorted, r.weights, plan)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(b, s, d), r

    def _exchange_compute(self, x_sorted: Tensor, counts: Tensor) -> Tensor:
        """x_sorted (M,d) grouped by global routable id, counts (E',) -> expert outputs (M,d), same order."""
        group, ep, n_loc = self.deepspeed_moe.ep_group, self.ep_size, self.num_local_experts
        if group is None:
            raise RuntimeError(
                "ExpertParallelMoE has no expert-parallel group: build the DeepSpeed engine first"
            )
        send = F.pad(counts, (0, self.num_experts - counts.numel())).view(ep, n_loc)  # (ep, E_local)
        recv = torch.empty_like(send)
        ds_dist.all_to_all_single(recv, send.contiguous(), group=group)  # recv[src, j]: rows for local j
        local_counts = recv.sum(0)[: self.num_local_routed]  # (E_local_routed,)
        if self.exchange == "variable":
            return self._variable(x_sorted, send, recv, local_counts, group)
        return self._padded(x_sorted, counts, recv, local_counts, group)

    def _variable(self, x: Tensor, send: Tensor, recv: Tensor, local_counts: Tensor, group: Any) -> Tensor:
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        x_recv = _AllToAllV.apply(x, recv_splits, send_splits, group)  # (R,d) ordered (src, local expert)
        n_loc = recv.shape[1]
        expert_of_row = torch.arange(n_loc, device=x.device).repeat(recv.shape[0])
        expert_of_row = expert_of_row.repeat_interleave(recv.reshape(-1))  # (R,)
        perm = expert_of_row.argsort(stable=True)  # regroup by local expert
        y_local = self.experts(x_recv.index_select(0, perm), local_counts)
        inv = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
        return _AllToAllV.apply(y_local.index_select(0, inv), send_splits, recv_splits, group)

    def _padded(self, x: Tensor, counts: Tensor, recv: Tensor, local_counts: Tensor, group: Any) -> Tensor:
        ep, n_loc = recv.shape
        cap = torch.stack([counts.max(), recv.max()]).max().clone()  # capacity: global max count, no drops
        ds_dist.all_reduce(cap, op=ds_dist.ReduceOp.MAX, group=group)
        cap = max(1, int(cap))
        d = x.shape[1]
        starts = counts.cumsum(0) - counts  # (E',)
        expert = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts)  # (M,)
        slot = expert * cap + (torch.arange(x.shape[0], device=x.device) - starts[expert])  # (M,)
        buf = x.new_zeros(ep * n_loc * cap, d).index_copy(0, slot, x)
        buf_recv = _AllToAll.apply(group, buf.view(ep, n_loc * cap, d)).reshape(-1, d)  # (src, j, c)
        c = torch.arange(cap, device=x.device)
        mask = c.view(1, 1, cap) < recv.t().unsqueeze(-1)  # (j, src, c): valid rows regrouped by expert
        j_idx, src_idx, c_idx = mask.nonzero(as_tuple=True)
        rows = (src_idx * n_loc + j_idx) * cap + c_idx
        y_local = self.experts(buf_recv.index_select(0, rows), local_counts)
        out = x.new_zeros(ep * n_loc * cap, d).index_copy(0, rows, y_local)
        back = _AllToAll.apply(group, out.view(ep, n_loc * cap, d)).reshape(-1, d)
        return back.index_select(0, slot)


def convert_to_expert_parallel(
    model: nn.Module, ep_size: int, exchange: Exchange = "variable", ep_rank: int | None = None
) -> int:
    """Replace every :class:`MoELayer` of ``model`` by an :class:`ExpertParallelMoE` holding this rank's
    experts (idempotent). Creates DeepSpeed's expert / expert-data-parallel groups if needed
    (``deepspeed.utils.groups``) and takes the expert-parallel rank from them. Returns the number of layers
    converted."""
    if ep_rank is None:
        name = expert_group_name(ep_size)
        if name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(ep_size)
        ep_rank = groups._get_expert_parallel_rank(name)
    converted = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, MoELayer):
                slots = child.num_routed + (child.shared.num_shared if child.shared is not None else 0)
                setattr(parent, child_name, ExpertParallelMoE(child, slots, ep_size, ep_rank, exchange))
                converted += 1
    return converted
