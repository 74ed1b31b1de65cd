"""Input formats and fields: JSON Lines (plain, gzip, zstd) and parquet, local or fsspec URLs, globs and folders,
nested and renamed fields, the domain from the path; every format under the bad-record policy."""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_tools.build import build_shards
from data_tools.cli import main
from data_tools.errors import UserError
from data_tools.manifest import Manifest
from data_tools.records import Fields, InputError

from .helpers import shard_documents

BAD_ROW = "fix or remove the record"


def as_jsonl(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def as_parquet(rows: list[dict], schema: pa.Schema | None = None) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf, row_group_size=16)
    return buf.getvalue()


def docs(folder: Path) -> Counter:
    return Counter(shard_documents(folder))


@pytest.fixture(scope="module")
def reference(corpus, tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus fixture (plain and gzip JSON Lines) built the usual way."""
    out = tmp_path_factory.mktemp("reference")
    build_shards(corpus[0], tokenizer_path, out, shard_size=4096, quiet=True)
    return out


def test_every_format_gives_the_same_documents(corpus, reference: Path, tokenizer_path: Path, tmp_path: Path):
    """The same records as zstd JSON Lines (two frames), parquet, and parquet with other, nested field names
    read from an fsspec URL through a glob: identical documents (id, domain, tokens) and per-domain counts."""
    records = corpus[1]
    half = len(records) // 2
    zst = tmp_path / "a.jsonl.zst"  # two concatenated frames, as `zstd` writes for appended files
    zst.write_bytes(
        b"".join(
            zstandard.ZstdCompressor().compress(as_jsonl(part))
            for part in (records[: half // 2], records[half // 2 : half])
        )
    )
    (tmp_path / "b.parquet").write_bytes(as_parquet(records[half:]))
    want = docs(reference)
    got = build_shards([zst, tmp_path / "b.parquet"], tokenizer_path, tmp_path / "s1", quiet=True)
    assert docs(tmp_path / "s1") == want
    assert got.manifest.per_domain == Manifest.load(reference).per_domain

    mem = fsspec.filesystem("memory")
    nested = [{"content": r["text"], "meta": {"source": r["domain"], "doc_id": r["id"]}} for r in records]
    mem.pipe("/emo-test/nested/part-0.parquet", as_parquet(nested[:half]))
    mem.pipe("/emo-test/nested/part-1.jsonl.gz", gzip.compress(as_jsonl(nested[half:])))
    fields = Fields(text="content", id="meta.doc_id", domain="meta.source")
    got = build_shards(
        ["memory:///emo-test/nested/part-*"], tokenizer_path, tmp_path / "s2", fields=fields, quiet=True
    )
    assert docs(tmp_path / "s2") == want
    assert got.manifest.build["inputs"] == [
        "memory:///emo-test/nested/part-0.parquet",
        "memory:///emo-test/nested/part-1.jsonl.gz",
    ]
    assert got.manifest.build["fields"] == {"text": "content", "id": "meta.doc_id", "domain": "meta.source"}


def test_output_on_an_fsspec_url(corpus, tokenizer_path: Path) -> None:
    """--out may be any fsspec URL: shards, manifest and the build's bookkeeping land there."""
    build_shards(corpus[0][:1], tokenizer_path, "memory:///emo-test/out", shard_size=4096, quiet=True)
    mem = fsspec.filesystem("memory")
    m = Manifest.from_json(mem.cat("/emo-test/out/manifest.json").decode())
    assert m.totals["docs"] == 40 and all(mem.exists(f"/emo-test/out/{s.name}") for s in m.shards)
    assert mem.exists("/emo-test/out/.build/parts/task-00000.json")


def test_domain_from_path_and_folders(corpus, tokenizer_path: Path, tmp_path: Path) -> None:
    records = corpus[1]
    for i, domain in enumerate(("web", "books")):
        (tmp_path / "in" / domain).mkdir(parents=True)
        rows = [{"text": r["text"]} for r in records[i * 10 : i * 10 + 10]]  # no domain, no id fields
        (tmp_path / "in" / domain / "x.jsonl").write_bytes(as_jsonl(rows))
    (tmp_path / "in" / "notes.txt").write_text("not an input")  # a folder's non-input files are left alone
    fields = Fields(domain_from_path=r"/(?P<domain>[^/]+)/[^/]+$")
    m = build_shards([tmp_path / "in"], tokenizer_path, tmp_path / "out", fields=fields, quiet=True).manifest
    assert {k: v["docs"] for k, v in m.per_domain.items()} == {"books": 10, "web": 10}
    assert {d[0] for d in shard_documents(tmp_path / "out")} == {f"x-{n}" for n in range(1, 11)}
    with pytest.raises(UserError, match=r"--domain-from-path 'nomatch/': does not match input .*x\.jsonl"):
        build_shards(
            [tmp_path / "in"], tokenizer_path, tmp_path / "o2", fields=Fields(domain_from_path="nomatch/")
        )
    assert not (tmp_path / "o2").exists()  # checked before any work


@pytest.mark.parametrize(
    ("regex", "domain"),
    [
        (r"/(?P<lang>[a-z]{2})/(?P<domain>[a-z]+)/", "web"),  # the group named domain
        (r"data/([a-z]+)/([a-z]+)/", "en"),  # else the first group
        (r"[a-z]+(?=/part)", "web"),  # else the whole match
        (r"(x?)/part", "unknown"),  # an empty match: unknown
    ],
)
def test_domain_from_path_groups(regex: str, domain: str) -> None:
    assert Fields(domain_from_path=regex).path_domain("s3://b/data/en/web/part-0.parquet") == domain


def test_field_options_on_the_command_line(tokenizer_path: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(as_jsonl([{"body": "Some text.", "meta": {"src": "wiki"}, "uid": 7}]))
    out = tmp_path / "out"
    argv = [
        "build-shards",
        "--input",
        str(src),
        "--tokenizer",
        str(tokenizer_path),
        "--out",
        str(out),
        "--quiet",
    ]
    main([*argv, "--text-field", "body", "--domain-field", "meta.src", "--id-field", "uid"])
    assert [d[:2] for d in shard_documents(out)] == [("7", "wiki")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--overwrite", "--domain-field", "meta.src", "--domain-from-path", "x"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


GOOD = {"id": "a", "domain": "math", "text": "One plus one is two."}
GOOD2 = {"id": "b", "domain": "code", "text": "def f():\n    return 2"}
PARQUET_BAD = {  # rows of the file, the field mapping, the reason, the bad rows (1-based)
    "missing_text": ([GOOD, {**GOOD, "text": None}, GOOD2], Fields(), "missing_text", [2]),
    "empty_text": ([GOOD, {**GOOD, "text": " \n\t"}, GOOD2], Fields(), "empty_text", [2]),
    "text_not_string": ([{"t": {"k": "a"}}, {"t": {"k": "b"}}], Fields(text="t"), "bad_field_type", [1, 2]),
    "id_not_scalar": (
        [{"text": "a", "id": [1]}, {"text": "b", "id": []}],
        Fields(),
        "bad_field_type",
        [1, 2],
    ),
    "no_text_column": ([{"body": "a"}, {"body": "b"}], Fields(), "missing_text", [1, 2]),
}


@pytest.mark.parametrize("kind", sorted(PARQUET_BAD))
def test_parquet_bad_rows(kind: str, tokenizer_path: Path, tmp_path: Path) -> None:
    """Fail names the file and the row; skip drops and counts every bad row."""
    rows, fields, reason, bad = PARQUET_BAD[kind]
    path = tmp_path / "in.parquet"
    path.write_bytes(as_parquet(rows))
    with pytest.raises(InputError) as err:
        build_shards([path], tokenizer_path, tmp_path / "out", fields=fields, quiet=True)
    assert str(err.value).startswith(f"{path}:{bad[0]}: {reason}:") and BAD_ROW in str(err.value)
    if len(bad) < len(rows):
        m = build_shards(
            [path], tokenizer_path, tmp_path / "o2", fields=fields, on_error="skip", quiet=True
        ).manifest
        assert m.skipped["counts"] == {reason: len(bad)} and m.totals["docs"] == len(rows) - len(bad)
        assert m.skipped["examples"][reason] == [f"{path}:{i}: {err.value.detail}" for i in bad]


def test_domain_field_of_the_wrong_type(tokenizer_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    path.write_bytes(as_parquet([{"text": "a", "domain": 1}, {"text": "b", "domain": 2}]))
    with pytest.raises(InputError, match=rf"^{path}:1: bad_field_type: 'domain' must be a string, got int"):
        build_shards([path], tokenizer_path, tmp_path / "out", quiet=True)


@pytest.mark.parametrize("fmt", ["parquet", "zst"])
def test_truncated_files(fmt: str, tokenizer_path: Path, tmp_path: Path) -> None:
    """A file cut short: fail names it; skip keeps what was readable and counts the file once (zstd's own
    stream reader would end silently at the cut)."""
    rows = [{"id": str(i), "text": f"document number {i} " * 20} for i in range(2000)]
    data = as_parquet(rows) if fmt == "parquet" else zstandard.ZstdCompressor().compress(as_jsonl(rows))
    path = tmp_path / f"in.{fmt}"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match=rf"^{path}:\d+: unreadable_file: corrupt file"):
        build_shards([path], tokenizer_path, tmp_path / "out", quiet=True)
    m = build_shards([path], tokenizer_path, tmp_path / "out2", on_error="skip", quiet=True).manifest
    assert m.skipped["counts"] == {"unreadable_file": 1} and m.totals["docs"] < len(rows)
    if fmt == "zst":
        assert m.totals["docs"] > 0  # the lines before the cut are kept


def test_zstd_bad_line_is_named(tokenizer_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl.zst"
    path.write_bytes(
        zstandard.ZstdCompressor().compress(as_jsonl([GOOD]) + b"{not json\n" + as_jsonl([GOOD2]))
    )
    with pytest.raises(InputError, match=rf"^{path}:2: invalid_json: "):
        build_shards([path], tokenizer_path, tmp_path / "out", quiet=True)


@pytest.mark.parametrize(
    ("spec", "line"),
    [
        (
            "memory:///emo-test/none/*.jsonl",
            "emo-data: --input memory:///emo-test/none/*.jsonl: no files match: ",
        ),
        ("{tmp}/empty", "emo-data: --input {tmp}/empty: no .jsonl / .json / .parquet files in this folder: "),
        ("nosuchproto://x", "emo-data: --input nosuchproto://x: cannot open this URL ("),
    ],
)
def test_input_mistakes(spec: str, line: str, tokenizer_path: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    argv = ["build-shards", "--input", spec.format(tmp=tmp_path), "--tokenizer", str(tokenizer_path)]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(line.format(tmp=tmp_path)) and err.count("\n") == 1
