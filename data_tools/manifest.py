"""The shard format: file names, sample fields and ``manifest.json`` (shared by the writer and the reader).

This module is the single place where the on-disk format is defined. It imports only the standard library (and
:mod:`data_tools.errors`, which does too), so both ``data_tools`` (offline preparation) and
``emo_lightning.data`` (the reader) may import it.

A shard is a plain WebDataset tar: one sample per document, members ``<key>.tokens.npy`` (1-D uint16/uint32
token ids, the document's EOS included), ``<key>.domain.txt`` and ``<key>.id.txt`` (UTF-8).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_tools.errors import UserError

FORMAT = "emo-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{index:06d}.tar"
TOKENS_EXT = "tokens.npy"
DOMAIN_EXT = "domain.txt"
ID_EXT = "id.txt"
UNKNOWN_DOMAIN = "unknown"
REBUILD = "rebuild the shards with `emo-data build-shards` (or `make data`)"


class ManifestError(UserError, ValueError):
    """A missing, unreadable or invalid ``manifest.json``."""


@dataclass
class ShardInfo:
    """Counts of one shard: ``domains`` maps a domain name to ``{"docs": n, "tokens": n}``."""

    name: str
    docs: int
    tokens: int
    domains: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class Manifest:
    """The parsed ``manifest.json`` of a shard directory (see ``data/README.md`` for the schema)."""

    vocab_size: int
    eos_id: int
    pad_id: int
    domains: dict[str, int]
    per_domain: dict[str, dict[str, int]]
    shards: list[ShardInfo]
    tokenizer: dict[str, Any] = field(default_factory=dict)
    token_dtype: str = "uint16"
    skipped: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    source: str = ""

    @property
    def domain_names(self) -> list[str]:
        """Domain names indexed by domain id."""
        return [name for name, _ in sorted(self.domains.items(), key=lambda kv: kv[1])]

    def shard_tokens(self) -> dict[str, int]:
        """Token count per shard file name."""
        return {s.name: s.tokens for s in self.shards}

    def to_dict(self) -> dict[str, Any]:
        """The JSON document written to ``manifest.json``."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tokenizer": self.tokenizer,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "token_dtype": self.token_dtype,
            "domains": self.domains,
            "totals": self.totals,
            "per_domain": self.per_domain,
            "shards": [
                {"name": s.name, "docs": s.docs, "tokens": s.tokens, "domains": s.domains}
                for s in self.shards
            ],
            "skipped": self.skipped,
            "build": self.build,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<manifest>") -> Manifest:
        """Parse and check a manifest document; errors name ``source``."""
        if data.get("format") != FORMAT:
            raise ManifestError(
                f"{source}: not an emo-shards manifest (format={data.get('format')!r})", REBUILD
            )
        if data.get("format_version") != FORMAT_VERSION:
            raise ManifestError(
                f"{source}: manifest format_version {data.get('format_version')} is not supported "
                f"(expected {FORMAT_VERSION})",
                REBUILD,
            )
        try:
            domains = {str(k): int(v) for k, v in data["domains"].items()}
            if sorted(domains.values()) != list(range(len(domains))):
                raise ValueError("domain ids must be 0..n-1")
            return cls(
                vocab_size=int(data["vocab_size"]),
                eos_id=int(data["eos_id"]),
                pad_id=int(data["pad_id"]),
                domains=domains,
                per_domain=data["per_domain"],
                shards=[
                    ShardInfo(s["name"], int(s["docs"]), int(s["tokens"]), s["domains"])
                    for s in data["shards"]
                ],
                tokenizer=data.get("tokenizer", {}),
                token_dtype=data.get("token_dtype", "uint16"),
                skipped=data.get("skipped", {}),
                build=data.get("build", {}),
                totals=data.get("totals", {}),
                source=source,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ManifestError(f"{source}: invalid manifest ({err!r})", REBUILD) from err

    @classmethod
    def from_json(cls, text: str, source: str = "<manifest>") -> Manifest:
        """Parse manifest JSON text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{source}: manifest is not valid JSON ({err})", REBUILD) from err
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Read a local ``manifest.json`` (a shard directory is accepted too)."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            what = (
                "no shard manifest" if isinstance(err, FileNotFoundError) else f"unreadable ({err.strerror})"
            )
            raise ManifestError(f"{path}: {what}", REBUILD) from None
        return cls.from_json(text, str(path))

    def save(self, path: str | Path) -> None:
        """Write the manifest atomically (``.tmp`` then rename)."""
        path = Path(path)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
