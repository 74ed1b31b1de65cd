"""Consolidate a DeepSpeed expert-parallel checkpoint into one plain Lightning checkpoint file.

A Lightning checkpoint under ``EMODeepSpeedStrategy`` is a directory (``<name>.ckpt/checkpoint/``) holding
``mp_rank_00_model_states.pt`` (dense weights + Lightning's client state: hyper-parameters, global step,
datamodule position, ...), one ``layer_<l>_expert_<g>_mp_rank_00_model_states.pt`` per (MoE layer, global expert
slot) and the ZeRO optimizer shards. :func:`consolidate` stacks the per-expert files back into the one-process
layout (``model.blocks.<l>.moe.experts.w_in (E',d,2h)``) and writes a weights-only checkpoint that
``EMOLitModule.load_from_checkpoint``, ``emo validate --ckpt_path`` and the modularity tools load on one process.
It works for any ``ep_size`` (the files are keyed by global expert id). Optimizer state is not converted: resume
a run from the directory itself, with the same ``ep_size``. :func:`load_local_weights` loads such a one-file
checkpoint into a rank-local expert-parallel model (``emo fit --init_from`` under ``EMODeepSpeedStrategy``),
reading only the experts the rank holds.

Usage: ``python -m emo_lightning.checkpoint.deepspeed runs/x/checkpoints/last.ckpt runs/x/consolidated.ckpt``
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emo_lightning.checkpoint.files import CheckpointMismatchError, atomic_save

_EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
_EXPERT_KEY = re.compile(r"^(.*)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(\w+)$")
_KEEP = ("epoch", "global_step", "pytorch-lightning_version", "hyper_parameters", "hparams_name")
_DEEPSPEED_KEYS = {
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps", "global_steps",
    "global_samples", "dp_world_size", "mp_world_size", "checkpoint_parallel_dimensions", "ds_config",
    "ds_version", "num_experts", "ds_autoep_layers", "loops", "callbacks", "lr_schedulers",
}  # fmt: skip


def _tag_dir(path: Path) -> Path:
    """The folder holding the model-state files (``<ckpt>/<tag>/``, tag from ``latest``)."""
    path = Path(path)
    if (path / "mp_rank_00_model_states.pt").exists():
        return path
    latest = path / "latest"
    tag = latest.read_text().strip() if latest.exists() else "checkpoint"
    if not (path / tag / "mp_rank_00_model_states.pt").exists():
        raise FileNotFoundError(
            f"{path} is not a DeepSpeed checkpoint directory (no {tag}/mp_rank_00_model_states.pt)"
        )
    return path / tag


def consolidated_state(path: str | Path) -> dict[str, Any]:
    """The one-process Lightning checkpoint dict of a DeepSpeed (expert-parallel) checkpoint directory."""
    tag_dir = _tag_dir(Path(path))
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    state_dict: dict[str, torch.Tensor] = dict(states["module"])
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    for file in sorted(tag_dir.iterdir()):
        if not _EXPERT_FILE.search(file.name):
            continue
        for key, tensor in torch.load(file, map_location="cpu", weights_only=False).items():
            m = _EXPERT_KEY.match(key)
            if m is None:
                raise ValueError(f"unexpected key {key!r} in expert file {file}")
            prefix, gid, name = m.group(1), int(m.group(2)), m.group(3)
            if name != "shared_slot":  # placeholder of a replicated shared expert's slot
                experts[prefix][name][gid] = tensor
    for prefix, params in experts.items():
        for name, by_id in params.items():
            ids = sorted(by_id)
            if ids != list(range(len(ids))):
                raise ValueError(f"{prefix}: expert files for {name} are incomplete (ids {ids})")
            state_dict[f"{_stack_prefix(prefix)}.{name}"] = torch.stack([by_id[i] for i in ids])
    ckpt: dict[str, Any] = {k: states[k] for k in _KEEP if k in states}
    ckpt.update({k: v for k, v in states.items() if k not in _DEEPSPEED_KEYS and k not in ckpt})  # datamodule
    ckpt["state_dict"] = state_dict
    return ckpt


def _stack_prefix(prefix: str) -> str:
    """One-process key prefix of the expert stacks of the DeepSpeed module at ``prefix``: the adapter sits at
    ``<layer>.experts`` (older checkpoints: the whole layer at ``<layer>``, experts at ``<layer>.experts``)."""
    return prefix if prefix.endswith(".experts") else f"{prefix}.experts"


def _expert_param(name: str) -> tuple[str, str] | None:
    """``(one-process stack key, param)`` of a rank-local expert parameter name, else None."""
    head, sep, tail = name.partition(".deepspeed_moe.experts.")
    return (f"{_stack_prefix(head)}.{tail}", tail) if sep else None


def checkpointed_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of ``model``, by module path: its parameters and persistent buffers (a router's
    selection bias; not the RoPE tables). Expert stacks keep their module names (not DeepSpeed's per-expert keys)."""
    out = dict(model.named_parameters())
    for prefix, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


