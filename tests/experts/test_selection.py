"""Layer-wise selection: causal in depth, deterministic, ranks by calibration probability; random subsets."""

from __future__ import annotations

import pytest
import torch

from emo_lightning.errors import UserError
from emo_lightning.experts.cli import main
from emo_lightning.experts.documents import Document, pack_documents
from emo_lightning.experts.selection import (
    Subset,
    compose_subsets,
    layerwise_subset,
    parse_keep,
    random_subset,
)
from emo_lightning.model import FULL
from tests.experts.conftest import tiny_model


def _batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    docs = [
        Document(f"d{i}", "x", torch.randint(2, 4096, (n,), generator=g).numpy())
        for i, n in enumerate((50, 90, 17))
    ]
    return pack_documents(docs, 64, 2, pad_id=1)


def test_layer_l_does_not_depend_on_later_layers() -> None:
    model, batches = tiny_model(), _batches()
    ref = layerwise_subset(model, batches, keep=3)
    for layer in range(len(model.blocks)):
        other = tiny_model(seed=0)
        with torch.no_grad():  # scramble every layer after this one (router, experts, attention)
            for blk in other.blocks[layer + 1 :]:
                for p in blk.parameters():
                    p.copy_(torch.randn_like(p))
        got = layerwise_subset(other, batches, keep=3)
        assert got.layers[: layer + 1] == ref.layers[: layer + 1]
        assert got.scores[: layer + 1] == ref.scores[: layer + 1]
        if layer + 1 < len(model.blocks):
            assert got.scores[layer + 1] != ref.scores[layer + 1]  # the scrambling did reach later layers


def test_selection_is_deterministic() -> None:
    model, batches = tiny_model(), _batches()
    a = layerwise_subset(model, batches, keep=4)
    b = layerwise_subset(model, batches, keep=4)
    assert a.to_dict() == b.to_dict()
    assert all(len(layer) == 3 and layer == sorted(layer) for layer in a.layers)


def test_first_layer_keeps_the_highest_mean_probability() -> None:
    model, batches = tiny_model(), _batches()
    sub = layerwise_subset(model, batches, keep=4)
    scores = torch.tensor(sub.scores[0])
    assert sorted(scores.argsort(descending=True)[:3].tolist()) == sub.layers[0]
    assert scores.sum().item() == pytest.approx(1.0, abs=1e-4)  # a token-weighted mean of softmaxes


def test_earlier_cuts_change_later_measurements() -> None:
    model, batches = tiny_model(), _batches()
    full = torch.tensor(layerwise_subset(model, batches, keep=9).scores[1])  # keep all: nothing is cut
    cut = torch.tensor(layerwise_subset(model, batches, keep=2).scores[1])
    assert not torch.allclose(full, cut)


def test_parse_keep_count_and_fraction() -> None:
    rc = tiny_model().cfg.router  # 9 experts, 1 shared
    assert parse_keep("4", rc) == 4
    assert parse_keep("0.5", rc) == 4  # round(4.5) = 4 (banker's), shared included
    assert parse_keep("1", rc) == 9 and parse_keep("1.0", rc) == 9  # "1" is the fraction "all"
    assert parse_keep("0.0625", rc) == 2  # at least one routable expert besides the shared one
    with pytest.raises(UserError, match="the model has 9 experts"):
        parse_keep("12", rc)
    with pytest.raises(UserError, match=r"fraction must lie in \(0, 1\]"):
        parse_keep("1.5", rc)
    with pytest.raises(UserError, match="not a number"):
        parse_keep("a quarter", rc)


def test_random_subset_seeded_and_round_trip() -> None:
    rc = tiny_model().cfg.router
    a, b, c = (
        random_subset(rc, 3, 4, seed=1),
        random_subset(rc, 3, 4, seed=1),
        random_subset(rc, 3, 4, seed=2),
    )
    assert a.layers == b.layers != c.layers
    assert Subset.from_dict(a.to_dict()).to_dict() == a.to_dict()


