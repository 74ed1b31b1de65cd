"""Load balance (global over data-parallel ranks and micro-batches) and z-loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emo_lightning.model import (
    ArchConfig,
    EMOTransformer,
    GlobalLoadBalance,
    ModelConfig,
    RouterConfig,
    load_balance,
    z_loss,
)
from tests.gloo import run_gloo
from tests.model import dist_worker


def tiny_config(**router) -> ModelConfig:
    arch = ArchConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, expert_hidden=16, max_seq_len=32)
    # fixed pool size in training, so that the same documents route identically however the batch is split
    rc = {
        "num_experts": 8,
        "num_shared": 1,
        "top_k": 3,
        "pool_min": 4,
        "pool_max": 4,
        "pool_eval": 4,
    } | router
    return ModelConfig(arch, RouterConfig(**rc))


def make_batch(b: int, s: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (b, s), generator=gen)
    doc = torch.arange(s).div(5, rounding_mode="floor").expand(b, s).contiguous()
    labels = torch.randint(0, 64, (b, s), generator=gen)
    return {"input_ids": ids, "doc_ids": doc, "labels": labels}


def test_lb_is_one_at_perfect_balance() -> None:
    e, k, tokens = 12, 3, 40  # 120 slots, 10 per expert
    counts = torch.full((2, e), tokens * k // e)
    pbar = torch.rand(2, e).softmax(-1)  # any mean scores (they sum to 1)
    torch.testing.assert_close(load_balance(counts, tokens, pbar, k), torch.ones(2))
    gb = GlobalLoadBalance(n_layers=2, n_experts=e, top_k=k)
    gb.update(counts, pbar, tokens)
    torch.testing.assert_close(gb.step_lb(), torch.ones(2, dtype=torch.float64))
    # collapse: every slot on expert 0 and all score mass there gives E'
    collapsed = torch.zeros(e)
    collapsed[0] = tokens * k
    onehot = torch.zeros(e)
    onehot[0] = 1.0
    assert load_balance(collapsed, tokens, onehot, k) == pytest.approx(e)


def test_lb_formula_and_gradient_path() -> None:
    counts = torch.tensor([5.0, 1.0, 0.0, 2.0])
    pbar = torch.tensor([0.4, 0.3, 0.2, 0.1], requires_grad=True)
    lb = load_balance(counts, 4, pbar, 2)  # (E'/k') * sum C_e Pbar_e / D
    assert lb.item() == pytest.approx((4 / 2) * (5 * 0.4 + 1 * 0.3 + 0 + 2 * 0.1) / 4)
    (g,) = torch.autograd.grad(lb, pbar)
    torch.testing.assert_close(g, (4 / 2) * counts / 4)


def test_z_loss_on_masked_logits() -> None:
    z = torch.tensor([[1.0, 2.0, float("-inf")], [0.0, float("-inf"), float("-inf")]])
    expected = (torch.log(torch.exp(torch.tensor(1.0)) + torch.exp(torch.tensor(2.0))) ** 2 + 0.0) / 2
    assert z_loss(z).item() == pytest.approx(expected.item())


def test_micro_batch_accumulation_matches_one_big_batch() -> None:
    cfg = tiny_config()
    model = EMOTransformer(cfg)
    batch = make_batch(4, 20)
    big = model(batch["input_ids"], batch["doc_ids"])
    big_counts = torch.stack([layer.counts for layer in big.layers])
    big_lb = torch.stack([layer.lb for layer in big.layers])
    gb = GlobalLoadBalance.for_model(cfg)
    gb.reset()
    first = model(batch["input_ids"][:2], batch["doc_ids"][:2], balance=gb)
    counts_1, pbar_sum_1 = gb.counts.clone(), gb.pbar_sum.clone()
    last = model(batch["input_ids"][2:], batch["doc_ids"][2:], balance=gb)
    assert torch.equal(gb.counts, big_counts.double()) and gb.tokens.item() == 80
    torch.testing.assert_close(gb.step_lb(), big_lb.double(), atol=1e-6, rtol=1e-5)
    # the last micro-batch's LB uses the whole step's counts; the first one the counts seen so far (its own)
    pbar_1, pbar_2 = pbar_sum_1 / 40, (gb.pbar_sum - pbar_sum_1) / 40
    lb_1 = torch.stack([layer.lb for layer in first.layers]).double()
    lb_2 = torch.stack([layer.lb for layer in last.layers]).double()
    torch.testing.assert_close(lb_1, load_balance(counts_1, 40.0, pbar_1, 2), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lb_2, load_balance(gb.counts, 80.0, pbar_2, 2), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gb.fractions().sum(-1), torch.full((2,), 2.0, dtype=torch.float64))
    gb.reset()
    assert gb.counts is None and gb.tokens is None


def _single_process_reference(cfg: ModelConfig, state: dict, batch: dict, balance: bool):
    model = EMOTransformer(cfg)
    model.load_state_dict(state)
    gb = GlobalLoadBalance.for_model(cfg) if balance else None
    loss, out = dist_worker.step(model, batch, gb)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return loss, grads, out


@pytest.mark.distributed
def test_counts_reduced_over_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    # "both": the auxiliary loss, and the selection bias stepped from the same global counts
    cfg = tiny_config(lb_weight=1.0, z_weight=0.01, balance="both", bias_gamma=0.01)
    torch.manual_seed(0)
    model = EMOTransformer(cfg)
    batch = make_batch(4, 20, seed=1)
    dp = run_gloo(dist_worker.run, {"cfg": cfg, "state": model.state_dict(), "batch": batch}, tmp_path)
    loss, grads, out = _single_process_reference(cfg, model.state_dict(), batch, balance=True)
    assert torch.equal(dp["counts"], torch.stack([layer.counts for layer in out.layers]).double())
    whole = EMOTransformer(cfg)
    whole.update_expert_bias(torch.stack([layer.counts for layer in out.layers]))
    assert torch.equal(dp["bias"], torch.stack([r.expert_bias for r in whole.routers()]))
    assert dp["bias"].abs().sum() > 0  # the step moved the bias
    assert dp["tokens"].item() == 80
    torch.testing.assert_close(
        dp["lb"], torch.stack([layer.lb for layer in out.layers]), atol=1e-6, rtol=1e-5
    )
    torch.testing.assert_close(dp["loss"], loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dp["grads"], grads, atol=1e-6, rtol=1e-4)
    # sanity: a per-rank (local) balance loss would give different gradients
    local_grads = []
    for r in range(2):
        half = {k: v[2 * r : 2 * r + 2] for k, v in batch.items()}
        local_grads.append(_single_process_reference(cfg, model.state_dict(), half, balance=False)[1])
    assert not torch.allclose((local_grads[0] + local_grads[1]) / 2, grads, atol=1e-6, rtol=1e-4)
