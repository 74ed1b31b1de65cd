"""``make bench`` in its quick mode: every benchmark of the suite runs end to end at tiny sizes (seconds), so a
changed signature fails here instead of rotting. Timing never decides this test."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.run import BENCHMARKS, main


def test_quick_mode_runs_every_benchmark(tmp_path: Path) -> None:
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "latest.json").read_text())
    assert result["quick"] and result["failed"] == []
    assert set(result["benchmarks"]) == set(BENCHMARKS)
    for name, entry in result["benchmarks"].items():
        assert "error" not in entry, entry.get("error")
        assert entry["rows"], name  # every benchmark reports at least one row
        assert all(r["met"] is None for r in entry["rows"])  # quick sizes say nothing about the targets
