"""Expert parallelism applied to the model: placement, rank-local construction, the all-to-all exchange.

The model's :class:`~emo_lightning.model.moe.MoELayer` stays the one code path (router, dispatch, expert maths,
combine, shared experts); expert parallelism only swaps two of its parts, the way torchtitan applies
parallelism to a model instead of subclassing it:

* ``layer.experts``: a :class:`RoutedExperts` holding only this rank's routable experts, wrapped in
  :class:`DeepSpeedExperts` (the adapter DeepSpeed needs, below);
* ``layer.exchange``: :class:`AllToAllExchange` (``ep_size > 1``), which sends every expert-sorted row to the
  rank holding its expert and brings the outputs back; ``ep_size == 1`` keeps the model's ``LocalExchange``.

Placement: the E expert slots of a layer (routable ids 0..E'-1, then the n_sh shared ids) are split into
``ep_size`` contiguous blocks of ``E / ep_size``; expert-parallel rank r holds the routable experts with global
ids in ``[r * E / ep, (r + 1) * E / ep)`` (:class:`ExpertPlacement`). The shared experts serve every token and
stay replicated (dense, data-parallel parameters); their slots at the end of the last block are empty
placeholders that keep DeepSpeed's per-expert checkpoint files complete.

Rank-local construction (:func:`build_expert_parallel_model`): the model is built on the meta device (shapes
only), the placement is applied there (the local expert stacks are meta tensors of ``E / ep`` experts), and only
then is the model materialised: every rank allocates and initialises its dense weights, shared experts and its
own routable experts, each from ``(seed, layer, global expert id)`` as in one process. No rank ever allocates
another rank's experts.

Token movement per layer (:class:`AllToAllExchange`): the per-expert counts are exchanged with one
``deepspeed.comm.all_to_all_single`` on the expert-parallel group (``deepspeed.utils.groups``: consecutive
ranks), so every rank knows how many rows it receives for each local expert; ``mode="variable"`` (default) moves
exactly the routed rows with one variable-split all-to-all each way (no padding, no drops); ``mode="padded"``
puts them into an equal-split buffer with capacity = the global max count per (source, expert) (no drops) moved
by DeepSpeed's ``sharded_moe._AllToAll``. Both all-to-alls are autograd functions whose backward is the reverse
exchange, so expert gradients land on the rank that holds the expert.

Why an adapter: DeepSpeed's engine finds MoE layers only by ``isinstance(m, deepspeed.moe.layer.MoE)``
(``has_moe_layers``, the expert/expert-data-parallel groups, the per-(layer, expert) checkpoint files, and the
removal of expert keys from the dense checkpoint), and names expert tensors by the key pattern
``<layer>.deepspeed_moe.experts.deepspeed_experts.<local id>.<name>``. :class:`DeepSpeedExperts` is that and
nothing more: an ``MoE`` subclass without DeepSpeed's gate or ``MOELayer`` (``nn.Module.__init__`` only), holding
the local :class:`RoutedExperts` at ``deepspeed_moe.experts`` and forwarding to it; its parameters carry
DeepSpeed's expert markers (``allreduce=False``, ``group_name="ep_size_<n>"``, what ``is_moe_param`` and
``split_params_into_different_moe_groups_for_optimizer`` look for).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import deepspeed.comm as ds_dist
import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import _AllToAll
from deepspeed.utils import groups
from torch import Tensor, nn

from emo_lightning.errors import ConfigError
from emo_lightning.model import EMOTransformer, ModelConfig
from emo_lightning.model.moe import ExpertImpl, LocalExchange, MoELayer, RoutedExperts

Exchange = Literal["variable", "padded"]
EXPERT_KEY = "deepspeed_moe.experts.deepspeed_experts"  # DeepSpeed's per-expert checkpoint key pattern
_EXPERT_PARAMS = ("w_in", "w_out")
_SLOT_KEY = "shared_slot"  # placeholder entry for a shared expert's slot
EP_KEY = "trainer.strategy.init_args.ep_size"


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name of the expert-parallel group of size ``ep_size``."""
    return f"ep_size_{ep_size}"


