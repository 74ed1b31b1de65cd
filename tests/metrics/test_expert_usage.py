"""``ExpertUsage``: hand-computed counts on a fixed routing, the model's routes, and 2-process gloo reduction."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from emo_lightning.metrics import ExpertUsage
from emo_lightning.metrics.expert_usage import segment_domains
from emo_lightning.model import ArchConfig, EMOTransformer, ModelConfig, RouterConfig
from tests.gloo import run_gloo
from tests.metrics import expert_usage_dist_worker


def fixed_update() -> dict[str, torch.Tensor]:
    """L=2 layers, B=2 rows of S=4 tokens, k=2 routed slots, D=3 domains, E=4 experts; last token is padding."""
    experts = torch.tensor(
        [
            [[[0, 1], [0, 2], [3, 1], [3, 0]], [[2, 3], [2, 3], [1, 0], [0, 1]]],  # layer 0
            [[[1, 1], [1, 2], [0, 1], [2, 2]], [[3, 3], [0, 3], [2, 3], [3, 3]]],  # layer 1
        ]
    )
    domain_ids = torch.tensor([[0, 0, 2, 2], [1, 1, 1, -1]])
    doc_ids = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]])
    pool_sizes = torch.tensor([[[2, 3, -1, -1], [4, 4, -1, -1]], [[1, 2, -1, -1], [2, 3, -1, -1]]])
    pool_mask = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    pool_mask[0, 0, 0, :2] = pool_mask[0, 0, 1, 1:4] = pool_mask[0, 1, 0] = pool_mask[0, 1, 1] = True
    pool_mask[1, 0, 0, 1] = pool_mask[1, 0, 1, 1:3] = pool_mask[1, 1, 0, 2:4] = True
    pool_mask[1, 1, 1, :3] = True
    return {
        "experts": experts,
        "domain_ids": domain_ids,
        "doc_ids": doc_ids,
        "pool_sizes": pool_sizes,
        "pool_mask": pool_mask,
        "lb": torch.tensor([1.5, 2.0]),
        "z": torch.tensor([0.25, 0.5]),
    }


def test_counts_equal_a_hand_computation() -> None:
    u = fixed_update()
    metric = ExpertUsage(2, 3, 4)
    metric.update(**u)
    expected = torch.zeros(2, 3, 4, dtype=torch.long)
    for layer in range(2):
        for b in range(2):
            for s in range(4):
                d = int(u["domain_ids"][b, s])
                if d >= 0:
                    for e in u["experts"][layer, b, s].tolist():
                        expected[layer, d, e] += 1
    assert torch.equal(metric.counts, expected)
    # spot-check one cell by hand: layer 0, domain 1 = row 1 tokens 0..2 -> experts 2,3,2,3,1,0
    assert expected[0, 1].tolist() == [1, 1, 2, 2]

    out = metric.compute()
    assert torch.equal(out["load"], expected.sum(1))
    # pools: row 0 has 2 docs (domains 0, 2), row 1 one real doc (domain 1) + the padding segment (ignored)
    torch.testing.assert_close(out["pool_size"], torch.tensor([(2 + 3 + 4) / 3, (1 + 2 + 2) / 3]).double())
    # all pairs are across domains; layer 0 pools {0,1}, {1,2,3}, {0,1,2,3} -> J = 1/4, 2/4, 3/4;
    # layer 1 pools {1}, {1,2}, {2,3} -> J = 1/2, 0, 1/3
    torch.testing.assert_close(out["jaccard_across"], torch.tensor([0.5, (0.5 + 0.0 + 1 / 3) / 3]).double())
    assert out["jaccard_within"].isnan().all()  # no two documents share a domain
    torch.testing.assert_close(out["lb"], torch.tensor([1.5, 2.0]).double())
    torch.testing.assert_close(out["z"], torch.tensor([0.25, 0.5]).double())

    metric.update(**u)  # a second micro-batch: counts add up, means stay
    assert torch.equal(metric.counts, 2 * expected)
    torch.testing.assert_close(metric.compute()["lb"], torch.tensor([1.5, 2.0]).double())
    metric.reset()
    assert metric.counts.sum() == 0 and metric.stats.sum() == 0


def test_segment_domains() -> None:
    doc_ids = torch.tensor([[0, 0, 1, 1, 2], [0, 1, 1, 1, 1]])
    domain_ids = torch.tensor([[3, 3, 1, 1, -1], [2, 0, 0, 0, 0]])
    assert segment_domains(doc_ids, domain_ids).tolist() == [[3, 1, -1, -1, -1], [2, 0, -1, -1, -1]]


@pytest.mark.parametrize("kind", ["emo", "standard"])
def test_model_routes_feed_the_metric(kind: str) -> None:
    """pool_mask agrees with pool_sizes; every non-padding token counts k' slots per layer."""
    rc = RouterConfig(kind=kind, num_experts=8, num_shared=1, top_k=3, pool_min=2, pool_max=5, pool_eval=3)
    arch = ArchConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, expert_hidden=32, max_seq_len=32)
    torch.manual_seed(0)
    model = EMOTransformer(ModelConfig(arch, rc)).train()
    ids = torch.randint(0, 64, (3, 32))
    doc_ids = torch.tensor([0] * 10 + [1] * 12 + [2] * 10).expand(3, 32)
    domain_ids = torch.tensor([[0] * 10 + [1] * 12 + [2] * 10, [2] * 32, [1] * 30 + [-1] * 2])
    out = model(ids, doc_ids, return_routes=True, route_probs=False)
    for layer in out.layers:
        assert layer.probs is None and layer.pool_mask.shape == (3, 32, 7)
        present = layer.pool_sizes >= 0
        assert torch.equal(layer.pool_mask.sum(-1)[present], layer.pool_sizes[present])
        assert not layer.pool_mask[~present].any()
        in_pool = layer.pool_mask.gather(1, doc_ids.unsqueeze(-1).expand(3, 32, 7))  # token's own pool
        assert in_pool.gather(2, layer.experts[..., :2]).all()  # routed experts lie in the pool
    metric = ExpertUsage(2, 3, 7)
    metric.update(
        torch.stack([layer.experts[..., :2] for layer in out.layers]),
        domain_ids,
        doc_ids=doc_ids,
        pool_sizes=torch.stack([layer.pool_sizes for layer in out.layers]),
        pool_mask=torch.stack([layer.pool_mask for layer in out.layers]),
    )
    assert metric.counts.sum((1, 2)).tolist() == [2 * 94, 2 * 94]
    res = metric.compute()
    if kind == "standard":
        assert res["pool_size"].tolist() == [7.0, 7.0] and res["jaccard_across"].tolist() == [1.0, 1.0]
    else:
        assert (res["pool_size"] >= 2).all() and (res["pool_size"] <= 5).all()


