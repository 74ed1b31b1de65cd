"""Expert selection from a few calibration documents: greedy layer-by-layer (the paper's), Easy-EP and random.

Layer-wise: for l = 0 .. L-1, run the calibration documents through the model whose layers < l are already
cut to their chosen experts (``allowed``: the routing of the pruned model), rank layer l's routable experts by
the token-weighted mean of its unmasked router softmax (every non-padding token counts once), keep the top K'
(ties: lower id first), cut layer l and go on. Layer l's choice only depends on layers <= l. One forward of the
calibration documents per layer.

Easy-EP (arXiv 2504.06792): one forward of the unpruned model, every layer at once. Routable expert i of a layer
scores sum over the non-padding tokens t that chose i of ``g_{i,t} * ||E_i(h_t)|| * (1 - cos(h_t, h_t + y_t))``:
g the gate weight the forward used, h_t the MoE layer's input, y_t its output (routed and shared experts), so a
token counts by how much the layer changes its direction and an expert by how much it contributes to it. The
model captures h, y and the norms itself (``capture_moe``). Shared experts are always kept and never scored.

Budget: ``layer`` keeps K' routable experts in every layer; ``global`` spreads the same total L x K' over the
layers by score (:func:`spread_budget`): a variable keep per layer. Such a subset cannot be pruned into one
model (an expert count is an architecture constant); it runs on the full model through ``allowed``
(:meth:`Subset.apply`), exactly the routing a per-layer pruned model would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from emo_lightning.errors import UserError
from emo_lightning.experts.documents import DocBatch
from emo_lightning.model import (
    FULL,
    EMOTransformer,
    LayerRouting,
    RouterConfig,
    Routing,
    derive_seed,
    prune_model,
    subset_mask,
)

SUBSET_FORMAT = "emo-expert-subset"
_RANDOM_STREAM = 0x5E1EC7
METHODS = ("layerwise", "easy_ep", "random")
BUDGETS = ("layer", "global")


@dataclass
class Subset:
    """Kept routable experts per layer (ascending ids) plus how they were chosen."""

    layers: list[list[int]]
    keep: int  # experts kept per layer, shared included (a global budget: the mean, L x keep in all)
    num_experts: int
    num_shared: int
    method: str
    # layerwise: mean router probability of every routable expert; easy_ep: its share of the layer's score
    scores: list[list[float]] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # calibration documents, routing, seed...

    @property
    def keep_routed(self) -> int:
        return self.keep - self.num_shared

    @property
    def uniform(self) -> bool:
        """The same number of experts in every layer (prunable into one smaller model)."""
        return len({len(layer) for layer in self.layers}) <= 1

    def apply(self, model: EMOTransformer) -> tuple[EMOTransformer, Tensor | None]:
        """The model cut to this subset: ``(pruned model, None)`` for a uniform subset, ``(model, allowed)``
        with ``allowed`` (L,1,1,E') on the model's device for a variable-keep one (pass it to every forward)."""
        if self.uniform:
            return prune_model(model, self.layers), None
        mask = subset_mask(self.layers, model.cfg.router.num_routed)
        return model, mask.to(model.lm_head.weight.device)

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


def spread_budget(shares: Tensor, total: int, floor: int = 1) -> Tensor:
    """A global budget over layers: (L,E') per-layer score shares -> (L,E') bool, ``total`` experts in all.

    Every layer first keeps its ``floor`` best experts; the rest of the budget goes to the highest shares over
    all layers (ties: lower layer, then lower id). Shares, not raw scores: raw Easy-EP scores grow with the
    expert output norms, which differ by depth, so a layer's scores are divided by their sum first.
    """
    n_layers, e = shares.shape
    if not n_layers * floor <= total <= n_layers * e:
        raise ValueError(f"a budget of {total} experts cannot keep {floor}..{e} in each of {n_layers} layers")
    rank = torch.empty_like(shares, dtype=torch.long)  # (L,E') 0 = the layer's best
    order = torch.sort(shares, dim=1, descending=True, stable=True).indices
    rank.scatter_(1, order, torch.arange(e).expand(n_layers, e).contiguous())
    kept = rank < floor  # (L,E')
    rest = shares.masked_fill(kept, float("-inf")).flatten()  # (L*E',) row-major: lower layer first on ties
    chosen = torch.sort(rest, descending=True, stable=True).indices[: total - n_layers * floor]
    return kept.flatten().index_fill(0, chosen, True).view(n_layers, e)


def _shares(scores: Tensor) -> Tensor:
    """(L,E') scores -> each layer's share of its total (a layer that scored nothing: uniform)."""
    sums = scores.sum(1, keepdim=True)
    return torch.where(sums > 0, scores / sums.clamp(min=1e-300), 1.0 / scores.shape[1])


def direction_change(h: Tensor, y: Tensor, eps: float = 1e-12) -> Tensor:
    """1 - cos(h, h + y) over the last dimension, (...,d) -> (...), without float32 cancellation.

    Written out rather than ``1 - F.cosine_similarity``: a layer's output is often a thousandth of its input (at
    initialisation, or in deep layers), where cos is within float32's rounding of 1 and the difference is noise.
    Here 1 - cos = sin^2 / (1 + cos) with sin from the part of y orthogonal to h (exact for cos > 0; 1 - cos
    itself elsewhere, where nothing cancels).
    """
    b = h + y
    hh, bn = (h * h).sum(-1), b.norm(dim=-1)  # (...)
    cos = (h * b).sum(-1) / (hh.sqrt() * bn).clamp(min=eps)
    perp = y - ((y * h).sum(-1) / hh.clamp(min=eps)).unsqueeze(-1) * h  # (...,d) y minus its part along h
    sin2 = ((perp * perp).sum(-1) / (bn * bn).clamp(min=eps)).clamp(max=1.0)
    return torch.where(cos > 0, sin2 / (1 + cos), 1 - cos)


def easy_ep_scores(routing: LayerRouting, valid: Tensor) -> Tensor:
    """Easy-EP importance of one layer's routable experts in one forward (see the module docstring).

    ``routing``: the layer's ``LayerRouting`` of a forward with ``return_routes`` and ``capture_moe``; valid:
    (B,S) bool, False on padding. -> (E',) float64 summed over the valid tokens.
    """
    h, y = routing.moe_input.float(), routing.moe_output.float()  # (B,S,d)
    s_t = direction_change(h, y) * valid  # (B,S) token weight
    k = routing.expert_norms.shape[-1]  # k' routed choices (shared experts follow them in `experts`)
    contrib = routing.weights[..., :k] * routing.expert_norms * s_t.unsqueeze(-1)  # (B,S,k') g ||E(h)|| s
    out = torch.zeros(routing.counts.numel(), dtype=torch.float64, device=contrib.device)  # (E',)
    return out.index_add_(0, routing.experts[..., :k].reshape(-1), contrib.reshape(-1).double())


@torch.no_grad()
def easy_ep_subset(
    model: EMOTransformer,
    batches: Sequence[DocBatch],
    keep: int,
    routing: Routing = FULL,
    budget: str = "layer",
    progress: bool = False,
) -> Subset:
    """Easy-EP selection: one forward of the unpruned model over ``batches`` scores every layer at once."""
    if routing.kind == "causal":
        raise ValueError("Easy-EP selection supports routing full, pool:P or running:P")
    rc = model.cfg.router
    device = model.lm_head.weight.device
    totals = torch.zeros(len(model.blocks), rc.num_routed, dtype=torch.float64)  # (L,E')
    n_tokens = 0
    with model.routing(routing):
        for b in tqdm(batches, desc="easy-ep", unit="batch", disable=not progress):
            valid = (b.doc_index >= 0).to(device)  # (B,S)
            n_tokens += int(valid.sum())
            out = model(
                b.input_ids.to(device), b.doc_ids.to(device), return_routes=True, route_probs=False,
                capture_moe=True,
            )  # fmt: skip
            totals += torch.stack([easy_ep_scores(lr, valid) for lr in out.layers]).cpu()
    shares = _shares(totals)
    layers = _keep_top(shares, keep - rc.num_shared, budget)
    info = {
        "routing": str(routing),
        "calibration_tokens": n_tokens,
        "budget": budget,
        "score_totals": [round(float(t), 6) for t in totals.sum(1)],  # raw Easy-EP score of every layer
    }
    scores = [[round(float(x), 6) for x in row] for row in shares]
    return Subset(layers, keep, rc.num_experts, rc.num_shared, "easy_ep", scores, info)


def _keep_top(shares: Tensor, keep_routed: int, budget: str) -> list[list[int]]:
    """Kept ids per layer: the top ``keep_routed`` of each layer, or a global budget of L x keep_routed."""
    if budget == "global":
        mask = spread_budget(shares, shares.shape[0] * keep_routed)
        return [torch.nonzero(row).flatten().tolist() for row in mask]
    order = torch.sort(shares, dim=1, descending=True, stable=True).indices[:, :keep_routed]  # (L,K')
    return order.sort(dim=1).values.tolist()


@torch.no_grad()
def layerwise_subset(
    model: EMOTransformer,
    batches: Sequence[DocBatch],
    keep: int,
    routing: Routing = FULL,
    progress: bool = False,
    budget: str = "layer",
) -> Subset:
    """The paper's greedy layer-by-layer selection on calibration ``batches`` (see the module docstring).

    ``budget="global"``: the per-layer counts come first from one forward of the unpruned model (the mean router
    probabilities of every layer, spread by :func:`spread_budget`); the greedy pass then keeps that many per layer.
    """
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

    def mean_probs(layer_ids: Sequence[int]) -> Tensor:  # (len(layer_ids),E') under the current cuts
        total = torch.zeros(len(layer_ids), rc.num_routed, dtype=torch.float64, device=device)
        for b, v in zip(batches, valid, strict=True):
            out = model(b.input_ids.to(device), b.doc_ids.to(device), return_routes=True, allowed=allowed)
            total += torch.stack([(out.layers[i].probs * v).sum((0, 1)) for i in layer_ids]).double()
        return (total / max(n_tokens, 1)).cpu()

    with model.routing(routing):
        counts = [keep - rc.num_shared] * n_layers
        if budget == "global":
            counts = spread_budget(mean_probs(range(n_layers)), n_layers * counts[0]).sum(1).tolist()
        for layer in tqdm(range(n_layers), desc="select", unit="layer", disable=not progress):
            mean = mean_probs([layer])[0]
            order = torch.sort(mean, descending=True, stable=True).indices
            kept = order[: counts[layer]].sort().values
            layers.append(kept.tolist())
            scores.append([round(float(s), 6) for s in mean])
            allowed[layer] = False
            allowed[layer, ..., kept.to(device)] = True  # cut layer l to its kept experts
    info = {"routing": str(routing), "calibration_tokens": n_tokens, "budget": budget}
    return Subset(layers, keep, rc.num_experts, rc.num_shared, "layerwise", scores, info)


def select_subset(
    model: EMOTransformer,
    batches: Sequence[DocBatch],
    keep: int,
    method: str = "layerwise",
    routing: Routing = FULL,
    budget: str = "layer",
    seed: int = 0,
    progress: bool = False,
) -> Subset:
    """One entry point for ``emo-experts select`` and the report: ``method`` layerwise | easy_ep | random."""
    if method == "random":
        if budget != "layer":
            raise UserError("--budget global: random selection has no scores to spread", "use --budget layer")
        return random_subset(model.cfg.router, len(model.blocks), keep, seed)
    if method == "easy_ep":
        return easy_ep_subset(model, batches, keep, routing, budget, progress)
    if method == "layerwise":
        return layerwise_subset(model, batches, keep, routing, progress, budget)
    raise ValueError(f"unknown selection method {method!r}: one of {METHODS}")