@torch.no_grad()
def load_local_weights(model: nn.Module, path: str | Path, prefix: str = "model.") -> None:
    """Load a one-file checkpoint's weights and buffers (``state_dict`` keys ``prefix`` + one-process names) into
    ``model``, a rank-local expert-parallel transformer, reading only what the rank holds.

    The file is memory-mapped: dense tensors are copied whole, of every expert stack ``(E',...)`` only the slice
    of this rank's experts (global ids ``local.expert_offset ..``) is read. Missing keys, unexpected keys and
    shape mismatches raise ``CheckpointMismatchError`` naming them, before anything is copied.
    """
    from emo_lightning.parallel.expert_parallel import DeepSpeedExperts

    ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    source = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    offsets = {
        f"{name}.deepspeed_moe.experts.": m.local.expert_offset
        for name, m in model.named_modules()
        if isinstance(m, DeepSpeedExperts)
    }
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    problems, used = [], set()
    for name, param in checkpointed_tensors(model).items():
        expert = _expert_param(name)
        key = expert[0] if expert else name
        src = source.get(key)
        if src is None:
            problems.append(f"missing in checkpoint: {key}")
            continue
        used.add(key)
        if expert:
            first = next(v for k, v in offsets.items() if name.startswith(k))
            src = src[first : first + param.shape[0]]  # a view of the mapped file: only these pages are read
        if src.shape != param.shape:
            problems.append(f"{key}: checkpoint {tuple(src.shape)} vs model {tuple(param.shape)}")
        pairs.append((param, src))
    problems += [f"not in model: {k}" for k in source if k not in used]
    if problems:
        raise CheckpointMismatchError(
            f"{path}: the checkpoint does not fit this model ({'; '.join(problems[:8])})",
            "pass a checkpoint of this architecture (consolidate a DeepSpeed checkpoint folder first)",
        )
    for param, src in pairs:
        param.copy_(src)


def consolidate(path: str | Path, out: str | Path) -> Path:
    """Write :func:`consolidated_state` of the checkpoint directory ``path`` to the file ``out``."""
    out = Path(out)
    atomic_save(consolidated_state(path), out)
    return out


def verify(path: str | Path, expect_step: int | None = None) -> dict[str, Any]:
    """Load a consolidated checkpoint; raise unless every weight is finite (and the step is ``expect_step``)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    bad = [
        k
        for k, v in ckpt["state_dict"].items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()
    ]
    if bad:
        raise ValueError(f"{path}: non-finite weights in {bad[:5]}")
    if expect_step is not None and ckpt.get("global_step") != expect_step:
        raise ValueError(f"{path}: global_step {ckpt.get('global_step')} != expected {expect_step}")
    return ckpt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoint", help="DeepSpeed checkpoint directory (e.g. runs/x/checkpoints/last.ckpt)"
    )
    parser.add_argument("out", help="consolidated single-file checkpoint to write")
    parser.add_argument("--expect-step", type=int, default=None, help="fail unless global_step equals this")
    args = parser.parse_args(argv)
    out = consolidate(args.checkpoint, args.out)
    ckpt = verify(out, args.expect_step)
    print(f"{out}: step {ckpt.get('global_step')}, {len(ckpt['state_dict'])} tensors, all finite")


if __name__ == "__main__":
    main()
