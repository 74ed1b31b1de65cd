"""Documents from raw records, whatever the input format: the field mapping and the bad-input policy.

A record (a JSON object, a parquet row) becomes a :class:`Record` through :class:`Fields`: the text, id and domain
fields (dotted paths into nested fields, e.g. ``meta.source``) or a domain taken from the file's path with a regular
expression. Every problem is an :class:`InputError` ``<file>:<n>: <reason>: <detail>`` (``n``: the line of a JSON
Lines file, the row of a parquet file; 0 for the whole file). Under ``on_error="fail"`` the first problem stops the
build; under ``"skip"`` the record is dropped and counted in a :class:`SkipLog` (which ends up in the manifest).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
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
    """A bad input record or file; the message names file and record (line or row; 0: the whole file)."""

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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SkipLog:
        return cls(dict(data.get("counts", {})), {k: list(v) for k, v in data.get("examples", {}).items()})


@dataclass
class Record:
    """One valid document; ``line`` is its line (JSON Lines) or row (parquet), from 1."""

    line: int
    id: str
    domain: str
    text: str


def handle(err: InputError, on_error: OnError, skips: SkipLog) -> None:
    """Raise ``err`` under ``fail``, count it under ``skip``."""
    if on_error == "fail":
        raise err
    skips.add(err)


def file_stem(path: str) -> str:
    """``s3://b/x/train.jsonl.zst`` -> ``train`` (the prefix of generated ids)."""
    return path.rstrip("/").rsplit("/", 1)[-1].split(".")[0]


_MISSING = object()


def lookup(obj: dict[str, Any], path: str) -> Any:
    """``obj[path]`` if that key exists, else the dotted path (``meta.source``); ``_MISSING`` if absent."""
    if path in obj:
        return obj[path]
    value: Any = obj
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


@dataclass(frozen=True)
class Fields:
    """Where a record keeps its text, id and domain.

    ``text`` / ``id`` / ``domain``: field names or dotted paths into nested objects (``meta.source``).
    ``domain_from_path``: a regular expression searched in each input file's path or URL; its group ``domain``
    (or its first group, or the whole match) is the domain of every record of the file (``domain`` is then
    ignored). A record without a domain gets ``unknown``; one without an id gets ``<file stem>-<line>``.
    """

    text: str = "text"
    id: str = "id"
    domain: str = "domain"
    domain_from_path: str | None = None

    def __post_init__(self) -> None:
        for name in ("text", "id", "domain"):
            value = getattr(self, name)
            if not value or any(not part for part in value.split(".")):
                raise UserError(f"--{name}-field {value!r}: not a field name", "use e.g. text or meta.source")
        if self.domain_from_path is not None:
            try:
                re.compile(self.domain_from_path)
            except re.error as err:
                raise UserError(
                    f"--domain-from-path {self.domain_from_path!r}: not a regular expression ({err})",
                    r"use e.g. '/(?P<domain>[^/]+)/[^/]+$' (the folder holding each file)",
                ) from None

    def path_domain(self, path: str) -> str | None:
        """The domain of every record of ``path`` (``None``: each record's ``domain`` field decides)."""
        if self.domain_from_path is None:
            return None
        m = re.search(self.domain_from_path, path)
        if m is None:
            raise UserError(
                f"--domain-from-path {self.domain_from_path!r}: does not match input {path}",
                "change the expression, or pass --domain-field instead",
            )
        if "domain" in m.re.groupindex:
            domain = m.group("domain")
        else:
            domain = m.group(1) if m.re.groups else m.group(0)
        return domain or UNKNOWN_DOMAIN

    def columns(self) -> list[str]:
        """Top-level fields to read from a columnar file (the first part of each path)."""
        names = [self.text, self.id] + ([self.domain] if self.domain_from_path is None else [])
        return list(dict.fromkeys(n.split(".")[0] for n in names))

    def to_dict(self) -> dict[str, str | None]:
        if self.domain_from_path is not None:
            return {"text": self.text, "id": self.id, "domain_from_path": self.domain_from_path}
        return {"text": self.text, "id": self.id, "domain": self.domain}


DEFAULT_FIELDS = Fields()


def _check_str(value: str, name: str) -> str | None:
    """An error detail if ``value`` is not encodable text (a lone surrogate from a JSON ``\\ud800`` escape)."""
    if value.isascii():  # the common case, without encoding the text
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"field {name!r} is not valid Unicode (lone surrogate at {err.start})"
    return None


def make_record(obj: Any, path: str, line: int, fields: Fields, file_domain: str | None) -> Record:
    """Validate one parsed record (a JSON object, a parquet row); raises :class:`InputError`."""
    if not isinstance(obj, dict):
        raise InputError(path, line, NOT_AN_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
    text = lookup(obj, fields.text)
    if text is _MISSING or text is None:
        raise InputError(path, line, MISSING_TEXT, f"record has no {fields.text!r} field")
    if not isinstance(text, str):
        raise InputError(
            path, line, BAD_FIELD_TYPE, f"{fields.text!r} must be a string, got {type(text).__name__}"
        )
    if not text.strip():
        raise InputError(path, line, EMPTY_TEXT, f"{fields.text!r} is empty or whitespace only")
    domain = file_domain
    if domain is None:
        domain = lookup(obj, fields.domain)
        if domain is _MISSING or domain is None or domain == "":
            domain = UNKNOWN_DOMAIN
        elif not isinstance(domain, str):
            raise InputError(
                path, line, BAD_FIELD_TYPE, f"{fields.domain!r} must be a string, got {type(domain).__name__}"
            )
    doc_id = lookup(obj, fields.id)
    if doc_id is _MISSING or doc_id is None or doc_id == "":
        doc_id = f"{file_stem(path)}-{line}"
    elif isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    elif not isinstance(doc_id, str):
        raise InputError(
            path,
            line,
            BAD_FIELD_TYPE,
            f"{fields.id!r} must be a string or integer, got {type(doc_id).__name__}",
        )
    for name, value in ((fields.text, text), (fields.domain, domain), (fields.id, doc_id)):
        detail = _check_str(value, name)
        if detail:
            raise InputError(path, line, INVALID_UTF8, detail)
    return Record(line=line, id=doc_id, domain=domain, text=text)
