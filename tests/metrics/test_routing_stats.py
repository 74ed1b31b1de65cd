"""Pure routing statistics against hand computations."""

from __future__ import annotations

import math

import torch

from emo_lightning.metrics import routing_stats as rs


def test_balance_statistics_by_hand() -> None:
    load = torch.tensor([[4, 2, 2, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(rs.load_imbalance(load), torch.tensor([2.0, 1.0], dtype=torch.float64))
    cv = math.sqrt(((4 - 2) ** 2 + 0 + 0 + (0 - 2) ** 2) / 4) / 2
    torch.testing.assert_close(rs.load_cv(load), torch.tensor([cv, 0.0], dtype=torch.float64))
    torch.testing.assert_close(rs.dead_fraction(load), torch.tensor([0.25, 0.0], dtype=torch.float64))
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    torch.testing.assert_close(rs.entropy(load), torch.tensor([h, math.log(4)], dtype=torch.float64))
    torch.testing.assert_close(
        rs.entropy(load, normalize=True), torch.tensor([h / math.log(4), 1.0], dtype=torch.float64)
    )


def test_experts_for_coverage() -> None:
    counts = torch.tensor([[1, 5, 1, 3], [0, 0, 0, 0], [0, 0, 7, 0]])  # sorted row 0: 5,3,1,1 of 10
    torch.testing.assert_close(
        rs.experts_for_coverage(counts, 0.5), torch.tensor([1.0, math.nan, 1.0]).double(), equal_nan=True
    )
    torch.testing.assert_close(
        rs.experts_for_coverage(counts, 0.9), torch.tensor([3.0, math.nan, 1.0]).double(), equal_nan=True
    )
    torch.testing.assert_close(
        rs.experts_for_coverage(counts, 1.0), torch.tensor([4.0, math.nan, 1.0]).double(), equal_nan=True
    )


def test_nmi_is_one_for_a_perfect_mapping_and_zero_for_independence() -> None:
    # one-to-one domain -> expert (permuted, unequal domain sizes), 2 experts never used
    perfect = torch.zeros(4, 6, dtype=torch.long)
    perfect[torch.arange(4), torch.tensor([3, 0, 5, 1])] = torch.tensor([10, 200, 35, 7])
    assert rs.normalized_mutual_information(perfect).item() == torch.tensor(1.0, dtype=torch.float64).item()
    # exactly independent: outer product of marginals
    pd, pe = torch.tensor([1, 2, 3, 4]), torch.tensor([5, 1, 2, 2, 7, 3])
    assert abs(rs.normalized_mutual_information(pd[:, None] * pe[None, :]).item()) < 1e-12
    # sampled independently: ~0 (finite-sample bias only)
    g = torch.Generator().manual_seed(0)
    dom = torch.multinomial(pd.double(), 200_000, replacement=True, generator=g)
    exp = torch.multinomial(pe.double(), 200_000, replacement=True, generator=g)
    sampled = torch.zeros(4, 6, dtype=torch.long).index_put_(
        (dom, exp), torch.ones_like(dom), accumulate=True
    )
    assert rs.normalized_mutual_information(sampled).item() < 1e-3
    # batched over layers, and a loop reference on random counts
    rand = torch.randint(0, 50, (3, 4, 6), generator=g)
    got = rs.normalized_mutual_information(rand)
    for layer in range(3):
        p = rand[layer].double() / rand[layer].sum()
        pd_, pe_ = p.sum(1), p.sum(0)
        mi = sum(
            p[i, j] * math.log(p[i, j] / (pd_[i] * pe_[j])) for i in range(4) for j in range(6) if p[i, j] > 0
        )
        h = lambda q: -sum(x * math.log(x) for x in q.tolist() if x > 0)  # noqa: E731
        assert abs(got[layer].item() - 2 * mi / (h(pd_) + h(pe_))) < 1e-10


def test_pool_jaccard_within_and_across_domains() -> None:
    pools = torch.tensor(
        [[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool
    )  # docs 0,1 domain 0; docs 2,3 domain 1
    j = rs.pairwise_jaccard(pools)
    assert (
        j[0, 1].item() == 2 / 3 and j[0, 2].item() == 0.0 and j[1, 2].item() == 1 / 4 and j[3, 3].item() == 1
    )
    sums = rs.pool_overlap_sums(pools, torch.tensor([0, 0, 1, 1]))
    # within: (0,1)=2/3, (2,3)=0; across: (0,2)=0, (0,3)=0, (1,2)=1/4, (1,3)=0
    torch.testing.assert_close(sums, torch.tensor([2 / 3, 2, 1 / 4, 4], dtype=torch.float64))
    batched = rs.pool_overlap_sums(torch.stack([pools, pools]), torch.tensor([0, 0, 1, 1]))
    assert batched.shape == (2, 4) and torch.equal(batched[1], sums)
