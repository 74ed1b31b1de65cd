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
