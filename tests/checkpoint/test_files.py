"""Atomic artefacts: an output folder is the previous one or the new one, never a mix; a text file appears whole;
training code does not load the toolkit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from emo_lightning.checkpoint import atomic_folder, atomic_write_text, check_out_folder
from emo_lightning.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def _fill(folder: Path, names: dict[str, str]) -> None:
    for name, text in names.items():
        (folder / name).write_text(text)


def test_a_non_empty_folder_is_refused_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.bin").write_text("old")
    with pytest.raises(UserError, match=r"--out .*hf: the folder is not empty.*--overwrite"):
        check_out_folder(out)
    with pytest.raises(UserError, match="not empty"), atomic_folder(out) as tmp:
        _fill(tmp, {"new.bin": "new"})  # never reached
    assert sorted(p.name for p in out.iterdir()) == ["old.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary left beside it
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        check_out_folder(tmp_path / "file", overwrite=True)


def test_overwrite_replaces_the_folder_whole(tmp_path: Path) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    _fill(out, {"old.bin": "old", "config.json": "{old}"})
    with atomic_folder(out, overwrite=True) as tmp:
        assert tmp.parent == tmp_path and tmp != out and not any(tmp.iterdir())
        _fill(tmp, {"config.json": "{new}", "model.bin": "new"})
    assert {p.name: p.read_text() for p in out.iterdir()} == {"config.json": "{new}", "model.bin": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_a_failed_write_leaves_the_previous_folder_and_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    _fill(out, {"config.json": "{old}"})
    with pytest.raises(RuntimeError, match="boom"), atomic_folder(out, overwrite=True) as tmp:
        _fill(tmp, {"config.json": "{half}"})
        raise RuntimeError("boom")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"config.json": "{old}"}
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    with atomic_folder(tmp_path / "new" / "hf") as tmp:  # a new folder (and its parent) is fine
        _fill(tmp, {"a": "1"})
    assert (tmp_path / "new" / "hf" / "a").read_text() == "1"


def test_atomic_text_replaces_a_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "subset.json"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second")
    assert path.read_text() == "second" and [p.name for p in path.parent.iterdir()] == ["subset.json"]


def test_training_code_does_not_import_the_toolkit() -> None:
    code = (
        "import sys, emo_lightning.cli, emo_lightning.lit_module, emo_lightning.parallel\n"
        "print('toolkit:', ' '.join(sorted(m for m in sys.modules if m.startswith('emo_lightning.experts'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "toolkit:"  # (DeepSpeed may log a line before it)
