"""``make gpu-scale-probe`` in its CPU dry mode, on a simulated bare GPU node with the carried wheels (so that it
cannot rot)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.scale_probe import (
    DRY,
    FULL,
    PROG,
    Clock,
    Trained,
    build_parser,
    evaluate,
    load_probes,
    plan_steps,
)
from data_tools.errors import run_cli
from emo_lightning.experts.documents import Document
from emo_lightning.model import ArchConfig, EMOTransformer, ModelConfig, RouterConfig
from tests.conftest import cut_corpus

ROOT = Path(__file__).resolve().parents[1]
NODE = ("torch", "lightning", "torchmetrics", "tensorboard", "tokenizers")  # what a bare GPU node has
# brought along as pure-Python wheels (make gpu-prepare, docs/performance.md)
WHEELS = ("webdataset", "braceexpand", "jsonargparse", "docstring_parser", "typeshed_client", "omegaconf")


def node_site(out: Path, roots: tuple[str, ...]) -> Path:
    """A site folder holding only ``roots`` and what they require (symlinks into this environment): run with
    ``python -S`` and ``PYTHONPATH=<it>:<repo>``, the interpreter sees a node where nothing else is installed
    (no deepspeed, scikit-learn, matplotlib...)."""

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    dists = {norm(d.metadata["Name"]): d for d in importlib.metadata.distributions()}
    seen: set[str] = set()
    todo = [norm(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or name not in dists:
            continue
        seen.add(name)
        for req in dists[name].requires or []:
            if "extra ==" not in req:
                todo.append(norm(re.match(r"[A-Za-z0-9_.\-]+", req).group(0)))
    out.mkdir()
    for name in seen:
        dist = dists[name]
        site = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or []} - {".."}:
            if (site / top).exists() and not (out / top).exists():
                (out / top).symlink_to(site / top)
    return out


def run_on_node(site: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and val/ JSON Lines cut from the bundled corpus (four domains), as a device node gets them."""
    root = tmp_path_factory.mktemp("scale_probe_corpus")
    for split, chars in (("train", 120_000), ("val", 40_000)):
        (root / split).mkdir()
        cut_corpus(split, root / split / f"{split}.jsonl", chars)
    return root


@pytest.fixture(scope="module")
def dry_run(
    corpus: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess, Path]:
    """The dry run on a simulated bare node with the carried wheels, from a corpus (no shards yet)."""
    tmp = tmp_path_factory.mktemp("scale_probe")
    args = ["--dry", "--corpus", str(corpus), "--work-dir", str(tmp / "work"), "--out", str(tmp / "out")]
    code = (
        "import sys\n"
        "from benchmarks.scale_probe import main\n"
        f"rc = main({args!r})\n"
        "absent = [m for m in ('deepspeed', 'sklearn', 'matplotlib') if m in sys.modules]\n"
        "sys.exit(rc or (3 if absent else 0))\n"
    )
    return run_on_node(node_site(tmp / "site", NODE + WHEELS), code), tmp / "out"


