"""Every checkpoint the project reads or writes, in one place (no Lightning).

* ``files``: atomic writes (files and folders), complete-file verification, the pre-flight of a folder.
* ``model``: a transformer from a checkpoint file (trained, pruned or consolidated) and back.
* ``deepspeed``: consolidation of a DeepSpeed expert-parallel checkpoint folder into one file, and the
  rank-local loading of a one-file checkpoint into an expert-parallel model.

Our checkpoints hold tensors and the typed configs (hyper-parameters) only: the configs are registered here,
once, as the safe globals of ``torch.load(weights_only=True)``.
"""

import torch

from emo_lightning.checkpoint.files import (
    CheckpointDirError,
    CheckpointMismatchError,
    CheckpointWriteError,
    CorruptCheckpointError,
    atomic_folder,
    atomic_save,
    atomic_write_lines,
    atomic_write_text,
    check_out_folder,
    estimate_checkpoint_bytes,
    is_complete_checkpoint,
    newest_complete,
    preflight_checkpoint_dir,
    remove_stale_temporaries,
    tensor_bytes,
    writable_bytes,
)
from emo_lightning.checkpoint.model import (
    PREFIX,
    LoadedModel,
    describe_mismatch,
    load_model,
    load_weights,
    model_config,
    model_state,
    read_checkpoint,
    save_checkpoint,
)
from emo_lightning.model import ArchConfig, RouterConfig
from emo_lightning.optim import OptimConfig

torch.serialization.add_safe_globals([ArchConfig, RouterConfig, OptimConfig])

__all__ = [
    "PREFIX",
    "CheckpointDirError",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "LoadedModel",
    "atomic_folder",
    "atomic_save",
    "atomic_write_lines",
    "atomic_write_text",
    "check_out_folder",
    "describe_mismatch",
    "estimate_checkpoint_bytes",
    "is_complete_checkpoint",
    "load_model",
    "load_weights",
    "model_config",
    "model_state",
    "newest_complete",
    "preflight_checkpoint_dir",
    "read_checkpoint",
    "remove_stale_temporaries",
    "save_checkpoint",
    "tensor_bytes",
    "writable_bytes",
]
