"""One training step without Lightning, with ``EMOLitModule``'s arithmetic (benchmarks, the GPU check, scripts).

Per optimizer step: reset the step's global expert counts, forward (bf16 autocast when ``amp``: Lightning's
``bf16-mixed``) with the global load balance, the training objective (``model.losses.objective``), backward, the
selection-bias update of ``router.balance`` bias/both, gradient clipping at 1.0, AdamW and the schedule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from emo_lightning.model import EMOTransformer, GlobalLoadBalance, objective
from emo_lightning.optim import OptimConfig, build_optimizer


class TrainStep:
    """``step(batch)`` runs one optimizer step on ``batch`` (``input_ids``, ``labels``, ``doc_ids``: (B,S)) and
    returns the loss; ``loss(batch)`` / ``update()`` split it (to look at gradients in between)."""

    def __init__(
        self,
        model: EMOTransformer,
        optim: OptimConfig | None = None,
        amp: bool = False,
        total_steps: int = 10_000,
        clip: float = 1.0,
    ) -> None:
        self.model, self.amp, self.clip = model, amp, clip
        self.optimizer, self.scheduler = build_optimizer(
            model, optim or OptimConfig(warmup_steps=0), total_steps
        )
        self.balance = GlobalLoadBalance.for_model(model.cfg)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Forward and objective of one micro-batch (the step's counts restart here)."""
        self.balance.reset()
        dev = batch["input_ids"].device.type
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(batch["input_ids"], batch["doc_ids"], balance=self.balance, route_probs=False)
        loss, _, _ = objective(out.logits, batch["labels"], out.aux_loss)
        return loss

    def update(self) -> None:
        """Bias update, clipping, optimizer and schedule steps (after ``loss(...).backward()``)."""
        if self.model.cfg.router.uses_bias and self.balance.counts is not None:
            self.model.update_expert_bias(self.balance.counts)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, batch: dict[str, Tensor]) -> Tensor:
        loss = self.loss(batch)
        loss.backward()
        self.update()
        return loss.detach()
