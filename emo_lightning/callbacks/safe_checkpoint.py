"""``SafeModelCheckpoint``: Lightning's ``ModelCheckpoint`` with atomic writes, a start-up pre-flight of its folder
and a ``--ckpt_path last`` that never resolves to an incomplete or corrupt file."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from emo_lightning.checkpoint import (
    CorruptCheckpointError,
    atomic_save,
    estimate_checkpoint_bytes,
    is_complete_checkpoint,
    newest_complete,
    preflight_checkpoint_dir,
    remove_stale_temporaries,
)

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose writes are atomic and whose errors name the file (local paths).

    Remote URLs (``s3://``...) fall back to Lightning's own writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        if "://" not in str(path) and Path(path).is_file() and not is_complete_checkpoint(path):
            raise CorruptCheckpointError(
                f"checkpoint {path} is incomplete or corrupt (truncated or bad CRC)",
                "resume from an older checkpoint (the step*.ckpt files beside it)",
            )
        kwargs: dict[str, Any] = {"weights_only": weights_only}
        if map_location is not None:
            kwargs["map_location"] = map_location
        return super().load_checkpoint(path, **kwargs)


class SafeModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) that

    * switches a plain ``TorchCheckpointIO`` to :class:`AtomicCheckpointIO`
      (temporary file + fsync + rename; DeepSpeed writes its own folders and is left alone);
    * before the first training step, checks its folder is creatable and writable and has room for two
      checkpoints (``last`` and ``stepN``) of the estimated size, and removes temporaries left by killed writers;
    * resolves ``ckpt_path="last"`` to the newest *complete* checkpoint: a broken ``last.ckpt`` (truncated,
      bad CRC) is skipped with a warning and the newest complete ``*.ckpt`` of the folder is used instead;
    * saves the final step when training ends (``max_steps`` reached, or a callback stopped the run), also when
      it is not a multiple of ``every_n_train_steps`` — Lightning's own ``on_train_end`` only does so when no
      checkpoint was saved at all. Runs ended by an exception (preemption, non-finite losses) never get here.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        strategy = trainer.strategy
        if type(getattr(strategy, "_checkpoint_io", None) or strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.dirpath is None:
            return
        for tmp in remove_stale_temporaries(self.dirpath):
            log.warning("removed %s, the temporary file of an interrupted checkpoint write", tmp)
        preflight_checkpoint_dir(self.dirpath, estimate_checkpoint_bytes(pl_module))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._every_n_train_steps > 0 and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        found = super()._find_last_checkpoints(trainer)
        best = newest_complete(found)
        if best is None:
            folder = self.dirpath or (Path(next(iter(found))).parent if found else None)
            others = (
                sorted(Path(folder).glob(f"*{self.FILE_EXTENSION}"))
                if folder and Path(folder).is_dir()
                else []
            )
            best = newest_complete(p for p in others if str(p) not in found)
            if best is not None:
                log.warning("no complete last checkpoint in %s: resuming from %s", folder, best)
        return {best} if best is not None else set()