def validate_expert_parallel(ep_size: int, world_size: int, num_experts: int, num_shared: int) -> None:
    """Raise ``ConfigError`` (a user error) naming ``trainer.strategy.init_args.ep_size`` for an impossible placement."""
    if ep_size < 1:
        raise ConfigError(f"{EP_KEY} must be >= 1, got {ep_size}")
    if world_size % ep_size:
        raise ConfigError(
            f"{EP_KEY}={ep_size} must divide the data-parallel world size {world_size} "
            f"(num_nodes x devices); choose one of {[d for d in range(1, world_size + 1) if world_size % d == 0]}"
        )
    if num_experts % ep_size:
        raise ConfigError(
            f"{EP_KEY}={ep_size} must divide model.router.num_experts={num_experts} (experts are placed in "
            f"{ep_size} equal contiguous blocks)"
        )
    if ep_size > 1 and num_shared >= num_experts // ep_size:
        raise ConfigError(
            f"{EP_KEY}={ep_size}: each expert-parallel rank holds num_experts/ep_size={num_experts // ep_size} "
            f"slots and the last one also the model.router.num_shared={num_shared} shared slot(s); it would "
            "hold no routable expert: use a smaller ep_size"
        )


@dataclass(frozen=True)
class ExpertPlacement:
    """The routable experts expert-parallel rank ``ep_rank`` holds: global ids ``first .. first + num_local - 1``."""

    ep_size: int
    ep_rank: int
    num_routed: int  # E'
    num_shared: int  # n_sh

    @property
    def num_slots(self) -> int:
        """E = E' + n_sh: DeepSpeed's experts per layer (its checkpoint files are numbered by slot)."""
        return self.num_routed + self.num_shared

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.ep_size

    @property
    def first(self) -> int:
        return self.ep_rank * self.slots_per_rank

    @property
    def num_local(self) -> int:
        """Routable experts on this rank (the last rank's block also holds the shared slots)."""
        return max(0, min(self.first + self.slots_per_rank, self.num_routed) - self.first)

    @staticmethod
    def of(cfg: ModelConfig, ep_size: int, ep_rank: int) -> ExpertPlacement:
        r = cfg.router
        return ExpertPlacement(ep_size, ep_rank, r.num_routed, r.num_shared)


def expert_parallel_rank(ep_size: int) -> int:
    """This process's rank in its expert-parallel group; creates DeepSpeed's expert-parallel and
    expert-data-parallel groups (``deepspeed.utils.groups``) if needed (collective: every rank calls it)."""
    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_rank(name)


# ------------------------------------------------------------------------------------------ experts
class _PerExpertStateExperts(RoutedExperts):
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
    """``deepspeed_moe`` of :class:`DeepSpeedExperts`: the local :class:`RoutedExperts` and the EP group."""

    def __init__(self, experts: RoutedExperts) -> None:
        super().__init__()
        self.experts = experts
        self.ep_group: Any = None

    def _set_ep_group(self, group: Any) -> None:
        """Called by the engine (every time an engine is built: idempotent, unlike DeepSpeed's MOELayer)."""
        self.ep_group = group