def test_compose_is_the_per_layer_union_filled_to_one_size_and_idempotent() -> None:
    model = tiny_model()
    a = layerwise_subset(model, _batches(0), keep=3)  # 2 routable experts per layer
    b = layerwise_subset(model, _batches(5), keep=3)
    r = random_subset(model.cfg.router, len(model.blocks), keep=4, seed=1)
    ab = compose_subsets([a, b, r])
    unions = [set(x) | set(y) | set(z) for x, y, z in zip(a.layers, b.layers, r.layers, strict=True)]
    assert ab.info["union_sizes"] == [len(u) for u in unions]
    size = max(len(u) for u in unions)
    assert ab.keep == size + 1 and all(len(layer) == size for layer in ab.layers)
    for layer, union, filled in zip(ab.layers, unions, ab.info["filled"], strict=True):
        assert union <= set(layer) and set(layer) - union == set(filled)
    # filled experts are the best remaining ones by the summed selection scores
    for i, filled in enumerate(ab.info["filled"]):
        rest = [e for e in range(8) if e not in unions[i]]
        best = sorted(rest, key=lambda e: (-(a.scores[i][e] + b.scores[i][e]), e))[: len(filled)]
        assert sorted(best) == filled
    assert compose_subsets([a, a]).layers == a.layers  # idempotent
    assert compose_subsets([ab, b]).layers == ab.layers  # composing with a part changes nothing
    small = Subset([[0]] * 3, 2, 16, 1, "random")
    with pytest.raises(UserError, match="16 experts"):
        compose_subsets([a, small], ["a.json", "small.json"])


def test_compose_command_prunes_to_a_model_serving_both(tmp_path, capsys) -> None:
    from tests.experts.conftest import write_checkpoint

    ckpt = write_checkpoint(tiny_model(), tmp_path / "m.ckpt")
    paths = []
    for seed in (1, 2):
        out = tmp_path / f"s{seed}.json"
        main(["select", "--ckpt", str(ckpt), "--data", str(out), "--method", "random", "--seed", str(seed),
              "--keep", "3", "--out", str(out), "--no-progress"])  # fmt: skip
        paths.append(str(out))
    main(["compose", *paths, "--out", str(tmp_path / "ab.json")])
    assert "union of" in capsys.readouterr().out
    main(["prune", "--ckpt", str(ckpt), "--subset", str(tmp_path / "ab.json"), "--out", str(tmp_path / "ab.ckpt"),
          "--no-progress"])  # fmt: skip
    assert (tmp_path / "ab.ckpt").is_file()


# ---------------------------------------------------------------- Easy-EP and the global budget


def test_easy_ep_scores_on_a_hand_computed_toy() -> None:
    """Three tokens, three routable experts, k' = 1 (a shared expert follows in ``experts``)."""
    from emo_lightning.experts.selection import easy_ep_scores
    from emo_lightning.model import LayerRouting

    h = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])  # (1,3,2)
    y = torch.tensor([[[0.0, 1.0], [0.0, 1.0], [0.0, 5.0]]])  # token 0 turns 45 degrees, token 1 not at all
    lr = LayerRouting(counts=torch.zeros(3, dtype=torch.long), lb=torch.tensor(0.0), z=torch.tensor(0.0),
                      pool_sizes=torch.zeros(1, 3, dtype=torch.long))  # fmt: skip
    lr.experts = torch.tensor([[[2, 3], [0, 3], [1, 3]]])  # routed expert, then the shared id 3
    lr.weights = torch.tensor([[[0.5, 1.0], [0.8, 1.0], [0.9, 1.0]]])
    lr.moe_input, lr.moe_output = h, y
    lr.expert_norms = torch.tensor([[[2.0], [3.0], [7.0]]])
    valid = torch.tensor([[True, True, False]])  # token 2 is padding: excluded whatever it scores
    # expert 2: 0.5 * 2 * (1 - cos 45 deg); expert 0: 0.8 * 3 * (1 - 1) = 0; expert 1: padding only
    expected = torch.tensor([0.0, 0.0, 0.5 * 2.0 * (1 - 2**-0.5)], dtype=torch.float64)
    torch.testing.assert_close(easy_ep_scores(lr, valid), expected)


def _easy_ep_reference(model, batches) -> torch.Tensor:
    """Token by token, from forward hooks (not the capture): (L,E') summed g * ||E(h)|| * (1 - cos(h, h + y))."""
    rc = model.cfg.router
    k = rc.routed_k
    total = torch.zeros(len(model.blocks), rc.num_routed, dtype=torch.float64)
    for b in batches:
        seen = []
        hooks = [
            blk.moe.register_forward_hook(lambda _m, a, o, seen=seen: seen.append((a[0], o[0])))
            for blk in model.blocks
        ]
        with torch.no_grad(), model.routing(FULL):
            out = model(b.input_ids, b.doc_ids, return_routes=True)
        for hk in hooks:
            hk.remove()
        for layer, ((h, y), lr) in enumerate(zip(seen, out.layers, strict=True)):
            moe = model.blocks[layer].moe.requires_grad_(False)
            for r, t in (b.doc_index >= 0).nonzero().tolist():
                x = h[r, t]
                turn = 1 - torch.nn.functional.cosine_similarity(x.double(), (x + y[r, t]).double(), dim=0)
                for j, e in enumerate(lr.experts[r, t, :k].tolist()):
                    g, u = (x @ moe.experts.w_in[e]).chunk(2)
                    norm = ((torch.nn.functional.silu(g) * u) @ moe.experts.w_out[e]).norm()
                    total[layer, e] += float(lr.weights[r, t, j] * norm * turn)
    return total


