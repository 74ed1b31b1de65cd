"""Training tokens per domain in TensorBoard, so a run shows its domain mixture (``data.mix``) being honoured."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from emo_lightning.errors import ConfigError


class DomainTokenMonitor(Callback):
    """Every ``log_every_n_steps`` optimizer steps, logs for every domain of the datamodule:

    * ``data/tokens/<domain>``: training tokens of that domain so far, summed over all ranks;
    * ``data/token_share/<domain>``: its share of all training tokens so far (padding excluded);
    * ``data/mix/<domain>``: the target share when the datamodule samples by ``mix``.

    Counting is one ``bincount`` of the batch's ``domain_ids`` on the device (no host synchronisation); ranks
    are summed only when logging. The totals are saved in checkpoints, so a resumed run continues its curves.
    """

    def __init__(self, log_every_n_steps: int = 50) -> None:
        if log_every_n_steps < 1:
            raise ConfigError("domain_tokens.log_every_n_steps", f"must be >= 1, got {log_every_n_steps}")
        self.log_every_n_steps = log_every_n_steps
        self.domains: list[str] = []
        self.totals: torch.Tensor | None = None  # (D,) int64 on the CPU: all ranks, logged windows
        self._restored: dict[str, int] = {}  # domain -> tokens, from a checkpoint
        self._window: torch.Tensor | None = None  # (D+1,) int64 on the device: this rank, bin 0 = padding
        self._last_logged = -1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.domains = list(getattr(getattr(trainer, "datamodule", None), "domains", None) or [])
        n = len(self.domains)
        self.totals = torch.tensor([self._restored.get(name, 0) for name in self.domains], dtype=torch.long)
        self._window = torch.zeros(n + 1, dtype=torch.long, device=pl_module.device)
        self._last_logged = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (
            self._window is None
            or not self.domains
            or not isinstance(batch, dict)
            or "domain_ids" not in batch
        ):
            return
        ids = batch["domain_ids"].reshape(-1) + 1  # (B*S,): padding (-1) -> bin 0
        self._window += torch.bincount(ids, minlength=len(self._window))[: len(self._window)]
        step = trainer.global_step
        if step != self._last_logged and step % self.log_every_n_steps == 0:
            self._last_logged = step
            self._flush(trainer, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._window is not None and self.domains:
            self._flush(trainer, trainer.global_step)

    def _flush(self, trainer: L.Trainer, step: int) -> None:
        assert self._window is not None and self.totals is not None
        window = trainer.strategy.reduce(self._window.clone(), reduce_op="sum")  # every rank calls this
        self.totals += window[1:].cpu()
        self._window.zero_()
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.scalars(trainer), step=step)

    def scalars(self, trainer: L.Trainer | None = None) -> dict[str, float]:
        """The values logged at a window's end."""
        assert self.totals is not None
        total = max(int(self.totals.sum()), 1)
        out: dict[str, float] = {}
        for name, n in zip(self.domains, self.totals.tolist(), strict=True):
            out[f"data/tokens/{name}"] = float(n)
            out[f"data/token_share/{name}"] = n / total
        mix = getattr(getattr(trainer, "datamodule", None), "mix", None)
        if mix:
            weight = sum(mix.values())
            out.update({f"data/mix/{name}": mix.get(name, 0.0) / weight for name in self.domains})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"domains": self.domains, "totals": [] if self.totals is None else self.totals.tolist()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the totals (matched by domain name when the run starts)."""
        self._restored = dict(zip(state_dict.get("domains", []), state_dict.get("totals", []), strict=False))
