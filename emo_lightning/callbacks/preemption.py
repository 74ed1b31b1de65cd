"""``PreemptionCheckpoint``: on SIGTERM / SIGUSR1 (SLURM preemption), finish the optimizer step, save ``last``, exit.

Lightning 2.6's own SIGTERM handling sets ``trainer.received_sigterm`` and raises ``SIGTERMException`` at the end
of the current *micro-batch* without saving anything; its SLURM SIGUSR1 handler saves an ``hpc_ckpt`` from inside
the signal handler (possibly in the middle of a step) and needs ``scontrol``. This callback replaces both handlers
once training starts: the handler only records the signal (and forwards it to launcher-started child processes,
as Lightning's does); at the next optimizer-step boundary every rank agrees (``reduce_boolean_decision``), the
checkpoint callback's ``last.ckpt`` is written (atomically, by ``SafeModelCheckpoint``'s IO) and
``SIGTERMException`` ends ``fit`` with exit status 0. ``emo fit --ckpt_path last`` then resumes at that step and
data position exactly. A signal during validation is acted on after the next training step.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from emo_lightning.errors import ConfigError

log = logging.getLogger(__name__)


class PreemptionCheckpoint(Callback):
    """Save ``last.ckpt`` and stop cleanly when one of ``signals`` arrives.

    Args:
        signals: signal names to handle (default SIGTERM and SIGUSR1, SLURM's ``--signal=USR1@90``).
        requeue: on SIGUSR1 inside a SLURM job, rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` after saving.
    """

    def __init__(self, signals: list[str] | None = None, requeue: bool = True) -> None:
        self.signals = list(signals) if signals is not None else ["SIGTERM", "SIGUSR1"]
        for name in self.signals:
            if not isinstance(getattr(signal, name, None), signal.Signals):
                raise ConfigError("preemption.signals", f"unknown signal {name!r} (e.g. SIGTERM, SIGUSR1)")
        self.requeue = requeue
        self.received: int | None = None
        self.saved_path: str | None = None
        self._previous: dict[int, Any] = {}
        self._trainer: L.Trainer | None = None

    # ------------------------------------------------------------------ handlers
    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None and self._trainer is not None:
            launcher = self._trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)  # children started by Lightning get the signal too
        self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._trainer = trainer
        for name in self.signals:
            signum = getattr(signal, name)
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    # ------------------------------------------------------------------ acting at a step boundary
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        lightning_stops = trainer.received_sigterm  # Lightning raises at the end of this micro-batch anyway
        if not lightning_stops and _accumulating(trainer):
            return
        signalled = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if not (signalled or lightning_stops):
            return
        name = signal.Signals(self.received).name if self.received is not None else "SIGTERM"
        path = self._save(trainer)
        log.warning(
            "%s received: checkpoint of step %d saved to %s; exiting (resume with --ckpt_path last)",
            name,
            trainer.global_step,
            path,
        )
        if self.received == signal.SIGUSR1 and self.requeue and trainer.is_global_zero:
            _slurm_requeue()
        raise SIGTERMException

    def _save(self, trainer: L.Trainer) -> str:
        callback = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        if callback is not None and callback.dirpath is not None:
            folder = Path(callback.dirpath)
            name = callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION
        else:
            folder, name = Path(trainer.default_root_dir) / "checkpoints", "last.ckpt"
        path = str(folder / name)
        trainer.save_checkpoint(path)
        if callback is not None:
            callback.last_model_path = path
        self.saved_path = path
        return path


def _accumulating(trainer: L.Trainer) -> bool:
    """Whether the micro-batch that just ended did not step the optimizer (gradient accumulation continues)."""
    loop = trainer.fit_loop.epoch_loop
    should = getattr(loop, "_should_accumulate", None)
    return bool(should()) if callable(should) else False


def _slurm_requeue() -> None:
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    if not job:
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], check=False, capture_output=True, text=True)
    except FileNotFoundError:
        log.warning("scontrol not found: SLURM job %s not requeued", job)
        return
    if result.returncode == 0:
        log.warning("requeued SLURM job %s", job)
    else:
        log.warning("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