@pytest.mark.distributed
def test_counts_reduced_over_two_gloo_processes_equal_one_process(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    shape = (3, 4, 6)  # L, D, E
    updates = []
    for _ in range(4):  # 4 micro-batches: ranks take 0,2 and 1,3
        b, s = 2, 16
        doc_ids = (torch.arange(s) // 5).expand(b, s).contiguous()
        pools = torch.rand(3, b, s, 6, generator=g) < 0.5
        pools[:, :, 4:] = False
        updates.append(
            {
                "experts": torch.randint(0, 6, (3, b, s, 2), generator=g),
                "domain_ids": torch.randint(-1, 4, (b, 1), generator=g).expand(b, s).contiguous(),
                "doc_ids": doc_ids,
                "pool_sizes": torch.where(torch.arange(s) < 4, pools.sum(-1), -1),
                "pool_mask": pools,
                "lb": torch.rand(3, generator=g),
                "z": torch.rand(3, generator=g),
            }
        )
    dp = run_gloo(expert_usage_dist_worker.run, {"shape": shape, "updates": updates}, tmp_path)

    single = ExpertUsage(*shape)
    for update in updates:
        single.update(**update)
    ref = single.compute()
    assert torch.equal(dp["fast"]["counts"], single.counts) and single.counts.sum() > 0
    assert not torch.equal(dp["local"], single.counts)  # rank 0 alone saw only part of the tokens
    assert torch.equal(dp["local_after"], dp["local"])  # compute() restored the local state
    for key, value in ref.items():
        torch.testing.assert_close(dp["fast"][key], value, equal_nan=True, msg=key)
        torch.testing.assert_close(dp["gather"][key], value, equal_nan=True, msg=key)
    assert not math.isnan(ref["jaccard_within"][0]) and not math.isnan(ref["jaccard_across"][0])
