"""Per-layer (domain x expert) token-assignment counts and routing statistics as one torchmetrics ``Metric``."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

from emo_lightning.metrics import routing_stats as rs
from emo_lightning.model.attention import segment_index

# Columns of the per-layer ``stats`` state (all sums, so they reduce by summation over processes).
STATS = (
    "pool_size_sum",  # sum over documents of the pool size
    "docs",  # documents counted in pool_size_sum
    "jaccard_within_sum",
    "jaccard_within_pairs",
    "jaccard_across_sum",
    "jaccard_across_pairs",
    "lb_sum",  # sum over updates of the layer's load-balance value
    "z_sum",  # sum over updates of the layer's router z-loss
    "updates",  # updates carrying lb / z
)
_COL = {name: i for i, name in enumerate(STATS)}


def all_reduce_sum(tensor: Tensor, group: Any = None) -> list[Tensor]:
    """``dist_sync_fn`` for sum-reduced states: one ``all_reduce`` instead of torchmetrics' ``all_gather``.

    Returns a one-element list (torchmetrics stacks it and sums over the new dimension: a no-op).
    """
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return [out]


def segment_domains(doc_ids: Tensor, domain_ids: Tensor) -> Tensor:
    """Domain of every segment: (B,S) doc_ids, domain_ids -> (B,G=S) long, -1 for absent segments / padding."""
    seg = segment_index(doc_ids)
    return torch.full_like(domain_ids, -1).scatter_(1, seg, domain_ids.long())


class ExpertUsage(Metric):
    """Token-slot assignments per (layer, domain, routable expert), plus pool sizes, pool overlap and aux losses.

    States (all ``dist_reduce_fx="sum"``, synced with one ``all_reduce`` each, over the whole world: every token
    is counted on the rank that owns it, so the sum is exact under data and expert parallelism):
    ``counts (L, D, E) long`` and ``stats (L, len(STATS)) float64``. Sync happens only in ``compute()``, which
    every rank must call.

    Args:
        num_layers: L, the layers being monitored.
        num_domains: D; tokens with a domain id outside ``[0, D)`` (padding: -1) are ignored.
        num_experts: E, routable experts (shared experts are excluded by the caller).
        max_pool_docs: cap on documents per update entering the pairwise pool Jaccard (cost is quadratic).
    """

    full_state_update = False
    higher_is_better = None

    def __init__(
        self, num_layers: int, num_domains: int, num_experts: int, max_pool_docs: int = 256, **kwargs: Any
    ) -> None:
        kwargs.setdefault("dist_sync_fn", all_reduce_sum)
        super().__init__(**kwargs)
        self.num_layers, self.num_domains, self.num_experts = num_layers, num_domains, num_experts
        self.max_pool_docs = max_pool_docs
        shape = (num_layers, num_domains, num_experts)
        self.add_state("counts", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state(
            "stats", torch.zeros(num_layers, len(STATS), dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(
        self,
        experts: Tensor,
        domain_ids: Tensor,
        *,
        doc_ids: Tensor | None = None,
        pool_sizes: Tensor | None = None,
        pool_mask: Tensor | None = None,
        lb: Tensor | None = None,
        z: Tensor | None = None,
    ) -> None:
        """Accumulate one forward.

        Args:
            experts: (L, B, S, k) long routable expert ids per token (k routed slots per token).
            domain_ids: (B, S) long domain per token (-1 = padding).
            doc_ids: (B, S) segment ids; needed with ``pool_sizes`` / ``pool_mask``.
            pool_sizes: (L, B, G) long pool size per segment (-1 absent), as ``LayerRouting.pool_sizes``.
            pool_mask: (L, B, G, E) bool pool membership per segment, as ``LayerRouting.pool_mask``.
            lb, z: (L,) per-layer load-balance value and router z-loss of this forward.
        """
        n_l, d, e = self.num_layers, self.num_domains, self.num_experts
        dom = domain_ids.long()
        valid = (dom >= 0) & (dom < d)  # (B,S)
        k = experts.shape[-1]
        layer = torch.arange(n_l, device=experts.device).view(n_l, 1, 1, 1)
        flat = (layer * d + dom.clamp(0, d - 1).unsqueeze(-1)) * e + experts.long()  # (L,B,S,k)
        ones = valid.unsqueeze(-1).expand(*valid.shape, k).long().expand_as(flat)
        self.counts.view(-1).index_add_(0, flat.reshape(-1), ones.reshape(-1))

        stats = torch.zeros_like(self.stats)
        if doc_ids is not None and (pool_sizes is not None or pool_mask is not None):
            seg_dom = segment_domains(doc_ids, dom)  # (B,G)
            seg_ok = (seg_dom >= 0) & (seg_dom < d)
            if pool_sizes is not None:
                ok = seg_ok & (pool_sizes >= 0)  # (L,B,G)
                stats[:, _COL["pool_size_sum"]] = (pool_sizes * ok).sum((1, 2)).to(stats.dtype)
                stats[:, _COL["docs"]] = ok.sum((1, 2)).to(stats.dtype)
            if pool_mask is not None:
                ok = seg_ok & pool_mask[0].any(-1)  # present segments have non-empty pools
                sel = ok.flatten().nonzero().squeeze(1)[: self.max_pool_docs]  # host sync (one per update)
                pools = pool_mask.flatten(1, 2).index_select(1, sel)  # (L,n,E)
                sums = rs.pool_overlap_sums(pools, seg_dom.flatten().index_select(0, sel))  # (L,4)
                first = _COL["jaccard_within_sum"]
                stats[:, first : first + 4] = sums
        if lb is not None:
            stats[:, _COL["lb_sum"]] = lb.detach().to(stats.dtype)
        if z is not None:
            stats[:, _COL["z_sum"]] = z.detach().to(stats.dtype)
        if lb is not None or z is not None:
            stats[:, _COL["updates"]] = 1
        self.stats += stats

    def compute(self) -> dict[str, Tensor]:
        """Window statistics per layer (float64; NaN where undefined, e.g. no pools reported).

        Keys: ``counts (L,D,E)``, ``load (L,E)``; per layer ``(L,)``: ``imbalance`` (max/mean load), ``cv``,
        ``dead_fraction``, ``entropy`` (normalised by log E), ``nmi``, ``pool_size``, ``jaccard_within``,
        ``jaccard_across``, ``lb``, ``z``; per layer and domain ``(L,D)``: ``experts50``, ``experts90``.
        """
        counts = self.counts
        load = counts.sum(1)  # (L,E)
        st = self.stats

        def ratio(num: str, den: str) -> Tensor:
            n, m = st[:, _COL[num]], st[:, _COL[den]]
            return torch.where(m > 0, n / m.clamp_min(1), torch.full_like(n, float("nan")))

        return {
            "counts": counts,
            "load": load,
            "imbalance": rs.load_imbalance(load),
            "cv": rs.load_cv(load),
            "dead_fraction": rs.dead_fraction(load),
            "entropy": rs.entropy(load, normalize=True),
            "nmi": rs.normalized_mutual_information(counts),
            "experts50": rs.experts_for_coverage(counts, 0.5),
            "experts90": rs.experts_for_coverage(counts, 0.9),
            "pool_size": ratio("pool_size_sum", "docs"),
            "jaccard_within": ratio("jaccard_within_sum", "jaccard_within_pairs"),
            "jaccard_across": ratio("jaccard_across_sum", "jaccard_across_pairs"),
            "lb": ratio("lb_sum", "updates"),
            "z": ratio("z_sum", "updates"),
        }
