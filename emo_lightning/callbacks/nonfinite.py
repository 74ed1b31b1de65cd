"""``NonFiniteGuard``: skip optimizer steps whose loss or gradients are not finite; stop after K in a row.

Per optimizer step (all its micro-batches): the loss terms the module exposes in ``pl_module.loss_terms``
(``CE``, ``LB``, ``z-loss``...) are checked before each backward, and the gradients' total norm before the
optimizer step. If anything is NaN/inf on *any* rank (``reduce_boolean_decision``), every gradient is dropped
(``p.grad = None``: AdamW leaves the weights, moments and step counts untouched), the module's LR-scheduler step
is skipped (``pl_module.skip_lr_scheduler_step``), the skip is counted (``train/nonfinite_steps``) and logged.
After ``max_consecutive`` skipped steps in a row, :class:`NonFiniteLossError` names the step and the offending
terms *before* any optimizer update, so no checkpoint ever receives NaN weights.

Under DeepSpeed the engine owns the gradients (``p.grad`` is not used): there the guard detects, counts and stops
but cannot drop a single step.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from emo_lightning.errors import ConfigError

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient."""


class NonFiniteGuard(Callback):
    """Skip optimizer steps with a non-finite loss or gradient; raise after ``max_consecutive`` in a row.

    Args:
        max_consecutive: consecutive skipped steps tolerated (K); the K-th raises ``NonFiniteLossError``.
    """

    def __init__(self, max_consecutive: int = 3) -> None:
        if max_consecutive < 1:
            raise ConfigError("nonfinite.max_consecutive", f"must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0  # total skipped optimizer steps (this run)
        self.consecutive = 0
        self._bad_terms: dict[str, float] = {}
        self._bad_grad: str | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int
    ) -> None:
        if idx % trainer.accumulate_grad_batches == 0:  # first micro-batch of an optimizer step
            self._bad_terms, self._bad_grad = {}, None

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        terms: dict[str, torch.Tensor] = dict(getattr(pl_module, "loss_terms", None) or {})
        terms.setdefault("loss", loss.detach())
        for name, value in terms.items():
            v = float(value)
            if not math.isfinite(v):
                self._bad_terms[name] = v

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not self._bad_terms and params:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], error_if_nonfinite=False)
            if not torch.isfinite(norm):
                self._bad_grad = next(
                    (
                        n
                        for n, p in pl_module.named_parameters()
                        if p.grad is not None and not p.grad.isfinite().all()
                    ),
                    "?",
                )
        local = bool(self._bad_terms) or self._bad_grad is not None
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            self.consecutive = 0
            return
        step = trainer.global_step
        self.skipped += 1
        self.consecutive += 1
        what = self._describe(local)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive optimizer steps with non-finite values (last: step {step}): "
                f"{what}; stopped before updating the weights (no NaN weights were saved)"
            )
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        pl_module.skip_lr_scheduler_step = True
        log.warning(
            "step %d skipped: %s (%d in a row, %d skipped in total; the run stops at %d in a row)",
            step,
            what,
            self.consecutive,
            self.skipped,
            self.max_consecutive,
        )

    def _describe(self, local: bool) -> str:
        if self._bad_terms:
            terms = ", ".join(f"{k}={v}" for k, v in self._bad_terms.items() if k != "loss")
            return f"non-finite loss term(s) {terms or 'loss=' + str(self._bad_terms['loss'])}"
        if self._bad_grad is not None:
            return f"non-finite gradient (loss terms finite), first in {self._bad_grad}"
        return "non-finite loss or gradient on another rank" if not local else "non-finite values"

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pl_module.log("train/nonfinite_steps", float(self.skipped), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
