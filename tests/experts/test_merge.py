"""``emo-experts merge``: a fine-tuned part's experts go back to their ids; everything else is as asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from emo_lightning.checkpoint import PREFIX, load_model, read_checkpoint
from emo_lightning.experts.cli import main
from emo_lightning.model import per_expert_key
from tests.experts.conftest import tiny_model, write_checkpoint

KEPT = [[1, 4, 6], [0, 2, 7], [3, 5, 6]]  # routable ids of the 8 (plus the shared expert 8)


def _part(tmp_path: Path, full: Path, tuned: bool = True, init_from: bool = False) -> Path:
    """Prune ``full`` to KEPT, then (``tuned``) perturb every weight like a fine-tuning would. ``init_from``: save it
    the way ``emo fit --init_from small.ckpt`` does (no ``emo_pruned``, ``hyper_parameters.init_from``)."""
    subset = {"format": "emo-expert-subset", "method": "layerwise", "keep": 4, "num_experts": 9,
              "num_shared": 1, "layers": KEPT}  # fmt: skip
    (tmp_path / "s.json").write_text(json.dumps(subset))
    small = tmp_path / "small.ckpt"
    main(
        [
            "prune",
            "--ckpt",
            str(full),
            "--subset",
            str(tmp_path / "s.json"),
            "--out",
            str(small),
            "--no-progress",
        ]
    )
    if not tuned:
        return small
    ckpt = read_checkpoint(small)
    g = torch.Generator().manual_seed(7)
    ckpt["state_dict"] = {
        k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in ckpt["state_dict"].items()
    }
    if init_from:
        del ckpt["emo_pruned"]
        ckpt["hyper_parameters"] = {**ckpt["hyper_parameters"], "init_from": str(small)}
    out = tmp_path / "tuned.ckpt"
    torch.save(ckpt, out)
    return out


def _state(path: Path) -> dict[str, torch.Tensor]:
    return {k[len(PREFIX) :]: v for k, v in read_checkpoint(path)["state_dict"].items()}


@pytest.mark.parametrize("init_from", [False, True])
def test_merged_experts_equal_the_part_and_the_rest_is_untouched(tmp_path: Path, init_from: bool) -> None:
    full = write_checkpoint(tiny_model(), tmp_path / "full.ckpt")
    part = _part(tmp_path, full, init_from=init_from)
    main(
        [
            "merge",
            "--full",
            str(full),
            "--part",
            str(part),
            "--out",
            str(tmp_path / "m.ckpt"),
            "--no-progress",
        ]
    )
    f, p, m = _state(full), _state(part), _state(tmp_path / "m.ckpt")
    assert m.keys() == f.keys()
    for key, value in m.items():
        where = per_expert_key(key)
        if where is not None and where[1].startswith("experts."):
            layer = where[0]
            untouched = [e for e in range(8) if e not in KEPT[layer]]
            assert torch.equal(value[untouched], f[key][untouched])  # bit-identical
            assert torch.equal(value[KEPT[layer]], p[key])  # the part's experts, at their original ids
        else:  # defaults: dense weights and router rows stay the full model's
            assert torch.equal(value, f[key]), key
    assert read_checkpoint(tmp_path / "m.ckpt")["emo_merged"]["layers"] == KEPT
    assert load_model(tmp_path / "m.ckpt").config == load_model(full).config  # a full-size model


def test_dense_and_router_options(tmp_path: Path) -> None:
    full = write_checkpoint(tiny_model(), tmp_path / "full.ckpt")
    part = _part(tmp_path, full)
    f, p = _state(full), _state(part)
    for dense, router in (("part", "part"), ("average", "full")):
        out = tmp_path / f"{dense}.ckpt"
        main(["merge", "--full", str(full), "--part", str(part), "--out", str(out), "--dense", dense,
              "--router", router, "--no-progress"])  # fmt: skip
        m = _state(out)
        for key, value in m.items():
            where = per_expert_key(key)
            if where is None:
                want = p[key] if dense == "part" else (f[key] + p[key]) / 2
                torch.testing.assert_close(value, want, rtol=0, atol=1e-7)
            elif where[1].startswith("router."):
                kept = KEPT[where[0]]
                assert torch.equal(value[kept], p[key] if router == "part" else f[key][kept])


def test_merging_an_untuned_part_gives_the_full_model_back(tmp_path: Path) -> None:
    full = write_checkpoint(tiny_model(), tmp_path / "full.ckpt")
    part = _part(tmp_path, full, tuned=False)
    main(["merge", "--full", str(full), "--part", str(part), "--out", str(tmp_path / "m.ckpt"), "--dense", "part",
          "--router", "part", "--no-progress"])  # fmt: skip
    ids = torch.randint(2, 4096, (2, 30), generator=torch.Generator().manual_seed(0))
    a, b = load_model(full).model, load_model(tmp_path / "m.ckpt").model
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_a_part_that_does_not_fit_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    full = write_checkpoint(tiny_model(), tmp_path / "full.ckpt")
    other = write_checkpoint(tiny_model(top_k=2, num_shared=0), tmp_path / "other.ckpt")  # 9 routable
    stranger = write_checkpoint(tiny_model(), tmp_path / "stranger.ckpt")  # a full model: no record of ids
    part = _part(tmp_path, full)
    for args, message in (
        (["--full", str(other), "--part", str(part)], "shared experts"),
        (["--full", str(full), "--part", str(stranger)], "no record of the experts it holds"),
    ):
        with pytest.raises(SystemExit) as err:
            main(["merge", *args, "--out", str(tmp_path / "x.ckpt"), "--no-progress"])
        assert err.value.code == 2
        line = capsys.readouterr().err.strip()
        assert line.startswith("emo-experts: --part") and message in line and "\n" not in line
    assert not (tmp_path / "x.ckpt").exists()
