"""The LightningModule: losses, parameter groups, global balance over the step, and exact resume."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from emo_lightning.data import ShardDataModule
from emo_lightning.errors import ConfigError
from emo_lightning.lit_module import EMOLitModule
from emo_lightning.model import per_expert_key
from emo_lightning.optim import OptimConfig, parameter_groups, warmup_cosine
from emo_lightning.training import TrainStep
from tests.factories import tiny_lit_module


def tiny_data(shards: dict[str, Path], with_val: bool = False, batch_size: int = 4) -> ShardDataModule:
    return ShardDataModule(
        train_shards=str(shards["train"]),
        val_shards=str(shards["val"]) if with_val else None,
        seq_len=64,
        batch_size=batch_size,
        num_workers=0,
        shuffle_buffer=50,
        seed=3,
    )


def fit(tmp: Path, shards, max_steps: int, ckpt_path: str | None = None, accumulate: int = 2) -> EMOLitModule:
    L.seed_everything(0)
    module = tiny_lit_module()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=1.0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[ModelCheckpoint(dirpath=tmp, save_last=True, every_n_train_steps=1, save_top_k=0)],
    )
    trainer.fit(module, datamodule=tiny_data(shards), ckpt_path=ckpt_path)
    return module


def test_resume_is_exact(tmp_path: Path, tiny_shards) -> None:
    """2N steps in one run == N steps, then resume from last.ckpt for N more (weights, within float tolerance)."""
    straight = fit(tmp_path / "a", tiny_shards, max_steps=4)
    fit(tmp_path / "b", tiny_shards, max_steps=2)
    resumed = fit(tmp_path / "b", tiny_shards, max_steps=4, ckpt_path="last")
    ref, got = straight.state_dict(), resumed.state_dict()
    assert ref.keys() == got.keys()
    for name, tensor in ref.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    # and training moved the weights at all (the comparison is not between two initialisations)
    fresh = tiny_lit_module()
    fresh.configure_model()
    init = fresh.state_dict()
    assert not torch.allclose(init["model.lm_head.weight"], ref["model.lm_head.weight"])


def test_parameter_groups_exclude_embeddings_and_norms() -> None:
    module = tiny_lit_module()
    module.configure_model()
    decay, no_decay = parameter_groups(module.model, weight_decay=0.1)
    no_decay_ids = {id(p) for p in no_decay["params"]}
    for name, param in module.model.named_parameters():
        expect_no_decay = param.ndim < 2 or "embed" in name
        assert (id(param) in no_decay_ids) == expect_no_decay, name
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == sum(p.numel() for p in module.model.parameters())


def test_schedule_warms_up_then_decays_to_floor() -> None:
    values = [warmup_cosine(s, warmup_steps=10, decay_steps=100, min_lr_ratio=0.1) for s in range(120)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))
    assert values[100] == pytest.approx(0.1) and values[119] == pytest.approx(0.1)


def test_balance_counts_accumulate_over_the_optimizer_step(tiny_shards) -> None:
    """The balance state holds the counts of every micro-batch of the current step, and resets per step."""
    module = tiny_lit_module()
    seen: list[float] = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(pl_module.balance.tokens))

    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, accumulate_grad_batches=3, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0, callbacks=[Spy()],
    )  # fmt: skip
    trainer.fit(module, datamodule=tiny_data(tiny_shards))
    per_batch = 4 * 64
    assert seen == [per_batch, 2 * per_batch, 3 * per_batch] * 2


def test_validation_logs_per_domain_loss_and_perplexity(tiny_shards) -> None:
    """``val/<domain>/loss`` is the mean cross-entropy of that domain's target tokens (recomputed here from the
    same batches), ``val/<domain>/ppl`` its exp, and the domains' token-weighted mean is ``val/ce``."""
    L.seed_everything(0)
    module = tiny_lit_module()
    module.configure_model()
    # confident random predictions: per-token losses far apart, so that a wrong weighting shows
    with torch.no_grad():
        module.model.lm_head.weight.mul_(50.0)
    # the whole validation set (every domain); 17 rows: the last batch is part-full (token weighting matters)
    data = tiny_data(tiny_shards, with_val=True, batch_size=17)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False,
    )  # fmt: skip
    metrics = trainer.validate(module, datamodule=data)[0]
    loss_sum: dict[str, float] = {}
    tokens: dict[str, int] = {}
    module.eval()
    with torch.no_grad():
        for batch in data.val_dataloader():
            ce = F.cross_entropy(
                module(batch).logits.flatten(0, 1), batch["labels"].flatten(), reduction="none"
            )
            for d in set(batch["domain_ids"].unique().tolist()) - {-1}:  # -1: padding
                target = (batch["domain_ids"] == d).flatten() & (batch["labels"] != -100).flatten()
                name = data.domains[d]
                loss_sum[name] = loss_sum.get(name, 0.0) + float(ce[target].double().sum())
                tokens[name] = tokens.get(name, 0) + int(target.sum())
    logged = {k.split("/")[1] for k in metrics if k.count("/") == 2}
    assert logged == set(data.domains) == {name for name, n in tokens.items() if n > 0}, metrics
    for name in logged:
        loss = metrics[f"val/{name}/loss"]
        assert loss == pytest.approx(loss_sum[name] / tokens[name], rel=1e-5), name
        assert metrics[f"val/{name}/ppl"] == pytest.approx(math.exp(loss), rel=1e-6), name
    weighted = sum(metrics[f"val/{n}/loss"] * tokens[n] for n in logged) / sum(tokens[n] for n in logged)
    assert metrics["val/ce"] == pytest.approx(weighted, rel=1e-5)
    assert math.log(metrics["val/ppl"]) == pytest.approx(metrics["val/ce"], abs=1e-5)