class DeepSpeedExperts(MoE):
    """A rank's routable experts as DeepSpeed sees them (the adapter described in the module docstring).

    ``forward(x_sorted, counts)`` and ``reset_parameters(std, seed, layer_idx)`` are the local
    :class:`RoutedExperts`' (reached as :attr:`local`). ``num_experts`` / ``num_local_experts`` count slots
    (shared included), so DeepSpeed's checkpoint ids ``ep_rank * num_local_experts + i`` are global expert ids.
    """

    def __init__(self, experts: RoutedExperts, placement: ExpertPlacement) -> None:
        nn.Module.__init__(self)  # DeepSpeed's MoE.__init__ would build its own gate and experts
        self.ep_size = placement.ep_size
        self.expert_group_name = expert_group_name(placement.ep_size)
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False
        self.num_experts = placement.num_slots
        self.num_local_experts = placement.slots_per_rank
        self.placement = placement
        self.deepspeed_moe = _LocalExperts(experts)

    @property
    def local(self) -> RoutedExperts:
        """The rank's :class:`RoutedExperts` (global ids ``local.expert_offset ..``)."""
        return self.deepspeed_moe.experts

    def forward(self, x_sorted: Tensor, counts: Tensor) -> Tensor:  # type: ignore[override]
        """x_sorted (M,d) grouped by local expert, counts (E_local,) -> (M,d)."""
        return self.deepspeed_moe.experts(x_sorted, counts)

    def reset_parameters(self, std: float, seed: int, layer_idx: int) -> None:
        self.deepspeed_moe.experts.reset_parameters(std, seed, layer_idx)

    def mark_parameters(self) -> None:
        """DeepSpeed's expert-parameter markers (what its ``Experts`` module sets); again after ``to_empty``
        (which replaces the parameter objects)."""
        for p in self.parameters():
            p.allreduce = False
            p.group_name = self.expert_group_name

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine: DeepSpeed's expert-parallel group -> ``deepspeed_moe.ep_group``."""
        expert_parallel_rank(self.ep_size)
        self.deepspeed_moe._set_ep_group(groups._get_expert_parallel_group(self.expert_group_name))


# ------------------------------------------------------------------------------------------ exchange
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


class AllToAllExchange(nn.Module):
    """The token exchange of an expert-parallel layer (``MoELayer.exchange``); ``mode`` ``variable`` or
    ``padded`` (module docstring). The group is DeepSpeed's expert-parallel group of ``placement.ep_size``."""

    def __init__(self, placement: ExpertPlacement, mode: Exchange = "variable") -> None:
        super().__init__()
        if mode not in ("variable", "padded"):
            raise ConfigError("trainer.strategy.init_args.exchange", f"must be variable|padded, got {mode!r}")
        self.placement, self.mode = placement, mode

    def extra_repr(self) -> str:
        p = self.placement
        return f"mode={self.mode}, ep_size={p.ep_size}, ep_rank={p.ep_rank}, experts={p.first}..{p.first + p.num_local - 1}"

    def forward(self, x_sorted: Tensor, counts: Tensor, experts: nn.Module) -> Tensor:
        """x_sorted (M,d) grouped by global routable id, counts (E',) -> expert outputs (M,d), same order."""
        p = self.placement
        name = expert_group_name(p.ep_size)
        if name not in groups._get_expert_parallel_group_dict():
            raise RuntimeError(
                f"no expert-parallel group {name}: call expert_parallel_rank({p.ep_size}) first"
            )
        group = groups._get_expert_parallel_group(name)
        n_loc = p.slots_per_rank
        send = F.pad(counts, (0, p.num_slots - counts.numel())).view(p.ep_size, n_loc)  # (ep, E_local)
        recv = torch.empty_like(send)
        ds_dist.all_to_all_single(recv, send.contiguous(), group=group)  # recv[src, j]: rows for local j
        local_counts = recv.sum(0)[: p.num_local]  # (E_local_routed,)
        if self.mode == "variable":
            return self._variable(x_sorted, send, recv, local_counts, experts, group)
        return self._padded(x_sorted, counts, recv, local_counts, experts, group)

    @staticmethod
    def _variable(
        x: Tensor, send: Tensor, recv: Tensor, local_counts: Tensor, experts: nn.Module, group: Any
    ) -> Tensor:
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        x_recv = _AllToAllV.apply(x, recv_splits, send_splits, group)  # (R,d) ordered (src, local expert)
        ep, n_loc = recv.shape
        expert_of_row = torch.arange(n_loc, device=x.device).repeat(ep)  # (ep*E_local,)
        expert_of_row = expert_of_row.repeat_interleave(recv.reshape(-1))  # (R,)
        perm = expert_of_row.argsort(stable=True)  # regroup by local expert
        y_local = experts(x_recv.index_select(0, perm), local_counts)  # (R,d)
        inv = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
        return _AllToAllV.apply(y_local.index_select(0, inv), send_splits, recv_splits, group)

    @staticmethod
    def _padded(
        x: Tensor, counts: Tensor, recv: Tensor, local_counts: Tensor, experts: nn.Module, group: Any
    ) -> Tensor:
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
        y_local = experts(buf_recv.index_select(0, rows), local_counts)
        out = x.new_zeros(ep * n_loc * cap, d).index_copy(0, rows, y_local)
        back = _AllToAll.apply(group, out.view(ep, n_loc * cap, d)).reshape(-1, d)
        return back.index_select(0, slot)


