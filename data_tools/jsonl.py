"""Reading raw JSON Lines documents (plain or gzip) with explicit handling of bad input.

Every problem is reported as ``<file>:<line>: <reason>: <detail>``. Under ``on_error="fail"`` the first
problem raises :class:`InputError`; under ``"skip"`` the record is dropped and counted in a :class:`SkipLog`
(which ends up in the manifest). Blank lines carry no data and are ignored.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_tools.errors import UserError
from data_tools.manifest import UNKNOWN_DOMAIN

OnError = Literal["fail", "skip"]
MAX_EXAMPLES = 10

# Reasons a record is rejected (keys of the manifest's ``skipped.counts``).
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_TEXT = "missing_text"
EMPTY_TEXT = "empty_text"
BAD_FIELD_TYPE = "bad_field_type"
UNREADABLE_FILE = "unreadable_file"
TOKENIZER_ERROR = "tokenizer_error"


class InputError(UserError, ValueError):
    """A bad input record or file; the message names file and line (line 0: the whole file)."""

    def __init__(self, path: str, line: int, reason: str, detail: str) -> None:
        fix = (
            "check the path"
            if line == 0
            else "fix or remove the record (emo-data build-shards --on-error skip skips and counts bad records)"
        )
        super().__init__(f"{path}:{line}: {reason}: {detail}", fix)
        self.path, self.line, self.reason, self.detail = path, line, reason, detail

    def __reduce__(self):  # picklable across worker processes
        return (InputError, (self.path, self.line, self.reason, self.detail))


@dataclass
class SkipLog:
    """Skipped records per reason, with up to ``MAX_EXAMPLES`` ``file:line: detail`` examples each."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, err: InputError) -> None:
        self.counts[err.reason] = self.counts.get(err.reason, 0) + 1
        examples = self.examples.setdefault(err.reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(f"{err.path}:{err.line}: {err.detail}")

    def merge(self, other: SkipLog) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            room = MAX_EXAMPLES - len(self.examples.setdefault(reason, []))
            self.examples[reason].extend(other.examples.get(reason, [])[: max(room, 0)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "counts": dict(sorted(self.counts.items())), "examples": self.examples}


@dataclass
class Record:
    """One valid document."""

    line: int
    id: str
    domain: str
    text: str


def handle(err: InputError, on_error: OnError, skips: SkipLog) -> None:
    """Raise ``err`` under ``fail``, count it under ``skip``."""
    if on_error == "fail":
        raise err
    skips.add(err)


def _open(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _check_str(value: Any, name: str) -> str | None:
    """Return an error detail if ``value`` is not encodable text."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"field {name!r} is not valid Unicode (lone surrogate at {err.start})"
    return None


def parse_line(raw: bytes, path: str, line: int) -> Record | None:
    """Validate one raw line; ``None`` for a blank line. Raises :class:`InputError`."""
    try:
        text_line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(path, line, INVALID_UTF8, f"undecodable byte at column {err.start + 1}") from None
    if not text_line.strip():
        return None
    try:
        obj = json.loads(text_line)
    except json.JSONDecodeError as err:
        raise InputError(path, line, INVALID_JSON, f"{err.msg} at column {err.colno}") from None
    if not isinstance(obj, dict):
        raise InputError(path, line, NOT_AN_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
    if "text" not in obj:
        raise InputError(path, line, MISSING_TEXT, "record has no 'text' field")
    text = obj["text"]
    if not isinstance(text, str):
        raise InputError(path, line, BAD_FIELD_TYPE, f"'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InputError(path, line, EMPTY_TEXT, "'text' is empty or whitespace only")
    domain = obj.get("domain")
    if domain is None or domain == "":
        domain = UNKNOWN_DOMAIN
    elif not isinstance(domain, str):
        raise InputError(
            path, line, BAD_FIELD_TYPE, f"'domain' must be a string, got {type(domain).__name__}"
        )
    doc_id = obj.get("id")
    if doc_id is None or doc_id == "":
        doc_id = f"{Path(path).name.split('.')[0]}-{line}"
    elif isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    elif not isinstance(doc_id, str):
        raise InputError(
            path, line, BAD_FIELD_TYPE, f"'id' must be a string or integer, got {type(doc_id).__name__}"
        )
    for name, value in (("text", text), ("domain", domain), ("id", doc_id)):
        detail = _check_str(value, name)
        if detail:
            raise InputError(path, line, INVALID_UTF8, detail)
    return Record(line=line, id=doc_id, domain=domain, text=text)


def iter_records(
    path: str | Path, on_error: OnError, skips: SkipLog, progress: Callable[[int], None] | None = None
) -> Iterator[Record]:
    """Yield the valid records of one JSONL file (gzip detected by its magic bytes).

    ``progress``, if given, is called now and then with the number of (compressed) file bytes read so far.
    """
    path = Path(path)
    name = str(path)
    line = 0
    try:
        f = _open(path)
    except OSError as err:
        raise InputError(name, 0, UNREADABLE_FILE, str(err)) from None
    raw_file = getattr(f, "fileobj", f)
    with f:
        while True:
            try:
                raw = f.readline()
            except (OSError, EOFError, zlib.error) as err:
                # A truncated or corrupt gzip stream: the rest of the file cannot be read.
                handle(InputError(name, line + 1, UNREADABLE_FILE, f"corrupt file: {err}"), on_error, skips)
                return
            if not raw:
                return
            line += 1
            if progress is not None and line % 256 == 0:
                progress(raw_file.tell())
            try:
                record = parse_line(raw, name, line)
            except InputError as err:
                handle(err, on_error, skips)
                continue
            if record is not None:
                yield record
