"""Pruning: exact with every expert kept, renormalised router softmax, proportional memory, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emo_lightning.checkpoint import load_model, read_checkpoint, save_checkpoint
from emo_lightning.errors import UserError
from emo_lightning.model import Routing, expert_parameter_counts, prune_model, pruned_router_config
from tests.experts.conftest import tiny_model, write_checkpoint


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 4096, (3, 40), generator=g)
    doc_ids = torch.tensor([[0] * 40, [0] * 25 + [1] * 15, [0] * 10 + [1] * 10 + [2] * 20])
    return ids, doc_ids


@pytest.mark.parametrize(
    ("kind", "shared", "routing"), [("emo", 1, "pool"), ("emo", 0, "full"), ("standard", 1, "full")]
)
def test_keep_all_reproduces_logits_exactly(kind: str, shared: int, routing: str) -> None:
    model = tiny_model(kind, num_shared=shared, top_k=shared + 2)
    rc = model.cfg.router
    small = prune_model(model, [list(range(rc.num_routed))] * len(model.blocks))
    ids, doc_ids = _inputs()
    r = Routing("pool", 4) if routing == "pool" else Routing()
    with torch.no_grad(), model.routing(r), small.routing(r):
        assert torch.equal(model(ids, doc_ids).logits, small(ids, doc_ids).logits)


@pytest.mark.parametrize("keep", [1, 2, 5])
def test_pruned_router_softmax_is_restricted_renormalised(keep: int) -> None:
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    kept = [sorted(torch.randperm(8, generator=g)[:keep].tolist()) for _ in model.blocks]
    small = prune_model(model, kept)
    h = torch.randn(2, 11, 32, generator=g)
    doc_ids = torch.zeros(2, 11, dtype=torch.long)
    for layer, (big, sm) in enumerate(zip(model.blocks, small.blocks, strict=True)):
        full = big.moe.router(h, doc_ids).logits.softmax(-1)[:, kept[layer]]
        restricted = full / full.sum(-1, keepdim=True)
        torch.testing.assert_close(
            sm.moe.router(h, doc_ids).logits.softmax(-1), restricted, rtol=1e-6, atol=1e-7
        )
    # whole model, layer 0 sees the same input: routes are the renormalised restriction
    ids, d = _inputs()
    with torch.no_grad(), model.routing(Routing()), small.routing(Routing()):
        p_full = model(ids, d, return_routes=True).layers[0].probs[..., kept[0]]
        p_small = small(ids, d, return_routes=True).layers[0].probs
    torch.testing.assert_close(p_small, p_full / p_full.sum(-1, keepdim=True), rtol=1e-6, atol=1e-7)


def test_router_config_clamps_top_k_and_pools() -> None:
    rc = tiny_model().cfg.router  # 9 experts, 1 shared, top-3 (k'=2), pools 2..8, eval 4
    one = pruned_router_config(rc, 1)
    assert (one.num_experts, one.top_k, one.pool_min, one.pool_max, one.pool_eval) == (2, 2, 1, 1, 1)
    three = pruned_router_config(rc, 3)
    assert (three.num_experts, three.top_k, three.pool_min, three.pool_max, three.pool_eval) == (
        4,
        3,
        2,
        3,
        3,
    )
    with pytest.raises(ValueError, match="kept routable"):
        pruned_router_config(rc, 0)


def test_expert_memory_shrinks_in_proportion() -> None:
    model = tiny_model()
    small = prune_model(model, [[0, 5]] * len(model.blocks))
    big, sm = expert_parameter_counts(model), expert_parameter_counts(small)
    assert sm["routed_experts"] * 8 == big["routed_experts"] * 2
    assert sm["routers"] * 8 == big["routers"] * 2
    assert (sm["shared_experts"], sm["dense"]) == (big["shared_experts"], big["dense"])


def test_subset_validation() -> None:
    model = tiny_model()
    with pytest.raises(UserError, match="different numbers"):
        prune_model(model, [[0, 1], [0], [2, 3]])
    with pytest.raises(UserError, match="distinct"):
        prune_model(model, [[0, 0]] * 3)
    with pytest.raises(UserError, match="layers"):
        prune_model(model, [[0, 1]])


def test_pruned_checkpoint_round_trip_and_lightning_load(tmp_path: Path) -> None:
    model = tiny_model()
    src = write_checkpoint(model, tmp_path / "full.ckpt")
    lm = load_model(src)
    small = prune_model(lm.model, [[1, 2, 7]] * 3)
    out = tmp_path / "small.ckpt"
    size = save_checkpoint(small, lm.hparams, out, read_checkpoint(src), emo_pruned={"note": "test"})
    assert size == out.stat().st_size < src.stat().st_size
    again = load_model(out)
    assert again.config.router.num_experts == 4 and again.meta["emo_pruned"] == {"note": "test"}
    ids, d = _inputs()
    with torch.no_grad():
        assert torch.equal(again.model(ids, d).logits, small(ids, d).logits)
    from emo_lightning.lit_module import EMOLitModule

    lit = EMOLitModule.load_from_checkpoint(out, map_location="cpu")
    lit.configure_model()
    lit.load_state_dict(torch.load(out, weights_only=True)["state_dict"])
    lit.eval()
    with torch.no_grad():
        assert torch.equal(lit.model(ids, d).logits, small(ids, d).logits)


def test_pruning_carries_the_selection_bias_of_the_kept_experts() -> None:
    import dataclasses

    from emo_lightning.model import EMOTransformer
    from tests.experts.conftest import tiny_config

    cfg = tiny_config()
    cfg.router = dataclasses.replace(cfg.router, balance="both")
    model = EMOTransformer(cfg).eval()
    for i, r in enumerate(model.routers()):
        r.expert_bias.copy_(torch.arange(8.0) * (i + 1))
    small = prune_model(model, [[1, 4], [0, 7], [2, 3]])
    assert [r.expert_bias.tolist() for r in small.routers()] == [[1.0, 4.0], [0.0, 14.0], [6.0, 9.0]]
