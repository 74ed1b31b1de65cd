"""Consolidate a DeepSpeed expert-parallel checkpoint into one plain Lightning checkpoint file.

A Lightning checkpoint under ``EMODeepSpeedStrategy`` is a directory (``<name>.ckpt/checkpoint/``) holding
``mp_rank_00_model_states.pt`` (dense weights + Lightning's client state: hyper-parameters, global step,
datamodule position, ...), one ``layer_<l>_expert_<g>_mp_rank_00_model_states.pt`` per (MoE layer, global expert
slot) and the ZeRO optimizer shards. :func:`consolidate` stacks the per-expert files back into the one-process
layout (``model.blocks.<l>.moe.experts.w_in (E',d,2h)``) and writes a weights-only checkpoint that
``EMOLitModule.load_from_checkpoint``, ``emo validate --ckpt_path`` and the modularity tools load on one process.
It works for any ``ep_size`` (the files are keyed by global expert id). Optimizer state is not converted: resume
a run from the directory itself, with the same ``ep_size``.

Usage: ``python -m emo_lightning.parallel.checkpoint runs/x/checkpoints/last.ckpt runs/x/consolidated.ckpt``
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

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
            state_dict[f"{prefix}.experts.{name}"] = torch.stack([by_id[i] for i in ids])
    ckpt: dict[str, Any] = {k: states[k] for k in _KEEP if k in states}
    ckpt.update({k: v for k, v in states.items() if k not in _DEEPSPEED_KEYS and k not in ckpt})  # datamodule
    ckpt["state_dict"] = state_dict
    return ckpt


def consolidate(path: str | Path, out: str | Path) -> Path:
    """Write :func:`consolidated_state` of the checkpoint directory ``path`` to the file ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(consolidated_state(path), out)
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
