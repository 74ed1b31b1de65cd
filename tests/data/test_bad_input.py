"""Bad input: every kind is either rejected naming file and line (fail) or skipped and counted (skip)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from data_tools.build import build_shards
from data_tools.cli import main
from data_tools.manifest import Manifest
from data_tools.records import InputError

GOOD = b'{"id": "a", "domain": "math", "text": "One plus one is two."}\n'
GOOD2 = b'{"id": "b", "domain": "code", "text": "def f():\\n    return 2"}\n'
BAD = {
    "invalid_json": b'{"id": "x", "text": "unterminated\n',
    "not_an_object": b'["a list", "not an object"]\n',
    "missing_text": b'{"id": "x", "domain": "math"}\n',
    "empty_text": b'{"id": "x", "text": "  \\n\\t "}\n',
    "invalid_utf8": b'{"id": "x", "text": "caf\xe9 au lait"}\n',
    "lone_surrogate": b'{"id": "x", "text": "broken \\ud800 pair"}\n',
    "text_not_string": b'{"id": "x", "text": 42}\n',
    "domain_not_string": b'{"id": "x", "domain": ["math"], "text": "fine"}\n',
    "id_not_scalar": b'{"id": {"k": 1}, "text": "fine"}\n',
}
REASON = {
    "lone_surrogate": "invalid_utf8",
    "text_not_string": "bad_field_type",
    "domain_not_string": "bad_field_type",
    "id_not_scalar": "bad_field_type",
}


def write(path: Path, bad: bytes) -> Path:
    path.write_bytes(GOOD + bad + GOOD2)  # the bad record is on line 2
    return path


@pytest.mark.parametrize("kind", sorted(BAD))
def test_fail_names_file_and_line(kind: str, tokenizer_path: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", BAD[kind])
    with pytest.raises(InputError) as err:
        build_shards([path], tokenizer_path, tmp_path / "out", quiet=True)
    assert str(err.value).startswith(f"{path}:2: {REASON.get(kind, kind)}:")
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("kind", sorted(BAD))
def test_skip_counts_in_manifest(kind: str, tokenizer_path: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", BAD[kind])
    m = build_shards([path], tokenizer_path, tmp_path / "out", on_error="skip", quiet=True).manifest
    reason = REASON.get(kind, kind)
    assert m.totals["docs"] == 2
    assert m.skipped["total"] == 1 and m.skipped["counts"] == {reason: 1}
    assert m.skipped["examples"][reason][0].startswith(f"{path}:2: ")


def test_truncated_gzip(tokenizer_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl.gz"
    data = gzip.compress(GOOD * 200 + GOOD2 * 200)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"^{path}:\d+: unreadable_file: corrupt file"):
        build_shards([path], tokenizer_path, tmp_path / "out", quiet=True)
    m = build_shards([path], tokenizer_path, tmp_path / "out2", on_error="skip", quiet=True).manifest
    assert m.skipped["counts"] == {"unreadable_file": 1} and m.totals["docs"] > 0


def test_missing_domain_and_id(tokenizer_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "nodomain.jsonl"
    path.write_text(
        json.dumps({"text": "no domain here"}) + "\n\n" + json.dumps({"text": "x", "id": 7}) + "\n"
    )
    m = build_shards([path], tokenizer_path, tmp_path / "out", quiet=True).manifest
    assert m.domains == {"unknown": 0} and m.per_domain["unknown"]["docs"] == 2  # the blank line has no data


def test_cli_error_from_worker(tokenizer_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """With 2 tasks in 2 worker processes the error still surfaces as one line naming file and line (exit 2)."""
    good = tmp_path / "good.jsonl"
    good.write_bytes(GOOD * 3)
    bad = write(tmp_path / "bad.jsonl", BAD["missing_text"])
    argv = [
        "build-shards", "--input", str(good), str(bad), "--tokenizer", str(tokenizer_path),
        "--out", str(tmp_path / "out"), "--tasks", "2", "--workers", "2", "--quiet",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"emo-data: {bad}:2: missing_text:") and err.count("\n") == 1
    main([*argv, "--on-error", "skip", "--overwrite"])
    assert Manifest.load(tmp_path / "out").skipped["counts"] == {"missing_text": 1}


@pytest.mark.parametrize("content", [b"", b'{"id": "x", "text": "unterminated\n'], ids=["empty", "all_bad"])
def test_no_usable_document_is_refused_in_one_line(
    tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    """build-shards and build-tokenizer from input without a usable document (an empty file; every record bad
    and skipped): one line, exit 2, no tokenizer learned from nothing, no shards of nothing."""
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    tok = Path(__file__).resolve().parents[2] / "data" / "tokenizer.json"
    commands = {
        "build-shards": ["build-shards", "--input", str(src), "--tokenizer", str(tok), "--out", str(tmp_path / "s")],
        "build-tokenizer": ["build-tokenizer", "--input", str(src), "--vocab-size", "300", "--out",
                            str(tmp_path / "tok.json")],
    }  # fmt: skip
    for name, argv in commands.items():
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--on-error", "skip"])
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
        assert exc.value.code == 2, (name, err)
        assert err.startswith("emo-data: --input: no usable document"), (name, err)
    assert not (tmp_path / "tok.json").exists()
