"""Non-finite losses and gradients injected through a real forward/backward: skipped steps leave weights,
optimizer state and LR schedule untouched; K in a row stop the run naming the step and the term."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from emo_lightning.callbacks.nonfinite import NonFiniteGuard, NonFiniteLossError
from emo_lightning.callbacks.safe_checkpoint import SafeModelCheckpoint

NAN = float("nan")


class Poison(L.Callback):
    """Makes one term non-finite for the micro-batches ``batch_idx`` in ``batches`` (``None``: from ``start`` on).

    ``lb``: the load-balance weight becomes inf (LB = inf * lb); ``ce``: the LM-head output becomes NaN;
    ``grad``: a backward hook turns one weight's gradient into NaN (every loss term stays finite).
    """

    def __init__(self, kind: str, batches: set[int] | None = None, start: int = 0) -> None:
        self.kind, self.batches, self.start = kind, batches, start
        self._undo = None

    def _hit(self, batch_idx: int) -> bool:
        return batch_idx in self.batches if self.batches is not None else batch_idx >= self.start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._hit(batch_idx):
            return
        model = pl_module.model
        if self.kind == "lb":
            router = model.cfg.router
            model.cfg.router = dataclasses.replace(router, lb_weight=math.inf)
            self._undo = lambda: setattr(model.cfg, "router", router)
        elif self.kind == "ce":
            self._undo = model.lm_head.register_forward_hook(lambda m, i, out: out * NAN).remove
        else:
            self._undo = model.blocks[0].attn.q_proj.weight.register_hook(lambda g: g * NAN).remove

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None


class Snapshots(L.Callback):
    """Weights, buffers and AdamW step counts at the start of every optimizer step."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.buffers: dict[int, dict[str, torch.Tensor]] = {}
        self.adam_steps: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step not in self.weights:
            self.weights[step] = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
            self.buffers[step] = {k: v.detach().clone() for k, v in pl_module.model.named_buffers()}
            state = trainer.optimizers[0].state.get(pl_module.model.lm_head.weight, {})
            self.adam_steps[step] = float(state.get("step", 0))


def test_a_transient_nonfinite_step_is_skipped(make_shards, tiny) -> None:
    tiny_module, tiny_data, tiny_trainer = tiny
    guard, snaps = NonFiniteGuard(max_consecutive=3), Snapshots()
    # accumulation 2: only the first micro-batch of step 2 (batch 4) is poisoned, the whole step is skipped
    trainer = tiny_trainer(5, [Poison("lb", batches={4}), guard, snaps], accumulate_grad_batches=2)
    module = tiny_module()
    trainer.fit(module, datamodule=tiny_data(make_shards(10)))
    assert trainer.global_step == 5 and guard.skipped == 1
    for name, before in snaps.weights[2].items():
        assert torch.equal(snaps.weights[3][name], before), name  # step 2 changed nothing
    assert snaps.adam_steps[3] == snaps.adam_steps[2] == 2.0 and snaps.adam_steps[4] == 3.0
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4  # 5 steps, 1 skipped: not advanced
    assert trainer.callback_metrics["train/nonfinite_steps"] == 1
    assert all(p.isfinite().all() for p in module.parameters())
    assert any(
        not torch.equal(snaps.weights[4][n], w) for n, w in snaps.weights[3].items()
    )  # later steps train


def test_a_skipped_step_leaves_the_selection_bias_alone(make_shards, tiny) -> None:
    """``router.balance: both``: the bias moves at every optimizer step except the one the guard skips."""
    tiny_module, tiny_data, tiny_trainer = tiny
    guard, snaps = NonFiniteGuard(max_consecutive=3), Snapshots()
    trainer = tiny_trainer(5, [Poison("ce", batches={2}), guard, snaps])
    module = tiny_module(balance="both", bias_gamma=0.05)
    trainer.fit(module, datamodule=tiny_data(make_shards(10)))
    assert guard.skipped == 1
    bias = {
        step: torch.stack([w[k] for k in sorted(w) if k.endswith("expert_bias")])
        for step, w in snaps.buffers.items()
    }
    assert torch.equal(bias[3], bias[2])  # the skipped step 2
    for step in (0, 1, 3):
        assert not torch.equal(bias[step + 1], bias[step]), step  # every other step moves it
    assert all(b.isfinite().all() for b in bias.values())


@pytest.mark.parametrize(
    ("kind", "k", "expected"),
    [
        ("lb", 3, r"3 consecutive optimizer steps with non-finite values \(last: step 4\): non-finite loss term\(s\) LB=inf"),
        ("ce", 2, r"2 consecutive .* \(last: step 3\): non-finite loss term\(s\) CE=nan"),
        ("grad", 1, r"1 consecutive .* \(last: step 2\): non-finite gradient \(loss terms finite\), first in "
         r"model\.blocks\.0\.attn\.q_proj\.weight"),
    ],
)  # fmt: skip
def test_k_consecutive_nonfinite_steps_stop_naming_step_and_term(
    tmp_path: Path, make_shards, tiny, kind: str, k: int, expected: str
) -> None:
    tiny_module, tiny_data, tiny_trainer = tiny
    ckpts = tmp_path / "ckpts"
    callbacks = [
        Poison(kind, start=2),  # from step 2 on (accumulation 1: batch index = step)
        NonFiniteGuard(max_consecutive=k),
        SafeModelCheckpoint(dirpath=ckpts, save_last=True, every_n_train_steps=1),
    ]
    module = tiny_module()
    with pytest.raises(NonFiniteLossError, match=expected) as err:
        tiny_trainer(10, callbacks).fit(module, datamodule=tiny_data(make_shards(10)))
    if kind != "grad":
        assert "z-loss" not in str(err.value) and ("LB" in str(err.value)) == (kind == "lb")
    assert all(p.isfinite().all() for p in module.parameters())
    saved = torch.load(ckpts / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2 + k - 1  # skipped steps still advance the step counter
    assert all(t.isfinite().all() for t in saved["state_dict"].values() if isinstance(t, torch.Tensor))
