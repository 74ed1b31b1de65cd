"""Locating and reading tokenised shards: shard specs, manifests (local or any WebDataset URL), tar streaming.

The writer is ``data_tools.shards``; the on-disk format is defined once, in ``data_tools.manifest``.
"""

from __future__ import annotations

import ast
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import braceexpand
import numpy as np
from webdataset.gopen import gopen

from data_tools.manifest import DOMAIN_EXT, MANIFEST_NAME, TOKENS_EXT, Manifest, ShardInfo
from emo_lightning.errors import UserError

URL_SEPARATOR = "::"
BUILD_SHARDS = (
    "build them with `make data` (the bundled corpus) or `emo-data build-shards --input FILES --out DIR`"
)
_NPY_MAGIC = b"\x93NUMPY"
_DESCR = re.compile(r"'descr':\s*'([<|>]?[ui][1248])'")


def _is_url(spec: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", spec) is not None and not Path(spec).exists()


def expand_shards(spec: str, key: str = "shards") -> tuple[list[str], str | None]:
    """Shard URLs of ``spec`` and the manifest location implied by it (``None`` if it cannot be inferred).

    ``spec`` is a directory holding ``manifest.json`` (its shards, in manifest order), a brace pattern
    (``data/train/shard-{000000..000063}.tar``, ``pipe:aws s3 cp s3://b/shard-{000..099}.tar -``) or several
    of these separated by ``::``. A local folder or file that does not exist is a :class:`UserError` naming
    ``key`` (e.g. ``data.train_shards``).
    """
    urls: list[str] = []
    manifest: str | None = None
    for part in spec.split(URL_SEPARATOR):
        part = part.strip()
        if not part:
            continue
        path = Path(part)
        local = not _is_url(part)
        if local and "{" not in part and not path.exists():
            raise UserError(f"{key}: {part}: no such shard folder", BUILD_SHARDS)
        if local and path.is_dir():
            m = Manifest.load(path)
            urls.extend(str(path / s.name) for s in m.shards)
            manifest = manifest or str(path / MANIFEST_NAME)
            continue
        expanded = list(braceexpand.braceexpand(part))
        urls.extend(expanded)
        if manifest is None and not _is_url(part):
            candidate = Path(expanded[0]).parent / MANIFEST_NAME
            manifest = str(candidate) if candidate.exists() else None
    if not urls:
        raise UserError(f"{key}: no shards in {spec!r}", BUILD_SHARDS)
    return urls, manifest


def load_manifest(location: str) -> Manifest:
    """Read a manifest from a local path (file or directory) or any URL ``webdataset.gopen`` opens."""
    if not _is_url(location):
        return Manifest.load(location)
    with gopen(location, "rb") as f:
        return Manifest.from_json(f.read().decode("utf-8"), location)


def shard_infos(urls: list[str], manifest: Manifest) -> list[ShardInfo] | None:
    """The manifest's entry of each URL, matched by shard file name; ``None`` if one is unknown."""
    by_name = {s.name: s for s in manifest.shards}
    out = []
    for url in urls:
        tail = url.rsplit("/", 1)[-1]
        name = tail.split()[0] if tail.split() else tail
        if name not in by_name:
            name = next((n for n in by_name if n in tail), None)
        if name is None:
            return None
        out.append(by_name[name])
    return out


def shard_tokens(urls: list[str], manifest: Manifest) -> list[int] | None:
    """Token count of each URL, matched to the manifest by shard file name; ``None`` if one is unknown."""
    infos = shard_infos(urls, manifest)
    return None if infos is None else [s.tokens for s in infos]


def decode_tokens(data: bytes, where: str) -> np.ndarray:
    """Decode a ``tokens.npy`` member (fast path for 1-D little-endian integer arrays)."""
    if data[:6] != _NPY_MAGIC:
        raise ValueError(f"{where}: {TOKENS_EXT} is not a .npy array")
    if data[6] == 1:
        hlen, off = int.from_bytes(data[8:10], "little"), 10
    else:
        hlen, off = int.from_bytes(data[8:12], "little"), 12
    header = data[off : off + hlen].decode("latin1")
    m = _DESCR.search(header)
    if m is None or "'fortran_order': False" not in header:
        header_dict = ast.literal_eval(header)
        raise ValueError(f"{where}: unsupported token array {header_dict}")
    return np.frombuffer(data, dtype=np.dtype(m.group(1)), offset=off + hlen)


def read_shard(url: str) -> Iterator[tuple[str, np.ndarray, str]]:
    """Yield ``(key, tokens, domain)`` for every document of one shard, in shard order."""
    stream = gopen(url, "rb")
    key: str | None = None
    tokens: np.ndarray | None = None
    domain: str | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                name = member.name
                dot = name.find(".", name.rfind("/") + 1)
                if dot < 0:
                    continue
                k, ext = name[:dot], name[dot + 1 :]
                if k != key:
                    if key is not None:
                        yield _sample(url, key, tokens, domain)
                    key, tokens, domain = k, None, None
                if ext == TOKENS_EXT:
                    tokens = decode_tokens(tar.extractfile(member).read(), f"{url}:{k}")  # type: ignore[union-attr]
                elif ext == DOMAIN_EXT:
                    domain = tar.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
            if key is not None:
                yield _sample(url, key, tokens, domain)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise OSError(f"{url}: cannot read shard: {err}") from err
    finally:
        stream.close()


def _sample(url: str, key: str, tokens: np.ndarray | None, domain: str | None) -> tuple[str, np.ndarray, str]:
    if tokens is None or domain is None:
        missing = TOKENS_EXT if tokens is None else DOMAIN_EXT
        raise ValueError(f"{url}: sample {key!r} has no {missing}")
    return key, tokens, domain
