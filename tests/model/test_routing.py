"""Inference routing asked of the model: ``EMOTransformer.routing`` modes, ``allowed`` restrictions and
``prefix_pools``. The pools the model reports are the pools its routers used, for every ``balance`` and
``pool_scope`` (a large selection bias makes a wrong report visible)."""

from __future__ import annotations

import pytest
import torch

from emo_lightning.model import (
    FULL,
    ArchConfig,
    EMOTransformer,
    ModelConfig,
    RouterConfig,
    Routing,
    prune_model,
    segment_index,
    subset_mask,
)

E_ROUTED = 12


def _model(balance: str = "both", scope: str = "document", bias_scale: float = 4.0, seed: int = 0):
    """Sharp routers and (``balance`` bias/both) a large random selection bias: the bias decides pools."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        arch=ArchConfig(vocab_size=256, d_model=32, n_layers=3, n_heads=2, expert_hidden=16, max_seq_len=64),
        router=RouterConfig(
            num_experts=E_ROUTED + 1, num_shared=1, top_k=3, pool_min=2, pool_max=E_ROUTED, pool_eval=5,
            pool_scope=scope, balance=balance, seed=seed,
        ),
    )  # fmt: skip
    model = EMOTransformer(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for r in model.routers():
            r.weight.normal_(0.0, 0.3, generator=g)
            if r.expert_bias is not None:
                r.expert_bias.copy_(bias_scale * torch.randn(E_ROUTED, generator=g))
    return model.eval()


def _batch(seed: int = 2, b: int = 3, s: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (b, s), generator=g)
    cuts = torch.randint(0, s, (b, 3), generator=g)
    doc_ids = (torch.arange(s).view(1, s, 1) >= cuts.unsqueeze(1)).sum(-1)  # (B,S) up to 4 documents
    return ids, doc_ids


def _routed_inside(out, doc_ids: torch.Tensor, n_routed: int = E_ROUTED) -> list[bool]:
    """Per layer: every token's routed experts lie inside its segment's reported pool."""
    seg = segment_index(doc_ids).unsqueeze(-1).expand(-1, -1, n_routed)
    ok = []
    for lr in out.layers:
        pool = lr.pool_mask.gather(1, seg)  # (B,S,E') the token's segment's pool
        routed = lr.experts[..., :-1]  # the shared expert (id E') comes last
        ok.append(bool(pool.gather(-1, routed).all()))
    return ok


@pytest.mark.parametrize("balance", ["aux_loss", "bias", "both"])
@pytest.mark.parametrize("scope", ["document", "running"])
def test_reported_pools_hold_every_routed_expert(balance: str, scope: str) -> None:
    model = _model(balance, scope)
    ids, doc_ids = _batch()
    for routing in (Routing("pool", 4), Routing("running", 4)):
        with torch.no_grad(), model.routing(routing):
            out = model(ids, doc_ids, return_routes=True)
        assert all(_routed_inside(out, doc_ids)), (routing, balance)
        if routing.kind == "pool":  # a document pool has exactly P experts
            present = out.layers[0].pool_sizes >= 0
            assert all(((lr.pool_mask.sum(-1) == 4) | ~present).all() for lr in out.layers)


def test_the_bias_decides_the_reported_pools() -> None:
    """Not vacuous: with the bias, the reported pools are not the unbiased top-P of the router probabilities
    (what the toolkit used to report), and the bias-free model reports exactly those."""
    ids, doc_ids = _batch()
    reported = {}
    for balance in ("both", "aux_loss"):
        model = _model(balance)
        with torch.no_grad(), model.routing(Routing("pool", 4)):
            out = model(ids, doc_ids, return_routes=True)
        seg = segment_index(doc_ids)
        unbiased = []
        for lr in out.layers:  # top-4 of each segment's summed unbiased softmax
            pref = torch.zeros(3, 48, E_ROUTED).scatter_add_(
                1, seg.unsqueeze(-1).expand_as(lr.probs), lr.probs
            )
            top = pref.topk(4, dim=-1).indices
            unbiased.append(torch.zeros_like(lr.pool_mask).scatter_(-1, top, True))
        present = out.layers[0].pool_sizes >= 0
        reported[balance] = [
            bool((lr.pool_mask == u)[present].all()) for lr, u in zip(out.layers, unbiased, strict=True)
        ]
    assert all(reported["aux_loss"])
    assert not any(reported["both"])


def test_prefix_pools_are_the_routers_choice_on_the_prefix_bias_included() -> None:
    model = _model("both")
    ids, _ = _batch(s=20)
    lengths = torch.tensor([20, 7, 13])
    pools = model.prefix_pools(ids, lengths, 4)  # (L,D,E')
    assert pools.shape == (3, 3, E_ROUTED) and (pools.sum(-1) == 4).all()
    for d in range(3):  # each prefix alone, as one document, under pool:4
        solo = ids[d : d + 1, : lengths[d]]
        with torch.no_grad(), model.routing(Routing("pool", 4)):
            out = model(solo, torch.zeros_like(solo), return_routes=True)
        for layer, lr in enumerate(out.layers):
            assert torch.equal(pools[layer, d], lr.pool_mask[0, 0])
    # the bias matters: without it the same weights choose other pools
    for r in model.routers():
        r.expert_bias.zero_()
    assert not torch.equal(model.prefix_pools(ids, lengths, 4), pools)


def test_causal_routing_stays_inside_the_prefix_pools() -> None:
    model = _model("both")
    ids, _ = _batch(s=40)
    doc_ids = torch.zeros_like(ids)  # one document per row
    pools = model.prefix_pools(ids[:, :10], torch.full((3,), 10), 4)  # (L,3,E')
    with torch.no_grad(), model.routing(Routing("causal", 4, 10)):
        out = model(ids, doc_ids, allowed=pools[:, :, None, :], return_routes=True)
    assert all(_routed_inside(out, doc_ids))
    for layer, lr in enumerate(out.layers):
        assert torch.equal(lr.pool_mask[:, 0], pools[layer])  # reported: the forced pools


@pytest.mark.parametrize("routing", [FULL, Routing("pool", 3), Routing("running", 5), Routing("pool", 9)])
def test_allowed_subset_routes_like_the_pruned_model(routing: Routing) -> None:
    model = _model("both")
    ids, doc_ids = _batch()
    kept = [[0, 3, 4, 7, 9, 11], [1, 2, 5, 6, 8, 10], [0, 1, 2, 3, 4, 5]]
    small = prune_model(model, kept)
    with torch.no_grad(), model.routing(routing), small.routing(routing):
        a = model(ids, doc_ids, allowed=subset_mask(kept, E_ROUTED), return_routes=True)
        b = small(ids, doc_ids, return_routes=True)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)
    for layer, (la, lb) in enumerate(zip(a.layers, b.layers, strict=True)):
        ids_kept = torch.tensor(kept[layer])
        assert torch.equal(la.pool_mask[..., ids_kept], lb.pool_mask)  # same pools, in full-model ids
        assert not la.pool_mask[..., [e for e in range(E_ROUTED) if e not in kept[layer]]].any()


def test_routing_restores_the_configured_mode_and_the_training_flag() -> None:
    model = _model("aux_loss").train()
    ids, doc_ids = _batch()
    with model.routing(Routing("running", 3)):
        assert not model.training
        assert all(r.pool_eval == 3 and r.pool_scope == "running" for r in model.routers())
    assert model.training
    assert all(r.pool_eval == 5 and r.pool_scope == "document" for r in model.routers())
    model.eval()
    with torch.no_grad(), model.routing(FULL):
        out = model(ids, doc_ids, return_routes=True)
    assert all(lr.pool_mask[lr.pool_sizes >= 0].all() for lr in out.layers)  # unrestricted: every expert
