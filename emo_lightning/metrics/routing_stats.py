"""Pure tensor functions over expert-usage counts: balance, specialisation and pool overlap.

Conventions: ``load`` is ``(..., E)`` token(-slot) counts per expert; ``counts`` is ``(..., D, E)`` counts per
(domain, expert). Leading dimensions (e.g. layers) are batched. All results are float64 (no host sync).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _f64(x: Tensor) -> Tensor:
    return x.to(torch.float64)


def load_imbalance(load: Tensor) -> Tensor:
    """max / mean of the per-expert load (1 = perfectly balanced, E/k at most). ``(..., E) -> (...)``."""
    load = _f64(load)
    return load.amax(-1) / load.mean(-1).clamp_min(torch.finfo(torch.float64).tiny)


def load_cv(load: Tensor) -> Tensor:
    """Coefficient of variation std / mean (population std) of the per-expert load. ``(..., E) -> (...)``."""
    load = _f64(load)
    return load.std(-1, correction=0) / load.mean(-1).clamp_min(torch.finfo(torch.float64).tiny)


def dead_fraction(load: Tensor) -> Tensor:
    """Fraction of experts that received no token. ``(..., E) -> (...)``."""
    return (load == 0).to(torch.float64).mean(-1)


def entropy(load: Tensor, normalize: bool = False) -> Tensor:
    """Shannon entropy (nats) of the normalised load; divided by log E if ``normalize`` (1 = uniform)."""
    p = _f64(load)
    p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    h = -torch.special.xlogy(p, p).sum(-1)
    return h / math.log(load.shape[-1]) if normalize and load.shape[-1] > 1 else h


def experts_for_coverage(counts: Tensor, fraction: float) -> Tensor:
    """Smallest number of experts whose tokens add up to ``fraction`` of each row's tokens.

    ``(..., E) -> (...)`` float64, NaN for rows without tokens. E.g. for ``(D, E)`` counts: how many experts
    carry 50% of each domain's tokens.
    """
    c = _f64(counts).sort(-1, descending=True).values
    cum = c.cumsum(-1)
    total = cum[..., -1:]
    n = (cum < fraction * total).sum(-1).to(torch.float64) + 1
    n = n.clamp(max=counts.shape[-1])
    return torch.where(total.squeeze(-1) > 0, n, torch.full_like(n, float("nan")))


def mutual_information(counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """I(D;E), H(D), H(E) in nats of the joint distribution given by ``(..., D, E)`` counts."""
    p = _f64(counts)
    p = p / p.sum((-2, -1), keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    pd, pe = p.sum(-1), p.sum(-2)  # (..., D), (..., E)
    h_d = -torch.special.xlogy(pd, pd).sum(-1)
    h_e = -torch.special.xlogy(pe, pe).sum(-1)
    h_de = -torch.special.xlogy(p, p).sum((-2, -1))
    return (h_d + h_e - h_de).clamp_min(0), h_d, h_e


def normalized_mutual_information(counts: Tensor) -> Tensor:
    """NMI = 2 I(D;E) / (H(D) + H(E)) (arithmetic normalisation, as scikit-learn) of ``(..., D, E)`` counts.

    1 for a one-to-one domain -> expert mapping, ~0 when expert choice is independent of the domain; 0 when
    either marginal is deterministic. With k > 1 experts per token a perfect split still scores below 1.
    """
    mi, h_d, h_e = mutual_information(counts)
    denom = h_d + h_e
    return torch.where(
        denom > 0, 2 * mi / denom.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(mi)
    )


def pairwise_jaccard(pools: Tensor) -> Tensor:
    """Jaccard index of every pair of expert sets. ``pools`` (..., n, E) bool -> (..., n, n) float64.

    Two empty sets have index 1.
    """
    m = _f64(pools)
    inter = m @ m.transpose(-2, -1)
    size = m.sum(-1)
    union = size.unsqueeze(-1) + size.unsqueeze(-2) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def pool_overlap_sums(pools: Tensor, domains: Tensor) -> Tensor:
    """Sums giving the mean pool Jaccard within and across domains over all unordered pairs of documents.

    pools: (..., n, E) bool per-document expert pools; domains: (n,) long. Returns (..., 4) float64
    ``[within_sum, within_pairs, across_sum, across_pairs]`` (summable over batches and processes).
    """
    n = pools.shape[-2]
    j = pairwise_jaccard(pools)  # (..., n, n)
    upper = torch.ones(n, n, dtype=torch.bool, device=pools.device).triu(1)
    same = (domains[:, None] == domains[None, :]) & upper
    across = ~same & upper
    sums = [(j * same).sum((-2, -1)), (j * across).sum((-2, -1))]
    pairs = [same.sum().to(j.dtype).expand_as(sums[0]), across.sum().to(j.dtype).expand_as(sums[0])]
    return torch.stack([sums[0], pairs[0], sums[1], pairs[1]], dim=-1)
