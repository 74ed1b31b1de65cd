"""EMOTransformer: output contract, document-masked attention, budget, overfitting, exact resume."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from emo_lightning.model import (
    FULL,
    ArchConfig,
    EMOTransformer,
    ModelConfig,
    RouterConfig,
    Routing,
    flops_per_token,
    param_counts,
)

ROOT = Path(__file__).resolve().parents[2]


def tiny(kind: str = "emo", **arch) -> ModelConfig:
    a = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "expert_hidden": 16, "max_seq_len": 64}
    rc = RouterConfig(kind=kind, num_experts=8, num_shared=1, top_k=3, pool_min=2, pool_max=7, pool_eval=3)
    return ModelConfig(ArchConfig(**(a | arch)), rc)


def docs(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def test_output_contract() -> None:
    cfg = tiny()
    model = EMOTransformer(cfg)
    ids = torch.randint(0, 64, (2, 24))
    doc = torch.stack([docs([10, 10, 4]), docs([24])])
    out = model(ids, doc, return_routes=True)
    assert out.logits.shape == (2, 24, 64)
    assert out.lb_loss.requires_grad and out.z_loss.requires_grad
    torch.testing.assert_close(out.aux_loss, out.lb_loss + out.z_loss + out.lm_z_loss)
    lbs = torch.stack([layer.lb for layer in out.layers])
    torch.testing.assert_close(out.lb_loss, cfg.router.lb_weight / 2 * lbs.sum())
    assert len(out.layers) == 2
    for layer in out.layers:
        assert (
            layer.counts.shape == (7,) and layer.counts.sum() == 2 * 24 * 2 and not layer.counts.requires_grad
        )
        assert not layer.lb.requires_grad and not layer.z.requires_grad
        assert layer.pool_sizes.shape == (2, 24)
        assert (layer.pool_sizes[0, 3:] == -1).all() and (layer.pool_sizes[1, 1:] == -1).all()
        assert ((layer.pool_sizes[0, :3] >= 2) & (layer.pool_sizes[0, :3] <= 7)).all()
        assert layer.experts.shape == layer.weights.shape == (2, 24, 3)
        assert (layer.experts[..., 2] == 7).all(), "shared expert id is E'..E-1"
        assert (layer.weights[..., 2] == 1.0).all(), "shared expert gate must be exactly 1.0"
        assert (layer.experts[..., :2] < 7).all()
        assert layer.probs.shape == (2, 24, 7)
    assert model(ids, doc).layers[0].experts is None
    (out.logits.square().mean() + out.aux_loss).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    "arch", [{}, {"qk_norm": True}, {"n_kv_heads": 1, "n_heads": 4}, {"lm_head_z_weight": 1e-4}]
)
def test_param_counts_match_the_instantiated_model(arch: dict) -> None:
    for shared in (0, 1, 2):
        rc = RouterConfig(num_experts=8, num_shared=shared, top_k=3, pool_min=3 - shared, pool_max=8 - shared)
        cfg = ModelConfig(tiny(**arch).arch, rc)
        model = EMOTransformer(cfg)
        assert param_counts(cfg).total == sum(p.numel() for p in model.parameters())
    assert model(torch.randint(0, 64, (1, 8))).logits.shape == (1, 8, 64)


def test_paper_1b14b_budget_is_analytic() -> None:
    cfg = ModelConfig(
        ArchConfig(
            vocab_size=100352, d_model=2048, n_layers=16, n_heads=16, expert_hidden=1024, max_seq_len=4096
        ),
        RouterConfig(num_experts=128, num_shared=1, top_k=8, pool_min=8, pool_max=127, pool_eval=32),
    )
    p = param_counts(cfg)
    assert 13.5e9 < p.total < 13.7e9  # "about 13.6B total"
    assert 1.0e9 < p.active_non_embedding < 1.15e9  # "1.1B active"
    assert p.experts == 16 * 128 * 3 * 2048 * 1024
    f = flops_per_token(cfg, 4096)
    assert 6 * (p.active_non_embedding + p.lm_head) < f < 6 * p.active + 12 * 16 * 2048 * 4096


def test_document_masked_attention_has_no_cross_document_leakage() -> None:
    """Permuting whole documents of a row permutes the logits; with masking off the sanity check fails."""
    torch.manual_seed(0)
    lengths, perm = [6, 11, 4, 9], [2, 0, 3, 1]
    ids = torch.randint(0, 64, (1, 30))
    starts = torch.tensor([0, *lengths]).cumsum(0)
    src = torch.cat([torch.arange(starts[d], starts[d + 1]) for d in perm])
    doc, new_doc = docs(lengths)[None], docs([lengths[d] for d in perm])[None]
    for masked in (True, False):
        model = EMOTransformer(tiny(doc_attention_mask=masked)).eval()  # eval: fixed pool size
        with torch.no_grad():
            a, b = model(ids, doc).logits, model(ids[:, src], new_doc).logits
        close = torch.allclose(a[:, src], b, atol=1e-5, rtol=1e-4)
        assert close == masked
    # changing one document does not change another one's logits (masking on)
    model = EMOTransformer(tiny()).eval()
    other = ids.clone()
    other[0, starts[1] : starts[2]] = (other[0, starts[1] : starts[2]] + 1) % 64
    with torch.no_grad():
        a, b = model(ids, doc).logits, model(other, doc).logits
    keep = doc[0] != 1
    torch.testing.assert_close(a[0, keep], b[0, keep], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a[0, ~keep], b[0, ~keep])


def test_segments_come_from_boundaries_not_labels() -> None:
    """Any labelling with the same boundaries (global ids, -1 padding) routes and attends identically."""
    torch.manual_seed(4)
    model = EMOTransformer(tiny()).eval()
    ids = torch.randint(0, 64, (2, 24))
    canonical = torch.stack([docs([10, 10, 4]), docs([20, 4])])
    relabelled = torch.stack(
        [docs([10, 10, 4]) * 1000 + 7, torch.cat([torch.full((20,), 5), torch.full((4,), -1)])]
    )
    with torch.no_grad():
        a, b = model(ids, canonical, return_routes=True), model(ids, relabelled, return_routes=True)
    assert torch.equal(a.logits, b.logits)
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert torch.equal(la.experts, lb.experts) and torch.equal(la.pool_sizes, lb.pool_sizes)


def test_bf16_autocast_keeps_router_in_fp32() -> None:
    torch.manual_seed(5)
    model = EMOTransformer(tiny())
    ids, doc = torch.randint(0, 64, (2, 16)), docs([6, 10]).expand(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, doc, return_routes=True)
    assert out.logits.dtype == torch.bfloat16
    assert out.layers[0].weights.dtype == torch.float32 and out.layers[0].probs.dtype == torch.float32
    (out.logits.float().square().mean() + out.aux_loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_matches_sdpa_forward() -> None:
    """FlexAttention (the CUDA path) and SDPA with a dense mask agree (CPU flex has no backward)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(1)
    ids, doc = torch.randint(0, 64, (2, 32)), torch.stack([docs([7, 20, 5]), docs([32])])
    for masked in (True, False):
        cfg = tiny(doc_attention_mask=masked, n_kv_heads=1)
        model = EMOTransformer(cfg).eval()
        with torch.no_grad():
            ref = model(ids, doc).logits
            model.cfg.arch = dataclasses.replace(cfg.arch, attention_backend="flex")
            got = model(ids, doc).logits
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["emo", "standard"])
def test_tiny_model_overfits_one_batch(kind: str) -> None:
    torch.manual_seed(0)
    model = EMOTransformer(tiny(kind))
    ids = torch.randint(0, 64, (4, 32))
    doc = docs([10, 12, 10]).expand(4, 32)
    labels = ids.roll(-1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(80):
        out = model(ids, doc)
        ce = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
        opt.zero_grad()
        (ce + out.aux_loss).backward()
        opt.step()
    assert ce.item() < 0.1, f"{kind}: cross-entropy {ce.item():.3f} after 80 steps (starts at ~4.16)"


def test_load_balance_gradient_stays_inside_the_pool() -> None:
    """With one document and a pool of k' experts, the load balance (on the pool softmax, the reference) gives
    gradient to the pool's router rows only: the softmax is exactly 0 outside the pool."""
    cfg = tiny(n_layers=1)
    cfg.router = RouterConfig(**(cfg.router.__dict__ | {"pool_min": 2, "pool_max": 2}))
    model = EMOTransformer(cfg)
    out = model(torch.randint(0, 64, (1, 24)), torch.zeros(1, 24, dtype=torch.long), return_routes=True)
    out.lb_loss.backward()
    in_pool = out.layers[0].pool_mask[0, 0]  # (E',) the document's pool
    assert int(in_pool.sum()) == 2
    grad_norm = model.blocks[0].moe.router.weight.grad.norm(dim=-1)  # (E',)
    assert (grad_norm[in_pool] > 0).all()
    assert (grad_norm[~in_pool] == 0).all()


def test_eval_routing_can_be_unrestricted_and_then_equals_standard() -> None:
    torch.manual_seed(2)
    emo = EMOTransformer(tiny("emo")).eval()
    std = EMOTransformer(tiny("standard")).eval()
    std.load_state_dict(emo.state_dict())
    ids, doc = torch.randint(0, 64, (2, 20)), docs([5, 15]).expand(2, 20)
    with torch.no_grad():
        pooled = emo(ids, doc).logits
        with emo.routing(FULL):
            assert torch.equal(emo(ids, doc).logits, std(ids, doc).logits)
        assert torch.equal(emo(ids, doc).logits, pooled)  # the configured pool_eval is back
        with emo.routing(Routing("pool", 3)):
            assert torch.equal(emo(ids, doc).logits, pooled)


def test_reseeded_model_continues_exactly() -> None:
    """Resume = weights + ``reseed_routers(seed)``: a restored model reseeded like the original draws the same
    pools and computes the same logits (the generator itself is not checkpointed)."""
    torch.manual_seed(3)
    model = EMOTransformer(tiny())
    ids, doc = torch.randint(0, 64, (2, 32)), torch.arange(32).div(2, rounding_mode="floor").expand(2, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.reseed_routers(7)
    expected = model(ids, doc)
    restored = EMOTransformer(ModelConfig(tiny().arch, RouterConfig(**(vars(tiny().router) | {"seed": 123}))))
    restored.load_state_dict(state)
    assert any(
        not torch.equal(a.pool_sizes, b.pool_sizes)
        for a, b in zip(expected.layers, restored(ids, doc).layers, strict=True)
    ), "another seed should draw other pools"
    restored.reseed_routers(7)
    got = restored(ids, doc)
    for a, b in zip(expected.layers, got.layers, strict=True):
        assert torch.equal(a.pool_sizes, b.pool_sizes)
    assert torch.equal(expected.logits, got.logits)


def test_model_package_imports_without_lightning() -> None:
    code = (
        "import sys\n"
        "sys.modules['lightning'] = None\n"
        "sys.modules['pytorch_lightning'] = None\n"
        "import emo_lightning.model as m\n"
        "m.EMOTransformer(m.ModelConfig())\n"
        "assert 'lightning' not in [k for k, v in sys.modules.items() if v is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def _swiglu(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    g, u = (x @ w_in).chunk(2, dim=-1)
    return (F.silu(g) * u) @ w_out


@pytest.mark.parametrize("kind", ["emo", "standard"])
def test_capture_moe_matches_a_hand_computation(kind: str) -> None:
    """``capture_moe``: every layer's MoE input and output and each chosen expert's output norm, token by token."""
    torch.manual_seed(0)
    model = EMOTransformer(tiny(kind)).eval()
    ids = torch.randint(0, 64, (2, 12))
    doc = docs([5, 7]).expand(2, 12)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, output) of every MoE layer, by forward hooks
    hooks = [
        b.moe.register_forward_hook(lambda _m, args, out: seen.append((args[0], out[0])))
        for b in model.blocks
    ]
    with torch.no_grad(), model.routing(Routing("pool", 3)):
        plain = model(ids, doc, return_routes=True)
        out = model(ids, doc, return_routes=True, capture_moe=True)
    for h in hooks:
        h.remove()
    assert torch.equal(plain.logits, out.logits)  # capturing changes nothing
    assert all(lr.moe_input is None and lr.expert_norms is None for lr in plain.layers)  # not asked: nothing
    k = model.cfg.router.routed_k
    for layer, (blk, lr) in enumerate(zip(model.blocks, out.layers, strict=True)):
        h, y = seen[len(model.blocks) + layer]  # the captured forward's layer
        assert torch.equal(lr.moe_input, h) and torch.equal(lr.moe_output, y)
        assert lr.expert_norms.shape == (2, 12, k)
        w_in, w_out = blk.moe.experts.w_in, blk.moe.experts.w_out
        for b in range(2):
            for t in range(12):
                x = h[b, t]
                outs = [_swiglu(x, w_in[e], w_out[e]) for e in lr.experts[b, t, :k].tolist()]
                norms = torch.stack([o.norm() for o in outs])
                torch.testing.assert_close(lr.expert_norms[b, t], norms, rtol=1e-5, atol=1e-6)
                mixed = sum(w * o for w, o in zip(lr.weights[b, t, :k], outs, strict=True))
                mixed = mixed + _swiglu(x, blk.moe.shared.w_in, blk.moe.shared.w_out)
                torch.testing.assert_close(y[b, t], mixed, rtol=1e-5, atol=1e-6)