# ------------------------------------------------------------------------------------------ placement
def _moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def apply_expert_parallel(
    model: nn.Module, ep_size: int, ep_rank: int | None = None, exchange: Exchange = "variable"
) -> int:
    """Give every :class:`MoELayer` of ``model`` this rank's experts (:class:`DeepSpeedExperts`) and, for
    ``ep_size > 1``, an :class:`AllToAllExchange`; idempotent. Returns the number of layers placed.

    On a meta-device model (:func:`build_expert_parallel_model`) nothing is allocated: materialise it after.
    On a materialised one-process model the local experts are copied out of the full stacks (the full model
    was already in memory). ``ep_rank`` defaults to this process's rank in DeepSpeed's expert-parallel group
    (created if needed).
    """
    if ep_rank is None:
        ep_rank = expert_parallel_rank(ep_size)
    placed = 0
    for layer in _moe_layers(model):
        if isinstance(layer.experts, DeepSpeedExperts):
            continue
        full = layer.experts
        p = ExpertPlacement(ep_size, ep_rank, layer.num_routed, _num_shared(layer))
        with torch.device(full.w_in.device):
            local = _PerExpertStateExperts(
                p.num_local,
                full.d_model,
                full.hidden,
                expert_offset=full.expert_offset + p.first,
                impl=full.impl,
            )
        local = local.to(full.w_in.dtype)
        local.num_slots = p.slots_per_rank
        if not full.w_in.is_meta:
            with torch.no_grad():
                local.w_in.copy_(full.w_in[p.first : p.first + p.num_local])
                local.w_out.copy_(full.w_out[p.first : p.first + p.num_local])
        layer.experts = DeepSpeedExperts(local, p)
        layer.experts.mark_parameters()
        layer.exchange = AllToAllExchange(p, exchange) if ep_size > 1 else LocalExchange()
        placed += 1
    return placed


def _num_shared(layer: MoELayer) -> int:
    return layer.shared.num_shared if layer.shared is not None else 0


def mark_expert_parameters(model: nn.Module) -> None:
    """Re-apply DeepSpeed's expert markers on every :class:`DeepSpeedExperts` (after ``to_empty``)."""
    for m in model.modules():
        if isinstance(m, DeepSpeedExperts):
            m.mark_parameters()


def build_expert_parallel_model(
    cfg: ModelConfig,
    ep_size: int,
    exchange: Exchange = "variable",
    *,
    ep_rank: int | None = None,
    device: torch.device | str | None = None,
    expert_impl: ExpertImpl = "auto",
    materialize: bool = True,
) -> EMOTransformer:
    """This rank's :class:`EMOTransformer`: built on the meta device, placed (:func:`apply_expert_parallel`),
    then (``materialize``) allocated on ``device`` (default: the default device) and initialised. Dense weights
    come out exactly as in :class:`EMOTransformer` ``(cfg)`` under the same global RNG state; experts from their
    (seed, layer, global id). ``materialize=False`` returns the meta model (shapes only: ``emo estimate``)."""
    with torch.device("meta"):
        model = EMOTransformer(cfg, expert_impl)
    apply_expert_parallel(model, ep_size, ep_rank, exchange)
    if materialize:
        model.materialize(device)
        mark_expert_parameters(model)
    return model
