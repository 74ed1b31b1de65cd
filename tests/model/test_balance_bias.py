"""Auxiliary-loss-free balancing: the bias chooses experts but never weighs them, its update moves a skewed
router toward balance, and the default (``aux_loss``) router is unchanged."""

from __future__ import annotations

import pytest
import torch

from emo_lightning.model import ArchConfig, EMOTransformer, ModelConfig, Router, RouterConfig


def _router(balance: str, kind: str = "emo", scope: str = "document", gamma: float = 0.05) -> Router:
    cfg = RouterConfig(kind=kind, num_experts=9, num_shared=1, top_k=3, pool_min=3, pool_max=6, pool_eval=4,
                       pool_scope=scope, balance=balance, bias_gamma=gamma)  # fmt: skip
    router = Router(cfg, 16)
    with torch.no_grad():
        router.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    return router.eval()


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 40, 16, generator=g), torch.arange(40).div(10, rounding_mode="floor").expand(2, 40)


@pytest.mark.parametrize(
    ("kind", "scope"), [("emo", "document"), ("emo", "running"), ("standard", "document")]
)
def test_aux_loss_router_is_unchanged_and_a_zero_bias_changes_nothing(kind: str, scope: str) -> None:
    h, doc = _inputs()
    plain, biased = _router("aux_loss", kind, scope), _router("bias", kind, scope)
    assert "expert_bias" not in plain.state_dict()  # checkpoints of the default router keep their keys
    assert "expert_bias" in biased.state_dict()
    a, b = plain(h, doc), biased(h, doc)
    for name in ("experts", "weights", "scores", "counts", "pool_sizes", "logits"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def _reference_routes(router: Router, h: torch.Tensor, doc: torch.Tensor, scope: str) -> tuple:
    """An independent recomputation, one document and token at a time: the pool is the top-P of the summed
    softmax of logits + bias (over the document, or its prefix for running pools); the experts are the top-k' of
    logits + bias inside the pool; their gate weights the softmax of the raw logits inside the pool (no bias)."""
    b, s, _ = h.shape
    logits = (h.reshape(b * s, -1) @ router.weight.T).double()  # (N,E')
    bias = router.expert_bias.double()
    pool_size = (
        router.pool_eval if router.kind == "emo" and router.pool_eval is not None else router.num_routed
    )
    experts, weights = [], []
    flat_doc = doc.reshape(-1)
    row = torch.arange(b * s) // s
    for t in range(b * s):
        same = (row == row[t]) & (flat_doc == flat_doc[t])
        if scope == "running":
            same &= torch.arange(b * s) <= t
        pref = (logits[same] + bias).softmax(-1).sum(0)  # (E',)
        pool = torch.zeros(router.num_routed, dtype=torch.bool)
        pool[pref.argsort(descending=True)[:pool_size]] = True
        gate = logits[t].masked_fill(~pool, float("-inf")).softmax(-1)  # no bias in the weights
        chosen = (logits[t] + bias).masked_fill(~pool, float("-inf")).topk(router.routed_k).indices
        w, order = gate[chosen].sort(descending=True)
        experts.append(chosen[order])
        weights.append(w)
    return torch.stack(experts), torch.stack(weights).float()


@pytest.mark.parametrize(
    ("kind", "scope"), [("emo", "document"), ("emo", "running"), ("standard", "document")]
)
def test_the_bias_chooses_experts_but_never_weighs_them(kind: str, scope: str) -> None:
    h, doc = _inputs()
    plain, biased = _router("aux_loss", kind, scope), _router("bias", kind, scope)
    biased.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, -1.0]))  # favour 5, disfavour 7
    ref, out = plain(h, doc), biased(h, doc)
    assert (out.experts == 5).sum() > (ref.experts == 5).sum()  # chosen more often
    assert not torch.equal(out.experts, ref.experts)
    experts, weights = _reference_routes(biased, h, doc, scope)
    assert torch.equal(out.experts, experts)
    torch.testing.assert_close(out.weights, weights, rtol=1e-5, atol=1e-6)
    assert (out.weights[:, :-1] >= out.weights[:, 1:]).all()  # by descending weight, as documented


def test_the_update_moves_a_skewed_router_toward_balance() -> None:
    router = _router("bias", kind="standard", gamma=0.05)
    u = torch.zeros(16)
    u[0] = 1.0
    with torch.no_grad():
        router.weight[0] += 2.0 * u  # expert 0's logit is ~2 above the others for these tokens
    h, doc = _inputs(3)
    h = h + u

    def imbalance() -> float:
        counts = router(h, doc).counts.double()
        return float(counts.max() / counts.mean())

    start = imbalance()
    assert start > 1.7
    for _ in range(60):
        router.update_bias(router(h, doc).counts)
    assert imbalance() < 1.2 < start
    assert router.expert_bias[0] < -1.0  # the over-used expert was pushed down
    assert abs(float(router.expert_bias.mean())) < 1e-6  # re-centred to zero mean
    before = router.expert_bias.clone()
    router.update_bias(torch.full((8,), 5.0))  # balanced counts: sign 0 everywhere, no move
    torch.testing.assert_close(router.expert_bias, before, atol=1e-6, rtol=0)


def test_bias_only_balance_has_no_auxiliary_loss_gradient() -> None:
    arch = ArchConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, expert_hidden=8, max_seq_len=32)
    for balance, has_loss in (("bias", False), ("both", True), ("aux_loss", True)):
        router = RouterConfig(num_experts=9, num_shared=1, top_k=3, balance=balance)
        torch.manual_seed(0)
        out = EMOTransformer(ModelConfig(arch, router))(torch.randint(0, 64, (2, 16)))
        assert (out.lb_loss.item() != 0) == has_loss, balance
        assert all(layer.lb > 0 for layer in out.layers)  # still measured (logged)


def test_invalid_balance_options_are_named() -> None:
    with pytest.raises(ValueError, match=r"router\.balance"):
        RouterConfig(balance="loss-free")
    with pytest.raises(ValueError, match=r"router\.bias_gamma"):
        RouterConfig(balance="bias", bias_gamma=0.0)
