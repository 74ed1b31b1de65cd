"""Dropless MoE: sort/dispatch -> RoutedExperts -> combine equals a dense every-expert reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from emo_lightning.model import (
    ArchConfig,
    MoELayer,
    RoutedExperts,
    RouterConfig,
    SharedExperts,
    combine,
    dispatch,
)


def swiglu(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    g, u = (x @ w_in).chunk(2, dim=-1)
    return (F.silu(g) * u) @ w_out


def dense_reference(
    layer: MoELayer, h: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Run every expert on every token, mask by the routing gates; shared experts one by one with gate 1.0."""
    n, d = h.shape[0] * h.shape[1], h.shape[2]
    x = h.reshape(n, d)
    gates = torch.zeros(n, layer.num_routed).scatter_add(1, experts, weights)  # (N,E')
    y = torch.zeros(n, d)
    for e, (wi, wo) in enumerate(zip(layer.experts.w_in, layer.experts.w_out, strict=True)):
        y = y + gates[:, e : e + 1] * swiglu(x, wi, wo)
    if layer.shared is not None:
        for i in range(layer.shared.num_shared):
            y = y + swiglu(x, *layer.shared.expert_weights(i))
    return y.view_as(h)


def make_layer(e: int, n_sh: int, k: int, kind: str = "emo", impl: str = "loop") -> MoELayer:
    arch = ArchConfig(d_model=16, n_heads=2, expert_hidden=24)
    kr, er = k - n_sh, e - n_sh
    rc = RouterConfig(kind, e, n_sh, k, pool_min=kr, pool_max=er, pool_eval=kr)
    layer = MoELayer(arch, rc, layer_idx=1, impl=impl)
    layer.reset_parameters(0.3)
    return layer


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    shape=st.sampled_from([(8, 1, 3), (6, 0, 2), (10, 2, 4), (4, 1, 4)]),
    kind=st.sampled_from(["emo", "standard"]),
    b=st.integers(1, 3),
    s=st.integers(1, 12),
    seed=st.integers(0, 1000),
)
def test_dropless_moe_equals_dense_reference(shape, kind, b, s, seed) -> None:
    torch.manual_seed(seed)
    layer = make_layer(*shape, kind=kind)
    h = torch.randn(b, s, 16, requires_grad=True)
    doc_ids = torch.arange(s).div(3, rounding_mode="floor").expand(b, s)
    y, r = layer(h, doc_ids)
    ref = dense_reference(layer, h, r.experts, r.weights)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    cot = torch.randn_like(y)
    params = [h, layer.experts.w_in, layer.experts.w_out, layer.router.weight]
    g = torch.autograd.grad((y * cot).sum(), params, retain_graph=True)
    g_ref = torch.autograd.grad((ref * cot).sum(), params)
    for a, b_ in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b_, atol=1e-4, rtol=1e-3)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm not available")
def test_grouped_mm_path_equals_loop_path_including_empty_experts() -> None:
    torch.manual_seed(0)
    ex = RoutedExperts(5, 16, 8)
    ex.reset_parameters(0.2, seed=0, layer_idx=0)
    counts = torch.tensor([3, 0, 7, 0, 2])  # empty groups included
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    cot = torch.randn(int(counts.sum()), 16)  # not a stride-0 gradient (grouped_mm backward rejects those)
    outs = []
    for impl in ("loop", "grouped_mm"):
        ex.impl = impl
        y = ex(x, counts)
        outs.append((y, *torch.autograd.grad((y * cot).sum(), [x, ex.w_in, ex.w_out])))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_dispatch_sorts_by_expert_and_combine_inverts() -> None:
    torch.manual_seed(1)
    x = torch.randn(7, 4)
    experts = torch.randint(0, 5, (7, 3))
    plan = dispatch(x, experts, 5)
    assert torch.equal(plan.counts, torch.bincount(experts.flatten(), minlength=5))
    sorted_ids = experts.flatten()[plan.order]
    assert (sorted_ids[1:] >= sorted_ids[:-1]).all()
    torch.testing.assert_close(plan.x_sorted, x[plan.order // 3])
    w = torch.rand(7, 3)
    torch.testing.assert_close(combine(plan.x_sorted, w, plan), w.sum(1, keepdim=True) * x)


def test_expert_init_is_independent_of_placement() -> None:
    """Expert i gets the same values whether it is stored with all experts or on a rank holding a slice."""
    full = RoutedExperts(8, 16, 8)
    full.reset_parameters(0.02, seed=3, layer_idx=2)
    part = RoutedExperts(4, 16, 8, expert_offset=4)
    part.reset_parameters(0.02, seed=3, layer_idx=2)
    assert torch.equal(full.w_in[4:], part.w_in) and torch.equal(full.w_out[4:], part.w_out)
    assert not torch.equal(full.w_in[0], full.w_in[1])  # experts differ from one another
    other_layer = RoutedExperts(8, 16, 8)
    other_layer.reset_parameters(0.02, seed=3, layer_idx=1)
    assert not torch.equal(full.w_in, other_layer.w_in)
    assert full.w_in.abs().max() <= 3 * 0.02  # truncated normal
    # a shared expert with global id 8 is initialised like routed expert 8 would be
    shared = SharedExperts(1, 16, 8, first_id=8)
    shared.reset_parameters(0.02, seed=3, layer_idx=2)
    nine = RoutedExperts(9, 16, 8)
    nine.reset_parameters(0.02, seed=3, layer_idx=2)
    w_in, w_out = shared.expert_weights(0)
    assert torch.equal(w_in, nine.w_in[8]) and torch.equal(w_out, nine.w_out[8])


def test_fused_shared_experts_equal_the_sum_of_individual_experts() -> None:
    shared = SharedExperts(3, 16, 8, first_id=5)
    shared.reset_parameters(0.3, seed=0, layer_idx=0)
    x = torch.randn(10, 16)
    ref = sum(swiglu(x, *shared.expert_weights(i)) for i in range(3))
    torch.testing.assert_close(shared(x), ref, atol=1e-5, rtol=1e-4)