def bias_fit(tmp: Path, shards, max_steps: int, ckpt_path: str | None = None, spy=None) -> EMOLitModule:
    """A tiny run balanced by the selection bias only (``router.balance: bias``), 3 micro-batches per step."""
    L.seed_everything(0)
    module = tiny_lit_module(balance="bias", bias_gamma=0.01)
    if spy is not None:
        module.configure_model()
        forward = module.model.forward

        def recording(*args, **kwargs):
            out = forward(*args, **kwargs)
            spy.append(torch.stack([layer.counts for layer in out.layers]))  # (L,E') this micro-batch
            return out

        module.model.forward = recording
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0, accumulate_grad_batches=3,
        callbacks=[ModelCheckpoint(dirpath=tmp, save_last=True, every_n_train_steps=1, save_top_k=0)],
    )  # fmt: skip
    trainer.fit(module, datamodule=tiny_data(shards), ckpt_path=ckpt_path)
    return module


def test_the_bias_steps_once_per_optimizer_step_from_all_micro_batches(tmp_path: Path, tiny_shards) -> None:
    """After 2 optimizer steps of 3 micro-batches, each router's bias is gamma * sign(mean - counts) of step 1's
    summed counts plus the same of step 2's, re-centred: once per step, from every micro-batch."""
    seen: list[torch.Tensor] = []
    module = bias_fit(tmp_path, tiny_shards, 2, spy=seen)
    assert len(seen) == 6
    expected = torch.zeros_like(seen[0], dtype=torch.float64)  # (L,E')
    for step in range(2):
        counts = sum(seen[3 * step : 3 * step + 3]).double()  # the whole step
        expected += 0.01 * torch.sign(counts.mean(-1, keepdim=True) - counts)
        expected -= expected.mean(-1, keepdim=True)
    got = torch.stack([r.expert_bias for r in module.model.routers()]).double()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert got.abs().sum() > 0


def test_resume_with_the_bias_is_exact(tmp_path: Path, tiny_shards) -> None:
    straight = bias_fit(tmp_path / "a", tiny_shards, 4)
    bias_fit(tmp_path / "b", tiny_shards, 2)
    resumed = bias_fit(tmp_path / "b", tiny_shards, 4, ckpt_path="last")
    ref, got = straight.state_dict(), resumed.state_dict()
    assert any("expert_bias" in k for k in ref)
    for name, tensor in ref.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert straight.model.routers()[0].expert_bias.abs().sum() > 0


def test_trainable_experts_updates_only_the_routed_experts() -> None:
    """``optim.trainable: experts`` (a module update for ``emo-experts merge``): one optimizer step changes every
    routed expert weight and leaves every other parameter bit-identical."""
    module = tiny_lit_module()
    module.configure_model()
    model = module.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = TrainStep(model, OptimConfig(lr=1e-2, warmup_steps=0, trainable="experts"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.arch.vocab_size, (2, 32), generator=g)
    batch = {"input_ids": ids, "doc_ids": torch.zeros_like(ids), "labels": ids.roll(-1, 1)}
    step.step(batch)
    after = model.state_dict()
    expert_keys = {k for k in before if (w := per_expert_key(k)) is not None and w[1].startswith("experts.")}
    assert expert_keys, "no routed expert weights found"
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        assert changed == (key in expert_keys), key
    with pytest.raises(ConfigError, match=r"optim\.trainable"):
        OptimConfig(trainable="router")
