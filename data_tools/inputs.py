"""Input files: local paths or any fsspec URL (``s3://``, ``gs://``, ``hf://``...), globs and folders; their
records whatever the format.

The format is detected from each file's first bytes: parquet (``PAR1``), else JSON Lines, plain or compressed
(gzip, zstd). A folder stands for the files under it whose names look like inputs (``.jsonl``, ``.json``,
``.ndjson``, ``.parquet``, ``.pq``, each optionally ``.gz`` / ``.zst``), sorted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import fsspec
from fsspec.core import url_to_fs

from data_tools.errors import UserError
from data_tools.jsonl import iter_lines
from data_tools.parquet import PARQUET_MAGIC, iter_rows
from data_tools.records import (
    DEFAULT_FIELDS,
    UNREADABLE_FILE,
    Fields,
    InputError,
    OnError,
    Record,
    SkipLog,
)

INPUT_NAME = re.compile(r"\.(jsonl|json|ndjson|parquet|pq)(\.(gz|zst|zstd))?$", re.IGNORECASE)
INPUT_FIX = (
    "pass JSON Lines (plain, .gz, .zst) or parquet files, folders or globs (local paths or fsspec URLs)"
)


@dataclass(frozen=True)
class InputFile:
    """One input file and its size in bytes (the unit of work split between tasks)."""

    path: str
    size: int


def _name(fs: fsspec.AbstractFileSystem, path: str, spec: str) -> str:
    """How a listed file is named in messages and the manifest: with the protocol of ``spec`` if it had one."""
    return fs.unstrip_protocol(path) if "://" in spec else path


def expand_inputs(specs: Sequence[str]) -> list[InputFile]:
    """Files named by ``specs`` (files, globs, folders), in the order given; globs and folders sorted."""
    if not specs:
        raise UserError("--input: no input files", INPUT_FIX)
    out: list[InputFile] = []
    for spec in specs:
        try:
            fs, path = url_to_fs(spec)
        except (ImportError, ValueError) as err:  # an unknown protocol, or its package is missing
            raise UserError(f"--input {spec}: cannot open this URL ({err})", INPUT_FIX) from None
        if fsspec.core.has_magic(path):
            infos = fs.glob(path, detail=True)
            found = [(p, i) for p, i in sorted(infos.items()) if i.get("type") == "file"]
            if not found:
                raise UserError(f"--input {spec}: no files match", INPUT_FIX)
        else:
            try:
                info = fs.info(path)
            except FileNotFoundError:
                raise InputError(spec, 0, UNREADABLE_FILE, "no such file") from None
            except OSError as err:
                raise InputError(spec, 0, UNREADABLE_FILE, str(err)) from None
            if info.get("type") == "directory":
                listed = fs.find(path, detail=True)
                found = [(p, i) for p, i in sorted(listed.items()) if INPUT_NAME.search(p)]
                if not found:
                    raise UserError(
                        f"--input {spec}: no .jsonl / .json / .parquet files in this folder", INPUT_FIX
                    )
            else:
                out.append(InputFile(spec, int(info.get("size") or 0)))
                continue
        out.extend(InputFile(_name(fs, p, spec), int(i.get("size") or 0)) for p, i in found)
    return out


def read_records(
    path: str,
    on_error: OnError,
    skips: SkipLog,
    progress: Callable[[int], None] | None = None,
    fields: Fields = DEFAULT_FIELDS,
    size: int = 0,
) -> Iterator[Record]:
    """Yield the valid records of one input file (parquet or JSON Lines, detected from its first bytes)."""
    file_domain = fields.path_domain(path)
    try:
        raw = fsspec.open(path, "rb").open()
    except OSError as err:
        raise InputError(path, 0, UNREADABLE_FILE, str(err)) from None
    with raw:
        magic = raw.read(4)
        raw.seek(0)
        if magic == PARQUET_MAGIC:
            yield from iter_rows(raw, path, on_error, skips, progress, fields, file_domain, size)
        else:
            yield from iter_lines(raw, path, on_error, skips, progress, fields, file_domain)
