"""Put a fine-tuned subset back: write a part's experts into the full model at their original ids.

A *part* is a model cut from a full one (``emo-experts prune``) and usually fine-tuned since (``emo fit
--init_from small.ckpt``). Merging builds a full-size model from the full checkpoint and the part:

* **routed experts** (``w_in``, ``w_out``) of layer l's kept ids come from the part, in the part's order (the
  kept ids ascending, as pruning stores them); every other routed expert stays the full model's, bit for bit;
* **router rows** (and the selection bias) of the kept experts: ``router="full"`` (default) keeps the full
  model's, ``"part"`` takes the part's. The part's softmax only ever compared the kept experts with each
  other, so its rows carry no calibration against the experts it never saw;
* **dense weights** (embeddings, attention, norms, LM head, shared experts): ``dense="full"`` (default) keeps
  the full model's, ``"part"`` takes the part's, ``"average"`` their mean.

The defaults change the full model only where the part was cut: a token that routes to none of the merged
experts gets exactly the full model's output, so the other domains can only move through the experts they
share with the fine-tuned one (the question "does updating one module break the rest?"). ``dense="part"``
keeps what fine-tuning learned in the shared weights too, at the price of changing every token's computation.

Which ids the part holds: ``--subset`` if given, else the part's own ``emo_pruned`` entry (a pruned
checkpoint), else that of the checkpoint it was initialised from (``hyper_parameters.init_from`` of an ``emo fit
--init_from`` run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from emo_lightning.checkpoint import model_config, model_state, read_checkpoint
from emo_lightning.errors import UserError
from emo_lightning.experts.selection import Subset
from emo_lightning.model import EMOTransformer, ModelConfig, check_subset, per_expert_key

DENSE = ("full", "part", "average")
ROUTER = ("full", "part")
_EXPERT_WEIGHTS = ("experts.w_in", "experts.w_out")
_FIX = "pass --subset with the subset.json the part was pruned to"


def part_layers(part: dict[str, Any], part_path: str | Path, subset: Subset | None = None) -> list[list[int]]:
    """The full model's routable ids the part holds, per layer (see the module docstring)."""
    if subset is not None:
        return subset.layers
    pruned = part.get("emo_pruned")
    if pruned is None:
        source = (part.get("hyper_parameters") or {}).get("init_from")
        if not source:
            raise UserError(
                f"--part {part_path}: no record of the experts it holds (not pruned, no init_from)", _FIX
            )
        if not Path(source).is_file():
            raise UserError(f"--part {part_path}: it was initialised from {source}, which is gone", _FIX)
        pruned = read_checkpoint(source).get("emo_pruned")
        if pruned is None:
            raise UserError(f"--part {part_path}: {source} (its init_from) is not a pruned checkpoint", _FIX)
    return Subset.from_dict(pruned["subset"], f"{part_path} (emo_pruned)").layers


def _check(
    full: ModelConfig, part: ModelConfig, kept: Sequence[Sequence[int]], part_path: str | Path
) -> None:
    fix = "merge a part pruned from this --full checkpoint (and fine-tuned)"
    if asdict(full.arch) != asdict(part.arch):
        diff = [k for k, v in asdict(full.arch).items() if asdict(part.arch)[k] != v]
        raise UserError(f"--part {part_path}: another architecture than --full ({', '.join(diff)})", fix)
    if part.router.num_shared != full.router.num_shared:
        raise UserError(f"--part {part_path}: {part.router.num_shared} shared experts, --full has "
                        f"{full.router.num_shared}", fix)  # fmt: skip
    if any(len(layer) != part.router.num_routed for layer in kept):
        raise UserError(
            f"--part {part_path}: holds {part.router.num_routed} routable experts per layer, its subset "
            f"{[len(layer) for layer in kept]}",
            _FIX,
        )


def merge_state(
    full: dict[str, torch.Tensor],
    part: dict[str, torch.Tensor],
    kept: Sequence[Sequence[int]],
    dense: str = "full",
    router: str = "full",
) -> dict[str, torch.Tensor]:
    """The merged state dict (see the module docstring); ``full`` and ``part`` are model state dicts."""
    if dense not in DENSE or router not in ROUTER:
        raise ValueError(f"dense must be one of {DENSE}, router one of {ROUTER}")
    index = [torch.tensor(ids, dtype=torch.long) for ids in kept]
    out = {}
    for key, value in full.items():
        where = per_expert_key(key)
        if where is not None:
            layer, name = where
            take = name in _EXPERT_WEIGHTS or router == "part"
            out[key] = value.index_copy(0, index[layer], part[key].to(value.dtype)) if take else value.clone()
        elif dense == "full" or not value.is_floating_point():
            out[key] = value.clone()
        elif dense == "part":
            out[key] = part[key].to(value.dtype).clone()
        else:
            out[key] = torch.lerp(value, part[key].to(value.dtype), 0.5)
    return out


def merge_checkpoints(
    full_path: str | Path,
    part_path: str | Path,
    subset: Subset | None = None,
    dense: str = "full",
    router: str = "full",
) -> tuple[EMOTransformer, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """-> (merged model, the full checkpoint's hyper-parameters, the full checkpoint dict, merge metadata)."""
    full_ckpt, part_ckpt = read_checkpoint(full_path), read_checkpoint(part_path)
    full_cfg = model_config(full_ckpt["hyper_parameters"])
    part_cfg = model_config(part_ckpt["hyper_parameters"])
    kept = part_layers(part_ckpt, part_path, subset)
    try:
        kept = check_subset(kept, full_cfg.router, full_cfg.arch.n_layers)
    except UserError as err:
        raise UserError(f"--part {part_path}: {err.what}", _FIX) from None
    _check(full_cfg, part_cfg, kept, part_path)
    state = merge_state(model_state(full_ckpt), model_state(part_ckpt), kept, dense, router)
    model = EMOTransformer.from_state_dict(full_cfg, state).eval()
    meta = {
        "full": str(full_path),
        "part": str(part_path),
        "layers": kept,
        "dense": dense,
        "router": router,
        "part_global_step": part_ckpt.get("global_step"),
    }
    return model, dict(full_ckpt["hyper_parameters"]), full_ckpt, meta