def test_dry_run_trains_evaluates_and_writes_results(
    dry_run: tuple[subprocess.CompletedProcess, Path],
) -> None:
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "scale_probe-latest.json").read_text())
    assert report["dry"] and report["complete"] and report["device"] == "cpu" and report["errors"] == {}
    assert report["deepspeed_imported"] is False
    assert report["data"]["built_now"]  # no shards: built from the corpus, as on a bare device node
    assert report["data"]["domains"] == ["code", "literature", "math", "science"]
    assert len(list(out.glob("scale_probe-cpu-*.json"))) == 1 and (out / "scale_probe-latest.md").is_file()
    steps, step_tokens = report["plan"]["steps"], 4 * 64  # the dry rows: 4 x 64 tokens
    assert steps == DRY.tokens // step_tokens and not report["plan"]["cut"]
    for kind in ("standard", "emo"):
        tr = report["training"][kind]
        assert tr["steps"] == steps and tr["tokens"] == steps * step_tokens and not tr["stopped_early"]
        m = report["models"][kind]
        assert m["router"]["kind"] == kind and m["router"]["num_experts"] == 8
        assert np.isfinite(m["full"]["loss"]) and m["full"]["tokens"] > 0
        assert set(m["keep"]) == {"0.25", "0.125"}
        assert m["keep"]["0.25"]["experts"] == 2 and len(m["keep"]["0.25"]["domains"]) == 4
        assert m["clustering"]["method"] == "spherical k-means (torch)"  # the toolkit's, no scikit-learn
        assert 0.0 <= m["clustering"]["nmi"] <= 1.0
    assert report["models"]["emo"]["router"]["pool_scope"] == "running"  # the preset's recipe
    assert report["presets"]["emo"]["preset"] == "conf/studies/emo_scale_probe.yaml"
    assert (report["presets"]["emo"]["lr"], report["presets"]["standard"]["lr"]) == (3e-3, 1.5e-3)
    assert set(report["models"]["emo"]["routing"]) == {"full", "running:2", "running:4"}
    assert set(report["models"]["standard"]["routing"]) == {"full"}
    s = report["summary"]
    assert s["gap_full"] == pytest.approx(s["loss_emo"] / s["loss_standard"] - 1)
    assert s["best_pooled_routing"] in ("running:2", "running:4")
    assert "| val loss, all experts (whole val split) |" in proc.stdout
    assert "| val loss, all experts" in (out / "scale_probe-latest.md").read_text()


