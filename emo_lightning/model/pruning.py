"""Cut a model down to a subset of its experts: a smaller :class:`EMOTransformer`, exactly equivalent.

A subset keeps, in every MoE layer, the same number K' of routable experts (any ids, per layer) plus all
shared experts. The pruned model has ``num_experts = K' + n_sh``; its router rows, selection bias and expert
weights are the kept ones (in ascending id order), so its router softmax is the full softmax restricted to the
kept experts and renormalised: the same routing as the full model with ``allowed`` = the subset. Routed experts
per token become ``min(k', K')``; pool sizes are clamped into ``[k'_new, K']`` (with K' kept experts every pool of
at least K' is no restriction).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

import torch

from emo_lightning.errors import UserError
from emo_lightning.model.config import ModelConfig, RouterConfig
from emo_lightning.model.transformer import EMOTransformer

# per-expert tensors of a block, first dimension = routable expert id
_PER_EXPERT = re.compile(
    r"^blocks\.(\d+)\.moe\.(router\.weight|router\.expert_bias|experts\.w_in|experts\.w_out)$"
)


def per_expert_key(key: str) -> tuple[int, str] | None:
    """``(layer, name)`` of a state-dict entry whose first dimension is the routable expert id (router rows, the
    selection bias, routed expert weights; ``name`` e.g. ``experts.w_in``), None for every other entry."""
    m = _PER_EXPERT.match(key)
    return (int(m.group(1)), m.group(2)) if m else None


def pruned_router_config(rc: RouterConfig, kept_routed: int) -> RouterConfig:
    """The router configuration of a model keeping ``kept_routed`` routable experts per layer."""
    if not 1 <= kept_routed <= rc.num_routed:
        raise ValueError(f"kept routable experts must lie in [1, {rc.num_routed}], got {kept_routed}")
    k_new = min(rc.routed_k, kept_routed)

    def clamp(p: int) -> int:
        return max(k_new, min(p, kept_routed))

    pool_min, pool_max, pool_eval = rc.resolved_pools()
    return replace(
        rc,
        num_experts=kept_routed + rc.num_shared,
        top_k=k_new + rc.num_shared,
        pool_min=clamp(pool_min),
        pool_max=clamp(pool_max),
        pool_eval=clamp(pool_eval),
    )


def check_subset(kept: Sequence[Sequence[int]], rc: RouterConfig, n_layers: int) -> list[list[int]]:
    """Validate per-layer kept routable ids (same count everywhere, distinct, in range); sorted copies."""
    fix = "select the subset from this checkpoint (`emo-experts select --ckpt ...`)"
    if len(kept) != n_layers:
        raise UserError(f"subset has {len(kept)} layers, the model has {n_layers}", fix)
    out = [sorted(int(e) for e in layer) for layer in kept]
    sizes = {len(layer) for layer in out}
    if len(sizes) != 1:
        raise UserError(f"subset keeps different numbers of routable experts per layer: {sorted(sizes)}", fix)
    for i, layer in enumerate(out):
        if len(set(layer)) != len(layer) or not all(0 <= e < rc.num_routed for e in layer):
            raise UserError(
                f"subset layer {i}: kept ids must be distinct routable ids in [0, {rc.num_routed}), got {layer}",
                fix,
            )
    return out


def subset_mask(kept: Sequence[Sequence[int]], num_routed: int) -> torch.Tensor:
    """(L,1,1,E') bool ``allowed`` of a subset: the same routing as the pruned model, without pruning."""
    mask = torch.zeros(len(kept), num_routed, dtype=torch.bool)
    for layer, ids in enumerate(kept):
        mask[layer, list(ids)] = True
    return mask[:, None, None, :]


def prune_model(model: EMOTransformer, kept: Sequence[Sequence[int]]) -> EMOTransformer:
    """A standalone smaller model keeping ``kept[l]`` routable experts in layer l (plus the shared ones), in the
    training mode of ``model`` and on its device."""
    rc = model.cfg.router
    kept = check_subset(kept, rc, len(model.blocks))
    index = [torch.tensor(ids, dtype=torch.long) for ids in kept]
    state = {}
    for key, value in model.state_dict().items():
        m = per_expert_key(key)
        state[key] = value.index_select(0, index[m[0]].to(value.device)) if m else value
    cfg = ModelConfig(arch=model.cfg.arch, router=pruned_router_config(rc, len(kept[0])))
    small = EMOTransformer.from_state_dict(cfg, state, device=model.lm_head.weight.device)
    return small.train(model.training)


def expert_parameter_counts(model: EMOTransformer) -> dict[str, int]:
    """Parameters: total, routed experts, shared experts, routers, and the dense rest."""
    summary = model.parameter_summary()
    routers = sum(r.weight.numel() for r in model.routers())
    return {
        "total": summary.total,
        "routed_experts": summary.routed,
        "shared_experts": summary.shared,
        "routers": routers,
        "dense": summary.dense - routers,
    }
