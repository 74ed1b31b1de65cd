"""Cut a model down to a subset of its experts: a smaller :class:`EMOTransformer`, exactly equivalent.

A subset keeps, in every MoE layer, the same number K' of routable experts (any ids, per layer) plus all
shared experts. The pruned model has ``num_experts = K' + n_sh``; its router rows and expert weights are the
kept ones (in ascending id order), so its router softmax is the full softmax restricted to the kept experts
and renormalised. Routed experts per token become ``min(k', K')``; pool sizes are clamped into
``[k'_new, K']`` (with K' kept experts every pool of at least K' is no restriction).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from emo_lightning.errors import UserError
from emo_lightning.model import EMOTransformer, ModelConfig, MoELayer, RouterConfig


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


def prune_layer(moe: MoELayer, kept: Tensor, rc_new: RouterConfig, arch_cfg) -> MoELayer:
    """A new MoE layer holding only ``kept`` (ascending routable ids) of ``moe``, eval flags preserved."""
    layer = MoELayer(arch_cfg, rc_new, moe.layer_idx, impl=moe.experts.impl)
    with torch.no_grad():
        layer.router.weight.copy_(moe.router.weight.index_select(0, kept))
        if moe.router.expert_bias is not None:  # the selection bias travels with its experts
            layer.router.expert_bias.copy_(moe.router.expert_bias.index_select(0, kept))
        layer.experts.w_in.copy_(moe.experts.w_in.index_select(0, kept))
        layer.experts.w_out.copy_(moe.experts.w_out.index_select(0, kept))
        if moe.shared is not None:
            layer.shared.load_state_dict(moe.shared.state_dict())
    layer.router.generator.set_state(moe.router.generator.get_state())
    old_pool = moe.router.eval_pool
    layer.router.eval_pool = None if old_pool is None else max(layer.router.k, min(old_pool, len(kept)))
    layer.train(moe.training)
    return layer


def prune_model(model: EMOTransformer, kept: Sequence[Sequence[int]]) -> EMOTransformer:
    """A standalone smaller model keeping ``kept[l]`` routable experts in layer l (plus the shared ones)."""
    rc = model.cfg.router
    kept = check_subset(kept, rc, len(model.blocks))
    rc_new = pruned_router_config(rc, len(kept[0]))
    small = copy.deepcopy(model)  # dense weights, norms, embeddings, head: copied as they are
    small.cfg = ModelConfig(arch=model.cfg.arch, router=rc_new)
    for blk, ids in zip(small.blocks, kept, strict=True):
        blk.moe = prune_layer(blk.moe, torch.tensor(ids, dtype=torch.long), rc_new, model.cfg.arch)
    return small


def expert_parameter_counts(model: EMOTransformer) -> dict[str, int]:
    """Parameters: total, routed experts, shared experts, routers, and the dense rest."""
    routed = sum(b.moe.experts.w_in.numel() + b.moe.experts.w_out.numel() for b in model.blocks)
    shared = sum(
        p.numel() for b in model.blocks if b.moe.shared is not None for p in b.moe.shared.parameters()
    )
    routers = sum(b.moe.router.weight.numel() for b in model.blocks)
    total = sum(p.numel() for p in model.parameters())
    return {
        "total": total,
        "routed_experts": routed,
        "shared_experts": shared,
        "routers": routers,
        "dense": total - routed - shared - routers,
    }