def test_user_errors_are_one_line(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = [
        (["--dry", "--corpus", str(tmp_path / "nowhere")], "--corpus"),
        (["--dry", "--router-emo", "pool_minn=3"], "did you mean --model.router.pool_min?"),
        (["--dry", "--router-emo", "pool_min=1"], "router.pool_min"),
        (["--dry", "--lr-emo", "-1"], "optim.lr"),
        (["--dry", "--corpus", str(corpus), "--tokenizer", str(tmp_path / "tok.json")], "--tokenizer"),
    ]
    monkeypatch.setattr("benchmarks.scale_probe.REPO", tmp_path)  # no bundled shards to fall back on
    for argv, needle in cases:
        with pytest.raises(SystemExit) as exc:
            from benchmarks.scale_probe import main

            common = ["--tokenizer", str(ROOT / "data" / "tokenizer.json"), "--work-dir", str(tmp_path / "w")]
            run_cli(PROG, main, [*common, *argv, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2, err
        assert err.startswith(f"{PROG}: ") and "\n" not in err and needle in err, err


def test_flags_override_the_presets() -> None:
    args = build_parser().parse_args(
        ["--router-emo", "pool_min=16", "--router-emo", "normalize_weights=true", "--balance", "bias",
         "--bias-gamma", "0.002", "--lr-standard", "1e-3"]
    )  # fmt: skip
    probes = load_probes(args, FULL, 5000)
    emo, std = probes["emo"].config, probes["standard"].config
    assert (emo.router.pool_min, emo.router.normalize_weights, emo.router.pool_scope) == (16, True, "running")
    assert (emo.router.num_experts, emo.router.top_k, emo.arch.d_model, emo.arch.vocab_size) == (
        64,
        8,
        512,
        5000,
    )
    assert (std.router.kind, std.router.balance, std.router.bias_gamma, std.router.pool_scope) == (
        "standard", "bias", 0.002, "document",
    )  # fmt: skip
    assert (probes["emo"].preset.optim.lr, probes["standard"].preset.optim.lr) == (3e-3, 1e-3)
    assert probes["emo"].tokens_per_step == 64 * 1024


def test_plan_steps_fits_the_budget() -> None:
    per_step = 64 * 1024
    target = FULL.tokens // per_step + 1  # 50M tokens / 65,536 per step, rounded up
    assert plan_steps(FULL, per_step, {"standard": 0.05, "emo": 0.06}, 300.0) == (target, target, False)
    steps, _, cut = plan_steps(FULL, per_step, {"standard": 0.2, "emo": 0.3}, 300.0)
    assert cut and steps * 0.5 * 1.15 <= 300.0 - 30.0


def test_a_failing_stage_is_recorded_and_the_others_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    sz = replace(DRY, n_eval=3, n_calib=2, running_pools=(3,), clusters=2, cluster_tokens=200)
    arch = ArchConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, expert_hidden=8, max_seq_len=64)
    routers = {kind: RouterConfig(kind=kind, num_experts=8, num_shared=0, top_k=2, pool_scope="running")
               for kind in ("standard", "emo")}  # fmt: skip
    trained = {
        kind: Trained(EMOTransformer(ModelConfig(arch=arch, router=rc)).eval(), 1, 256, 1.0, 256.0, None,
                      [(1, 4.0)], False)
        for kind, rc in routers.items()
    }  # fmt: skip
    gen = np.random.default_rng(0)
    docs = [Document(str(i), "ab"[i % 2], gen.integers(2, 64, gen.integers(3, 40))) for i in range(10)]
    calib = {d: [x for x in docs if x.domain == d][:2] for d in "ab"}
    evals = {d: [x for x in docs if x.domain == d][2:] for d in "ab"}

    def broken(*args: object) -> dict:
        raise RuntimeError("boom")

    monkeypatch.setattr("benchmarks.scale_probe.eval_keep", broken)
    presets = {k: {"preset": f"{k}.yaml", "arch": asdict(arch), "router": asdict(rc), "lr": 1e-3, "seq_len": 64,
                   "batch_size": 4} for k, rc in routers.items()}  # fmt: skip
    report = {"training": {k: t.info() for k, t in trained.items()}, "models": {}, "errors": {}, "dry": True,
              "complete": False, "device": "cpu", "timestamp": "t", "device_name": "cpu", "packages": {},
              "sizes": asdict(sz), "presets": presets, "attention": "auto",
              "data": {"train_tokens": 1, "epochs": 1.0, "val_docs": 10, "domains": ["a", "b"]},
              "plan": {"cut": False, "target_steps": 1}}  # fmt: skip
    evaluate(trained, docs, calib, evals, 64, sz, 1, 0, Clock(), report, tmp_path)
    assert set(report["errors"]) == {"standard keep", "emo keep"}
    assert report["errors"]["emo keep"].startswith("RuntimeError: boom at tests/test_scale_probe.py:")
    assert {"gap_full", "nmi"} <= set(report["summary"]) and "keep" not in report["summary"]
    assert set(report["models"]["emo"]["routing"]) == {"full", "running:3"}
    md = (tmp_path / "scale_probe-latest.md").read_text()
    assert "FAILED emo keep: RuntimeError: boom" in md and "| router clustering NMI |" in md
    report.update(models={}, errors={})  # past the budget: every stage is skipped, and said so
    evaluate(trained, docs, calib, evals, 64, replace(sz, budget_s=-1e3), 1, 0, Clock(), report, tmp_path)
    assert len(report["errors"]) == 6 and all(e.startswith("skipped: ") for e in report["errors"].values())
    assert report["summary"] == {}


def test_missing_wheels_are_one_line(tmp_path: Path) -> None:
    proc = run_on_node(
        node_site(tmp_path / "site", NODE),
        f"from benchmarks.scale_probe import PROG, main\nfrom data_tools.errors import run_cli\n"
        f"run_cli(PROG, main, ['--dry', '--out', {str(tmp_path)!r}])\n",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == (
        f"{PROG}: missing packages: webdataset, braceexpand, jsonargparse, omegaconf, docstring_parser, "
        "typeshed_client: "
        "install them (an air-gapped node: the wheels of `make gpu-prepare`, docs/performance.md)"
    )
