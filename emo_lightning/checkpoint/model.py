"""Load an :class:`EMOTransformer` from a Lightning checkpoint (trained, pruned or consolidated), write one.

A checkpoint is the dict Lightning saves: ``hyper_parameters`` = ``{arch, router, optim}`` (dataclasses),
``state_dict`` with keys prefixed ``model.``. Pruned checkpoints have the same layout (so ``emo validate
--ckpt_path`` and ``EMOLitModule.load_from_checkpoint`` load them) plus an ``emo_pruned`` entry describing
the kept experts. No Lightning import: the configs are plain dataclasses.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from emo_lightning.checkpoint.files import CheckpointMismatchError, atomic_save
from emo_lightning.errors import UserError
from emo_lightning.model import ArchConfig, EMOTransformer, ModelConfig, RouterConfig

PREFIX = "model."


@dataclass
class LoadedModel:
    """A model in eval mode with where it came from."""

    model: EMOTransformer
    path: str
    hparams: dict[str, Any]  # {arch, router, optim}
    meta: dict[str, Any] = field(default_factory=dict)  # global_step, emo_pruned (if pruned)

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict (CPU tensors); a clear error for a missing or foreign file."""
    path = Path(path)
    fix = "pass a .ckpt written by `emo fit` or `emo-experts prune` (DeepSpeed: consolidate it first)"
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint", fix)
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a checkpoint (not a torch.save archive, or truncated)", fix)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as err:
        reason = str(err).split(". ")[0].splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path}: not a readable checkpoint ({reason})", fix) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise UserError(f"{path}: not an emo-lightning checkpoint (no state_dict / hyper_parameters)", fix)
    return ckpt


def model_config(hparams: dict[str, Any]) -> ModelConfig:
    """``ModelConfig`` from a checkpoint's hyper-parameters (dataclasses or plain dicts)."""
    return ModelConfig(
        arch=hparams.get("arch") or ArchConfig(), router=hparams.get("router") or RouterConfig()
    )


def model_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor | Any]:
    """The transformer's state dict (``model.`` prefix removed, other module states dropped)."""
    return {k[len(PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(PREFIX)}


def describe_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any], limit: int = 8) -> list[str]:
    """Human-readable differences between two ``state_dict``\\ s: shapes, missing and unexpected keys."""

    def shape(v: Any) -> tuple[int, ...] | None:
        return tuple(v.shape) if isinstance(v, torch.Tensor) else None

    def clip(keys: list[str]) -> str:
        more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    shapes = [
        f"{k}: checkpoint {shape(saved[k])} vs model {shape(current[k])}"
        for k in saved
        if k in current and shape(saved[k]) != shape(current[k])
    ]
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    out = []
    if shapes:
        out.append("shape mismatch: " + clip(shapes))
    if missing:
        out.append("missing in checkpoint: " + clip(missing))
    if unexpected:
        out.append("not in model: " + clip(unexpected))
    return out


def load_weights(model: EMOTransformer, path: str | Path) -> None:
    """Load a checkpoint's transformer weights into ``model`` (same architecture; mismatches are named)."""
    state = model_state(read_checkpoint(path))
    problems = describe_mismatch(state, model.state_dict())
    if problems:
        raise CheckpointMismatchError(
            f"{path}: the checkpoint does not fit this model ({'; '.join(problems)})",
            "take the architecture from the checkpoint (emo fit --init_from does) or pass a matching one",
        )
    model.load_state_dict(state, strict=True)


def load_model(path: str | Path) -> LoadedModel:
    """Build the checkpoint's transformer, load its weights (strict) and put it in eval mode."""
    ckpt = read_checkpoint(path)
    hparams = dict(ckpt["hyper_parameters"])
    model = EMOTransformer.from_state_dict(model_config(hparams), model_state(ckpt)).eval()
    meta = {"global_step": ckpt.get("global_step"), "emo_pruned": ckpt.get("emo_pruned")}
    return LoadedModel(model, str(path), hparams, meta)


def save_checkpoint(
    model: EMOTransformer, hparams: dict[str, Any], path: str | Path, source: dict[str, Any], **extra: Any
) -> int:
    """Write a Lightning-compatible, weights-only checkpoint of ``model`` atomically; returns its size in bytes.

    ``source`` is the original checkpoint dict (its Lightning version, epoch and step are kept; optimizer
    states are not: a pruned checkpoint is for evaluation and inference).
    """
    # plain dicts, as LightningCLI writes them (also accepted by EMOLitModule.load_from_checkpoint)
    hp = {**hparams, "arch": asdict(model.cfg.arch), "router": asdict(model.cfg.router)}
    ckpt = {
        "epoch": source.get("epoch", 0),
        "global_step": source.get("global_step", 0),
        "pytorch-lightning_version": source.get("pytorch-lightning_version", "2.6.6"),
        "state_dict": {
            PREFIX + k: v.detach().clone() if isinstance(v, torch.Tensor) else v
            for k, v in model.state_dict().items()
        },
        "hyper_parameters": hp,
        **extra,
    }
    atomic_save(ckpt, path)
    return Path(path).stat().st_size
