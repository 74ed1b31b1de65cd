"""Expert selection from a few calibration documents: greedy layer-by-layer (the paper's) and random.

Layer-wise: for l = 0 .. L-1, run the calibration documents through the model whose layers < l are already
cut to their chosen experts (``allowed``: the routing of the pruned model), rank layer l's routable experts by
the token-weighted mean of its unmasked router softmax (every non-padding token counts once), keep the top K'
(ties: lower id first), cut layer l and go on. Layer l's choice only depends on layers <= l. One forward of the
calibration documents per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from emo_lightning.errors import UserError
from emo_lightning.experts.documents import DocBatch
from emo_lightning.model import FULL, EMOTransformer, RouterConfig, Routing, derive_seed

SUBSET_FORMAT = "emo-expert-subset"
_RANDOM_STREAM = 0x5E1EC7


@dataclass
class Subset:
    """Kept routable experts per layer (ascending ids) plus how they were chosen."""

    layers: list[list[int]]
    keep: int  # total experts kept per layer, shared included
    num_experts: int
    num_shared: int
    method: str
    scores: list[list[float]] | None = None  # layerwise: mean router probability of every routable expert
    info: dict[str, Any] = field(default_factory=dict)  # calibration documents, routing, seed...

    @property
    def keep_routed(self) -> int:
        return self.keep - self.num_shared

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SUBSET_FORMAT,
            "version": 1,
            "method": self.method,
            "keep": self.keep,
            "keep_routed": self.keep_routed,
            "num_experts": self.num_experts,
            "num_shared": self.num_shared,
            "shared": "always kept (ids num_routed..num_experts-1)",
            "layers": self.layers,
            "scores": self.scores,
            **self.info,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<subset>") -> Subset:
        fix = "pass a subset.json written by `emo-experts select`"
        if data.get("format") != SUBSET_FORMAT:
            raise UserError(f"{source}: not an expert subset (format {data.get('format')!r})", fix)
        known = {"format", "version", "method", "keep", "keep_routed", "num_experts", "num_shared"}
        known |= {"shared", "layers", "scores"}
        info = {k: v for k, v in data.items() if k not in known}
        try:
            return cls(
                [list(map(int, layer)) for layer in data["layers"]],
                int(data["keep"]),
                int(data["num_experts"]),
                int(data["num_shared"]),
                str(data["method"]),
                data.get("scores"),
                info,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{source}: invalid expert subset ({err!r})", fix) from None


def parse_keep(keep: str | float, rc: RouterConfig) -> int:
    """Experts to keep per layer (shared included) from a count (``4``) or a fraction of E (``0.25``).

    A fraction rounds to the nearest count; at least one routable expert is always kept. ``1`` (like
    ``1.0``) is the fraction "all experts"; for a single expert give its fraction (``0.0625`` of 16).
    """
    text = str(keep).strip()
    fix = f"give a fraction in (0, 1] (0.25) or a count in [1, {rc.num_experts}] (4)"
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--keep {text!r}: not a number", fix) from None
    is_fraction = "." in text or "e" in text.lower() or value <= 1
    if is_fraction:
        if not 0 < value <= 1:
            raise UserError(f"--keep {text}: a fraction must lie in (0, 1]", fix)
        count = round(value * rc.num_experts)
    else:
        count = int(value)
        if count != value or not 1 <= count <= rc.num_experts:
            raise UserError(f"--keep {text}: the model has {rc.num_experts} experts per layer", fix)
    return max(rc.num_shared + 1, min(count, rc.num_experts))


def compose_subsets(subsets: Sequence[Subset], sources: Sequence[str] | None = None) -> Subset:
    """Per layer, the union of the subsets' kept experts: one pruned model for several domains.

    A model keeps the same number of experts in every layer, so layers whose union is smaller than the largest
    one are filled up to it with their best remaining experts (highest summed ``scores`` of the subsets that
    have them, then lowest id). ``info`` reports the union size and the filled experts of every layer. The
    result is a superset of every input; composing a subset with itself (or with a part of the result) gives the
    same subset back.
    """
    if not subsets:
        raise UserError("compose: no subsets", "pass two or more subset.json files")
    first = subsets[0]
    names = list(sources or [f"subset {i}" for i in range(len(subsets))])
    for name, sub in zip(names, subsets, strict=True):
        if (sub.num_experts, sub.num_shared, len(sub.layers)) != (
            first.num_experts,
            first.num_shared,
            len(first.layers),
        ):
            raise UserError(
                f"{name}: subset of a model with {sub.num_experts} experts ({sub.num_shared} shared) and "
                f"{len(sub.layers)} layers, {names[0]} has {first.num_experts} ({first.num_shared}) and "
                f"{len(first.layers)}",
                "compose subsets selected from the same checkpoint",
            )
    unions = [sorted(set().union(*(sub.layers[i] for sub in subsets))) for i in range(len(first.layers))]
    size = max(len(u) for u in unions)
    scored = [sub.scores for sub in subsets if sub.scores is not None]
    layers, filled = [], []
    for i, union in enumerate(unions):
        n_routed = first.num_experts - first.num_shared
        score = [sum(s[i][e] for s in scored) for e in range(n_routed)]
        rest = sorted((e for e in range(n_routed) if e not in union), key=lambda e: (-score[e], e))
        extra = sorted(rest[: size - len(union)])
        layers.append(sorted(union + extra))
        filled.append(extra)
    info = {
        "sources": names,
        "union_sizes": [len(u) for u in unions],
        "filled": filled,  # experts added to reach the largest union (none where the union is the largest)
    }
    scores = (
        [
            [round(sum(s[i][e] for s in scored), 6) for e in range(len(scored[0][i]))]
            for i in range(len(unions))
        ]
        if scored
        else None
    )
    return Subset(
        layers, size + first.num_shared, first.num_experts, first.num_shared, "compose", scores, info
    )


def random_subset(rc: RouterConfig, n_layers: int, keep: int, seed: int = 0) -> Subset:
    """K' routable experts per layer drawn uniformly at random (seeded by (seed, layer))."""
    layers = []
    for layer in range(n_layers):
        gen = torch.Generator().manual_seed(derive_seed(seed, layer, _RANDOM_STREAM))
        layers.append(sorted(torch.randperm(rc.num_routed, generator=gen)[: keep - rc.num_shared].tolist()))
    return Subset(layers, keep, rc.num_experts, rc.num_shared, "random", None, {"seed": seed})


