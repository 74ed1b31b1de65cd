"""``make gpu-check`` in its CPU dry mode, on a node without DeepSpeed (so that it cannot rot), and with a
required package missing (a check that cannot run FAILs, exit 1)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check import REPO, guarded, sync_site
from benchmarks.inputs import packed_doc_ids

ROOT = Path(__file__).resolve().parents[1]
# what a GPU image lacks and gpu-check does not need (the wheels of the others are carried): blocked as a None
# entry in sys.modules (import raises ModuleNotFound)
BLOCKED = ("deepspeed",)
RUNNABLE = (  # the checks the dry mode can run on a CPU: each must PASS
    "emo_lightning.model imports only torch",
    "FlexAttention doc mask vs SDPA bool mask, fp32",
    "FlexAttention doc mask vs SDPA bool mask, bf16 autocast",
    "grouped GEMM vs per-expert loop, float32",
    "grouped GEMM vs per-expert loop, bfloat16",
    "tiny-model training step, bf16 autocast vs fp32",
    "Lightning fit logs MFU to TensorBoard",
)


def _dry_run(out: Path, blocked: tuple[str, ...], *flags: str) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({blocked!r}))\n"
        "from benchmarks.gpu_check import main\n"
        f"sys.exit(main(['--cpu', '--out', {str(out)!r}, *{list(flags)!r}]))\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    return _dry_run(out, BLOCKED), out


def test_dry_run_passes_and_writes_results(dry_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu-check-latest.json").read_text())
    assert report["dry"] and report["device"] == "cpu" and report["failed"] == 0
    assert sorted(report["missing_packages"]) == sorted(BLOCKED)
    assert "| section | check | status |" in (out / "gpu-check-latest.md").read_text()
    assert len(list(out.glob("gpu-check-cpu-*.json"))) == 1
    status = {r["name"]: r["status"] for r in report["results"]}
    assert "FAIL" not in status.values()
    for name in RUNNABLE:
        assert status[name] == "PASS", name
    rows = {r["name"]: r for r in report["results"]}
    for name, r in rows.items():
        if name.startswith("no host sync"):
            assert (r["status"], r["note"]) == ("SKIP", "CUDA only")
    assert (rows["DeepSpeed MoE layer"]["status"], rows["DeepSpeed MoE layer"]["note"]) == (
        "INFO",
        "not run: deepspeed is not installed (optional)",
    )
    assert "emo_lightning.parallel.expert_parallel (missing: deepspeed)" in rows["project modules"]["note"]
    perf = [r for r in report["results"] if r["section"] == "performance" and r["status"] == "INFO"]
    assert {"tiny (dry) step, EMO / standard", "router: loop reference / EMO, 64 docs/row"} <= {
        r["name"] for r in perf
    }
    assert all(r["value"] for r in perf if not r["note"].startswith("not run"))


def test_a_check_that_cannot_run_for_a_missing_package_fails(tmp_path: Path) -> None:
    """Without jsonargparse (the presets' parser) the model checks cannot run: FAIL naming it, exit status 1."""
    proc = _dry_run(tmp_path, ("deepspeed", "jsonargparse"), "--only", "correctness")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads((tmp_path / "gpu-check-latest.json").read_text())["results"]}
    failed = {name for name, r in rows.items() if r["status"] == "FAIL"}
    assert "bf16 training step" in failed and "Lightning fit logs MFU" in failed
    assert all("missing: jsonargparse" in rows[name]["note"] for name in failed)
    assert not any(r["status"] == "SKIP" and "missing" in r["note"] for r in rows.values())


def test_packed_doc_ids() -> None:
    doc_ids = packed_doc_ids(3, 512, 64, torch.Generator().manual_seed(0))  # (B,S)
    assert doc_ids.shape == (3, 512) and (doc_ids[:, 0] == 0).all()
    step = doc_ids.diff(dim=1)
    assert ((step == 0) | (step == 1)).all()  # contiguous documents, ids 0,1,2,...
    for row in doc_ids:
        lengths = torch.bincount(row)
        assert (lengths[:-1] >= 8).all()  # all but the cut last document have >= 8 tokens


def test_guarded_fails_missing_packages_except_optional_references(monkeypatch: pytest.MonkeyPatch) -> None:
    def needs_deepspeed() -> list:
        import deepspeed.moe.layer  # noqa: F401

        return []

    def broken() -> list:
        raise RuntimeError("boom")

    def needs_jsonargparse() -> list:
        import jsonargparse  # noqa: F401

        return []

    monkeypatch.setitem(sys.modules, "deepspeed", None)
    monkeypatch.setitem(sys.modules, "jsonargparse", None)
    (r,) = guarded("performance", "ds", needs_deepspeed)
    assert (r.status, r.note) == ("INFO", "not run: deepspeed is not installed (optional)")
    (r,) = guarded("correctness", "needs jsonargparse", needs_jsonargparse)
    assert r.status == "FAIL" and r.note.startswith("missing: jsonargparse")
    (r,) = guarded("correctness", "x", broken)
    assert r.status == "FAIL" and r.note.startswith("RuntimeError: boom at tests/test_gpu_check.py:")


def test_sync_site_names_the_forward_line_of_a_backward_op() -> None:
    """The CUDA check's report of where a host sync happened (anomaly mode's forward traceback)."""
    text = (
        "Error detected in IndexSelectBackward0. Traceback of forward call that caused the error:\n"
        f'  File "{REPO}/benchmarks/gpu_check.py", line 10, in f\n    y, r = layer(x, doc_ids)\n'
        f'  File "{REPO}/emo_lightning/model/moe.py", line 50, in dispatch\n'
        "    x_sorted = x.index_select(0, order // k)  # (M,d)\n"
    )
    caught = [warnings.WarningMessage(UserWarning(text), UserWarning, "engine", 1)]
    try:
        raise RuntimeError("called a synchronizing CUDA operation")
    except RuntimeError as e:
        site = sync_site(e, caught)
    assert site == (
        "backward of IndexSelectBackward0, forward at emo_lightning/model/moe.py:50 "
        "`x_sorted = x.index_select(0, order // k)  # (M,d)`"
    )
    try:
        raise RuntimeError("called a synchronizing CUDA operation")
    except RuntimeError as e:
        assert sync_site(e, []).startswith("tests/test_gpu_check.py:")  # a forward op: its own line
