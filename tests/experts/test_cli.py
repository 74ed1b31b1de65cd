"""The ``emo-experts`` commands end to end on a tiny random checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emo_lightning.experts.checkpoint import load_model
from emo_lightning.experts.cli import build_parser, main
from tests.experts.conftest import TOKENIZER, tiny_model, write_checkpoint


def _run(*argv: str) -> None:
    main([*argv, "--no-progress"])


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ("routes", "select", "prune", "eval", "report"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([cmd, "--help"])
        assert "usage: emo-experts" in capsys.readouterr().out


def test_select_prune_eval_routes(tmp_path: Path, jsonl: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = write_checkpoint(tiny_model(), tmp_path / "m.ckpt")
    tok = ["--tokenizer", str(TOKENIZER)]
    _run(
        "select",
        "--ckpt",
        str(ckpt),
        "--data",
        str(jsonl),
        "--keep",
        "0.34",
        "--out",
        str(tmp_path / "s.json"),
        *tok,
    )
    subset = json.loads((tmp_path / "s.json").read_text())
    assert subset["keep"] == 3 and all(len(layer) == 2 for layer in subset["layers"])
    _run(
        "prune",
        "--ckpt",
        str(ckpt),
        "--subset",
        str(tmp_path / "s.json"),
        "--out",
        str(tmp_path / "small.ckpt"),
    )
    assert "routed experts" in capsys.readouterr().out
    small = load_model(tmp_path / "small.ckpt")
    assert small.config.router.num_experts == 3

    _run(
        "eval",
        "--ckpt",
        str(ckpt),
        "--data",
        str(jsonl),
        "--subset",
        str(tmp_path / "s.json"),
        "--out",
        str(tmp_path / "a.json"),
        *tok,
    )
    _run(
        "eval",
        "--ckpt",
        str(tmp_path / "small.ckpt"),
        "--data",
        str(jsonl),
        "--out",
        str(tmp_path / "b.json"),
        *tok,
    )
    a = json.loads((tmp_path / "a.json").read_text())["results"]["full"]
    b = json.loads((tmp_path / "b.json").read_text())["results"]["full"]
    assert a == b and set(a) == {"code", "literature", "math", "all"}
    assert "domain" in capsys.readouterr().out

    _run(
        "eval",
        "--ckpt",
        str(ckpt),
        "--data",
        str(jsonl),
        "--routing",
        "causal:3:4",
        "--out",
        str(tmp_path / "c.json"),
        *tok,
    )
    c = json.loads((tmp_path / "c.json").read_text())["results"]
    assert c["causal:3:4"]["all"]["tokens"] == c["full (same targets)"]["all"]["tokens"]

    for routing in ("full", "pool:3", "running:3", "causal:3:4"):
        out = tmp_path / f"routes_{routing.replace(':', '_')}.jsonl"
        _run(
            "routes", "--ckpt", str(ckpt), "--data", str(jsonl), "--out", str(out), "--routing", routing, *tok
        )
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(recs) == 9 and len(recs[0]["layers"]) == 3
        layer = recs[0]["layers"][0]
        assert len(layer["experts"]) == recs[0]["tokens"] and len(layer["experts"][0]) == 3
        assert (layer["pools"] is None) == (routing in ("full", "running:3"))  # running pools: per token
        if layer["pools"]:
            assert len(layer["pools"][0]["experts"]) == 3
            assert all(e in layer["pools"][0]["experts"] for e in layer["experts"][0][:2])


def test_mistakes_end_in_one_line(tmp_path: Path, jsonl: Path, capsys) -> None:
    emo = write_checkpoint(tiny_model(), tmp_path / "emo.ckpt")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**_subset(tmp_path, emo), "num_experts": 16}))
    (tmp_path / "garbage.ckpt").write_text("not a checkpoint")
    small_vocab = write_checkpoint(tiny_model(vocab_size=64), tmp_path / "small.ckpt")
    ckpt_fix = "pass a .ckpt written by `emo fit` or `emo-experts prune` (DeepSpeed: consolidate it first)"
    cases = [
        (["report", "--emo", str(emo), "--data", str(jsonl), "--out", str(tmp_path / "r")],
         "--baseline is missing: pass a checkpoint (or --only emo)"),
        (["eval", "--ckpt", str(tmp_path / "none.ckpt"), "--data", str(jsonl)],
         f"{tmp_path / 'none.ckpt'}: no such checkpoint: {ckpt_fix}"),
        (["eval", "--ckpt", str(tmp_path / "garbage.ckpt"), "--data", str(jsonl)],
         f"{tmp_path / 'garbage.ckpt'}: not a checkpoint (not a torch.save archive, or truncated): {ckpt_fix}"),
        (["eval", "--ckpt", str(emo), "--data", str(tmp_path / "none.jsonl")],
         f"--data {tmp_path / 'none.jsonl'}: no such file or directory: pass a JSON Lines file of documents "
         "(text, domain) or a folder of them, e.g. data/corpus/val"),
        (["eval", "--ckpt", str(emo), "--data", str(jsonl), "--routing", "pool"],
         "--routing 'pool': unknown routing: use full, pool:P, running:P or causal:P:N (positive integers)"),
        (["eval", "--ckpt", str(emo), "--data", str(jsonl), "--subset", str(other)],
         f"{other}: subset is for 16 experts (1 shared), the checkpoint has 9 (1 shared): select the subset "
         "from this checkpoint (`emo-experts select --ckpt ...`)"),
        (["eval", "--ckpt", str(small_vocab), "--data", str(jsonl), "--tokenizer", str(TOKENIZER)],
         f"--tokenizer {TOKENIZER}: vocabulary 4096 exceeds the model's 64: pass the tokenizer the model was "
         "trained with"),
        (["eval", "--ckpt", str(emo), "--data", str(jsonl), "--tokenizer", str(jsonl)],
         f"{jsonl}: not a tokenizer (expected `,` or `}}` at line 1 column 6): pass a Hugging Face tokenizer.json, "
         "e.g. data/tokenizer.json"),
        (["select", "--ckpt", str(emo), "--data", str(jsonl), "--keep", "12", "--out", str(tmp_path / "s.json")],
         "--keep 12: the model has 9 experts per layer: give a fraction in (0, 1] (0.25) or a count in [1, 9] (4)"),
    ]  # fmt: skip
    for argv, line in cases:
        with pytest.raises(SystemExit) as exit_info:
            _run(*argv)
        assert exit_info.value.code == 2, argv
        assert capsys.readouterr().err == f"emo-experts: {line}\n"


def _subset(tmp_path: Path, ckpt: Path) -> dict:
    out = tmp_path / "subset.json"
    _run(
        "select",
        "--ckpt",
        str(ckpt),
        "--data",
        str(out),
        "--keep",
        "4",
        "--method",
        "random",
        "--out",
        str(out),
    )
    return json.loads(out.read_text())


def test_report(tmp_path: Path, jsonl: Path) -> None:
    emo = write_checkpoint(tiny_model(), tmp_path / "emo.ckpt")
    std = write_checkpoint(tiny_model("standard", seed=1), tmp_path / "std.ckpt")
    out = tmp_path / "report"
    common = ["--keep", "0.25,1", "--shots", "1,2", "--calib-docs", "2", "--eval-docs", "1", "--random-seeds", "2",
              "--clusters", "3", "--pool-prefix", "4", "--out", str(out), "--tokenizer", str(TOKENIZER)]  # fmt: skip
    _run("report", "--emo", str(emo), "--data", str(jsonl), "--only", "emo", *common)  # no --baseline needed
    assert (out / "part_emo.json").exists() and not (out / "report.md").exists()
    stamp = (out / "part_emo.json").stat().st_mtime_ns
    _run(
        "report", "--emo", str(emo), "--baseline", str(std), "--data", str(jsonl), "--keep", "0.25,1",
        "--shots", "1,2", "--calib-docs", "2", "--eval-docs", "1", "--random-seeds", "2", "--clusters", "3",
        "--pool-prefix", "4", "--out", str(out), "--tokenizer", str(TOKENIZER),
    )  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    summary = report["models"]["emo"]["summary"]
    assert set(summary) == {"0.25", "1"} and summary["1"]["shots_2"] == 0.0
    assert 0.0 <= report["models"]["standard"]["clustering"]["nmi"] <= 1.0
    assert (out / "loss_vs_keep.png").stat().st_size > 0 and (out / "mean_rise.png").exists()
    assert "Mean relative loss rise" in (out / "report.md").read_text()
    # later runs reuse each model's cached measurements
    assert (out / "part_emo.json").stat().st_mtime_ns == stamp
    from emo_lightning.experts.report import ReportConfig, run_report

    cfg = ReportConfig(**{**report["config"]})
    again = run_report(emo, std, jsonl, out, cfg, TOKENIZER, progress=False)
    assert (out / "part_emo.json").stat().st_mtime_ns == stamp
    assert again["models"]["emo"]["summary"] == report["models"]["emo"]["summary"]
    sizes = report["models"]["emo"]["pruned_params"]
    assert sizes["0.25"]["routed_experts"] * 8 == sizes["1"]["routed_experts"]