@pytest.mark.parametrize("shared", [0, 1])
def test_easy_ep_matches_the_token_by_token_reference(shared: int) -> None:
    from emo_lightning.experts.selection import easy_ep_subset

    model, batches = tiny_model(num_shared=shared, top_k=shared + 2), _batches()
    ref = _easy_ep_reference(model, batches)
    sub = easy_ep_subset(model, batches, keep=shared + 3)
    shares = ref / ref.sum(1, keepdim=True)
    torch.testing.assert_close(torch.tensor(sub.scores, dtype=torch.float64), shares, rtol=1e-4, atol=1e-6)
    top = shares.argsort(dim=1, descending=True, stable=True)[:, :3].sort(dim=1).values
    assert sub.layers == top.tolist()  # shared experts (id 8) are never listed: always kept
    assert sub.method == "easy_ep" and sub.keep == shared + 3


def test_easy_ep_is_one_forward_and_ignores_padding() -> None:
    from emo_lightning.experts.selection import easy_ep_subset

    model = tiny_model()
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    g = torch.Generator().manual_seed(0)
    docs = [
        Document(f"d{i}", "x", torch.randint(2, 4096, (n,), generator=g).numpy())
        for i, n in enumerate((50, 9))
    ]
    tight = pack_documents(docs, 64, 1, pad_id=1)  # 1 batch of 1 row (5 padding tokens)
    loose = pack_documents(docs, 64, 3, pad_id=1)  # 1 batch of 3 rows: two of them padding only
    a = easy_ep_subset(model, tight, keep=4)
    assert len(calls) == len(tight) == 1  # every layer from the same single forward
    b = easy_ep_subset(model, loose, keep=4)
    hook.remove()
    torch.testing.assert_close(torch.tensor(a.scores), torch.tensor(b.scores), rtol=1e-5, atol=1e-7)
    assert a.info["score_totals"] == pytest.approx(b.info["score_totals"], rel=1e-5)


def test_spread_budget_by_hand() -> None:
    from emo_lightning.experts.selection import spread_budget

    shares = torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]])
    # every layer keeps its best; the other 2 of the budget go to the largest shares left: 0.3, 0.2 (layer 0)
    assert spread_budget(shares, 4).tolist() == [[True, True, True], [True, False, False]]
    assert spread_budget(shares, 2).tolist() == [[True, False, False], [True, False, False]]
    assert spread_budget(shares, 5).tolist() == [[True, True, True], [True, True, False]]  # tie: lower id
    with pytest.raises(ValueError, match="cannot keep"):
        spread_budget(shares, 1)


@pytest.mark.parametrize("method", ["easy_ep", "layerwise"])
def test_global_budget_keeps_the_total_and_evaluates_masked(method: str) -> None:
    from emo_lightning.experts.evaluate import document_losses
    from emo_lightning.experts.selection import select_subset
    from emo_lightning.model import prune_model, subset_mask

    model, batches = tiny_model(), _batches()
    sub = select_subset(model, batches, keep=3, method=method, budget="global")
    counts = [len(layer) for layer in sub.layers]
    assert sum(counts) == 3 * 2 and min(counts) >= 1 and sub.info["budget"] == "global"
    cut, allowed = sub.apply(model)
    assert (cut is model) == (not sub.uniform) and (allowed is None) == sub.uniform
    # masked evaluation is the pruned model's: checked on a uniform subset forced through the mask
    uni = select_subset(model, batches, keep=3, method=method)
    docs = [Document(f"d{i}", "x", b.input_ids[0].numpy()) for i, b in enumerate(batches)]
    packed = pack_documents(docs, 64, 2, pad_id=1)
    masked = document_losses(model, docs, packed, allowed=subset_mask(uni.layers, 8))
    pruned = document_losses(prune_model(model, uni.layers), docs, packed)
    torch.testing.assert_close(masked.loss_sum, pruned.loss_sum, rtol=1e-5, atol=1e-5)


def test_direction_change_is_exact_where_float32_cosine_cancels() -> None:
    from emo_lightning.experts.selection import direction_change

    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 128, generator=g)
    for scale in (1e-4, 1e-2, 1.0, 10.0):
        y = scale * torch.randn(64, 128, generator=g)
        exact = 1 - torch.nn.functional.cosine_similarity(h.double(), (h + y).double(), dim=-1)
        torch.testing.assert_close(direction_change(h, y).double(), exact, rtol=1e-4, atol=1e-12)
    assert direction_change(h, -2 * h).tolist() == pytest.approx([2.0] * 64)  # reversed: 1 - (-1)