@torch.no_grad()
def layerwise_subset(
    model: EMOTransformer,
    batches: Sequence[DocBatch],
    keep: int,
    routing: Routing = FULL,
    progress: bool = False,
) -> Subset:
    """The paper's greedy layer-by-layer selection on calibration ``batches`` (see the module docstring)."""
    if routing.kind == "causal":
        raise ValueError("layer-wise selection supports routing full, pool:P or running:P")
    rc = model.cfg.router
    device = model.lm_head.weight.device
    n_layers = len(model.blocks)
    allowed = torch.ones(n_layers, 1, 1, rc.num_routed, dtype=torch.bool, device=device)  # not cut yet: all
    valid = [(b.doc_index >= 0).unsqueeze(-1).to(device) for b in batches]  # (B,S,1)
    n_tokens = sum(int(v.sum()) for v in valid)
    layers: list[list[int]] = []
    scores: list[list[float]] = []
    with model.routing(routing):
        for layer in tqdm(range(n_layers), desc="select", unit="layer", disable=not progress):
            total = torch.zeros(rc.num_routed, dtype=torch.float64, device=device)
            for b, v in zip(batches, valid, strict=True):
                out = model(b.input_ids.to(device), b.doc_ids.to(device), return_routes=True, allowed=allowed)
                total += (out.layers[layer].probs * v).sum((0, 1)).double()  # (E',)
            mean = (total / max(n_tokens, 1)).cpu()
            order = torch.sort(mean, descending=True, stable=True).indices
            kept = order[: keep - rc.num_shared].sort().values
            layers.append(kept.tolist())
            scores.append([round(float(s), 6) for s in mean])
            allowed[layer] = False
            allowed[layer, ..., kept.to(device)] = True  # cut layer l to its kept experts
    info = {"routing": str(routing), "calibration_tokens": n_tokens}
    return Subset(layers, keep, rc.num_experts, rc.num_shared, "layerwise", scores, info)
