"""``build-shards``: JSONL files -> tokenised WebDataset tar shards + ``manifest.json``.

Two phases:

1. Tokenise every input file (in parallel over files) into a temporary per-file pair: a flat binary of
   token ids (each document followed by EOS) and an index of ``[id, domain, n_tokens, line]`` lines.
2. Merge the per-file outputs into shards with a seeded random interleave weighted by the documents each
   file has left (a uniformly random interleaving, streamed with O(1) memory per file), so every shard's
   domain mix approximates the global one even though each input file holds one domain in id order.

Tars are written with the standard library (a WebDataset shard is a plain tar; importing ``webdataset``
would pull in torch). Member mtimes are fixed, so equal inputs and seed give byte-identical shards.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import os
import random
import re
import tarfile
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_tools.errors import UserError
from data_tools.jsonl import TOKENIZER_ERROR, InputError, OnError, Record, SkipLog, handle, iter_records
from data_tools.manifest import (
    DOMAIN_EXT,
    ID_EXT,
    MANIFEST_NAME,
    SHARD_PATTERN,
    TOKENS_EXT,
    Manifest,
    ShardInfo,
)
from data_tools.tokenizer import file_sha256, load_tokenizer, special_ids

ENCODE_BATCH = 256
MAX_KEY_LEN = 80
AUTO_TARGET_SHARDS = 64
AUTO_MIN_TOKENS = 1 << 14
AUTO_MAX_TOKENS = 1 << 27


@dataclass
class FileResult:
    """Phase-1 output of one input file."""

    index: int
    path: str
    docs: int = 0
    tokens: int = 0
    text_bytes: int = 0
    skips: SkipLog = field(default_factory=SkipLog)


@dataclass
class BuildResult:
    """What ``build_shards`` did (also used by the benchmark)."""

    manifest: Manifest
    text_bytes: int
    tokens: int
    seconds_tokenize: float
    seconds_write: float


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def parse_size(text: str) -> int:
    """``"65536"``, ``"64k"``, ``"1M"``, ``"2G"`` -> tokens."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise UserError(f"--shard-size {text!r}: not a token count", "use e.g. 65536, 64k, 1M or auto")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def auto_shard_size(total_tokens: int) -> int:
    """Aim at ``AUTO_TARGET_SHARDS`` shards (>> ranks x workers), within [16k, 128M] tokens per shard."""
    return min(max(math.ceil(total_tokens / AUTO_TARGET_SHARDS), AUTO_MIN_TOKENS), AUTO_MAX_TOKENS)


# ---------------------------------------------------------------------------------------- phase 1
_progress: Any = None  # shared array of bytes read per file (set in pool workers)


def _init_worker(progress: Any, single_threaded: bool = False) -> None:
    global _progress
    _progress = progress
    if single_threaded:  # one tokenizer thread per worker process: no oversubscription of the cores
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _encode(
    tokenizer: Any, batch: list[Record], path: str, on_error: OnError, skips: SkipLog
) -> list[list[int]]:
    """Encode a batch; on a tokenizer failure, find the culprit record and report its line."""
    texts = [r.text for r in batch]
    try:
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    except Exception:
        out: list[list[int] | None] = []
        for r in batch:
            try:
                out.append(tokenizer.encode(r.text, add_special_tokens=False).ids)
            except Exception as err:
                handle(InputError(path, r.line, TOKENIZER_ERROR, str(err)), on_error, skips)
                out.append(None)
        return out  # type: ignore[return-value]


def tokenize_file(
    index: int, path: str, tokenizer_path: str, tmpdir: str, on_error: OnError, dtype: str, eos_id: int
) -> FileResult:
    """Tokenise one JSONL file into ``<tmpdir>/<index>.bin`` / ``.idx`` (runs in a worker process)."""
    tokenizer = load_tokenizer(tokenizer_path)
    result = FileResult(index=index, path=path)
    np_dtype = np.dtype(dtype)

    def progress(pos: int) -> None:
        if _progress is not None:
            _progress[index] = pos

    with (
        open(Path(tmpdir) / f"{index}.bin", "wb") as fbin,
        open(Path(tmpdir) / f"{index}.idx", "w", encoding="utf-8") as fidx,
    ):

        def flush(batch: list[Record]) -> None:
            for record, ids in zip(
                batch, _encode(tokenizer, batch, path, on_error, result.skips), strict=True
            ):
                if ids is None:
                    continue
                if not ids:
                    handle(
                        InputError(path, record.line, "empty_text", "text has no tokens"),
                        on_error,
                        result.skips,
                    )
                    continue
                arr = np.empty(len(ids) + 1, dtype=np_dtype)
                arr[:-1] = ids
                arr[-1] = eos_id
                fbin.write(arr.tobytes())
                fidx.write(json.dumps([record.id, record.domain, len(arr), record.line], ensure_ascii=False))
                fidx.write("\n")
                result.docs += 1
                result.tokens += len(arr)
                result.text_bytes += len(record.text.encode("utf-8"))

        batch: list[Record] = []
        for record in iter_records(path, on_error, result.skips, progress):
            batch.append(record)
            if len(batch) == ENCODE_BATCH:
                flush(batch)
                batch = []
        flush(batch)
    progress(Path(path).stat().st_size)
    return result


def _tokenize_all(
    inputs: Sequence[str],
    tokenizer_path: str,
    tmpdir: str,
    on_error: OnError,
    dtype: str,
    eos_id: int,
    workers: int,
    quiet: bool,
) -> list[FileResult]:
    total_bytes = sum(Path(p).stat().st_size for p in inputs)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenising", disable=quiet)
    args = [(i, p, tokenizer_path, tmpdir, on_error, dtype, eos_id) for i, p in enumerate(inputs)]
    try:
        if workers <= 1:
            progress = [0] * len(inputs)
            _init_worker(progress)
            results = []
            for a in args:
                results.append(tokenize_file(*a))
                bar.update(sum(progress) - bar.n)
            return results
        shared = mp.Array("q", len(inputs), lock=False)
        with mp.get_context("fork").Pool(min(workers, len(inputs)), _init_worker, (shared, True)) as pool:
            pending = [pool.apply_async(tokenize_file, a) for a in args]
            while not all(p.ready() for p in pending):
                time.sleep(0.1)
                bar.update(sum(shared) - bar.n)
            results = [p.get() for p in pending]  # re-raises a worker's InputError (picklable)
            bar.update(sum(shared) - bar.n)
            return results
    finally:
        _init_worker(None)
        bar.close()


# ---------------------------------------------------------------------------------------- phase 2
def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


class _ShardWriter:
    """Writes samples into ``shard-NNNNNN.tar`` files of about ``shard_size`` tokens."""

    def __init__(self, out: Path, shard_size: int) -> None:
        self.out, self.shard_size = out, shard_size
        self.shards: list[ShardInfo] = []
        self.tar: tarfile.TarFile | None = None

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        assert self.tar is not None
        self.tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, tokens: np.ndarray, domain: str, doc_id: str) -> None:
        if self.tar is None:
            name = SHARD_PATTERN.format(index=len(self.shards))
            self.tar = tarfile.open(self.out / name, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
            self.shards.append(ShardInfo(name=name, docs=0, tokens=0, domains={}))
        self._add(f"{key}.{DOMAIN_EXT}", domain.encode("utf-8"))
        self._add(f"{key}.{ID_EXT}", doc_id.encode("utf-8"))
        self._add(f"{key}.{TOKENS_EXT}", _npy_bytes(tokens))
        shard = self.shards[-1]
        shard.docs += 1
        shard.tokens += len(tokens)
        counts = shard.domains.setdefault(domain, {"docs": 0, "tokens": 0})
        counts["docs"] += 1
        counts["tokens"] += len(tokens)
        if shard.tokens >= self.shard_size:
            self.close()

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


def _key(doc_id: str, used: set[str]) -> str:
    """Sanitised, unique WebDataset key (no dots or slashes; duplicates get ``_dupN``)."""
    base = re.sub(r"[^A-Za-z0-9_-]", "_", doc_id)[:MAX_KEY_LEN] or "doc"
    key, n = base, 1
    while key in used:
        key, n = f"{base}_dup{n}", n + 1
    used.add(key)
    return key


def _merge(
    results: list[FileResult], tmpdir: str, dtype: np.dtype, writer: _ShardWriter, seed: int, quiet: bool
) -> None:
    rng = random.Random(seed)
    live = [r for r in results if r.docs > 0]
    remaining = [r.docs for r in live]
    used: set[str] = set()
    total = sum(remaining)
    with ExitStack() as stack:
        idx_files = [
            stack.enter_context(open(Path(tmpdir) / f"{r.index}.idx", encoding="utf-8")) for r in live
        ]
        bin_files = [stack.enter_context(open(Path(tmpdir) / f"{r.index}.bin", "rb")) for r in live]
        for _ in tqdm(range(total), unit="doc", desc="writing shards", disable=quiet):
            pick = rng.randrange(total)
            i = 0
            while pick >= remaining[i]:
                pick -= remaining[i]
                i += 1
            remaining[i] -= 1
            total -= 1
            doc_id, domain, n, _line = json.loads(idx_files[i].readline())
            tokens = np.frombuffer(bin_files[i].read(n * dtype.itemsize), dtype=dtype)
            writer.write(_key(doc_id, used), tokens, domain, doc_id)
        writer.close()


def build_shards(
    inputs: Sequence[str | Path],
    tokenizer_path: str | Path,
    out: str | Path,
    *,
    shard_size: int | None = None,
    workers: int = 1,
    on_error: OnError = "fail",
    seed: int = 0,
    eos_token: str | None = None,
    pad_token: str | None = None,
    overwrite: bool = False,
    quiet: bool = False,
) -> BuildResult:
    """Tokenise ``inputs`` into shards under ``out``; ``shard_size`` in tokens (``None``: automatic)."""
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    inputs = [str(p) for p in inputs]
    if not inputs:
        raise UserError("--input: no input files", "pass one or more JSONL files (plain or .gz)")
    for p in inputs:
        if not Path(p).is_file():
            raise InputError(p, 0, "unreadable_file", "no such file")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST_NAME).exists() and not overwrite:
        raise UserError(f"{out}: already holds a shard set", "pass --overwrite to replace it")
    # Without a manifest, shards are the leftovers of an interrupted build: replaced without asking.
    for f in [*out.glob("shard-*.tar"), out / MANIFEST_NAME]:
        f.unlink(missing_ok=True)
    tokenizer = load_tokenizer(tokenizer_path)
    eos_tok, eos_id, pad_tok, pad_id = special_ids(tokenizer, eos_token, pad_token, str(tokenizer_path))
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)

    with tempfile.TemporaryDirectory(dir=out, prefix=".build-") as tmpdir:
        t0 = time.perf_counter()
        results = _tokenize_all(
            inputs, str(tokenizer_path), tmpdir, on_error, dtype.name, eos_id, workers, quiet
        )
        t1 = time.perf_counter()
        total_tokens = sum(r.tokens for r in results)
        size = shard_size or auto_shard_size(total_tokens)
        writer = _ShardWriter(out, size)
        _merge(results, tmpdir, dtype, writer, seed, quiet)
        t2 = time.perf_counter()

    skips = SkipLog()
    for r in results:
        skips.merge(r.skips)
    per_domain: dict[str, dict[str, int]] = {}
    for shard in writer.shards:
        for name, c in shard.domains.items():
            d = per_domain.setdefault(name, {"docs": 0, "tokens": 0})
            d["docs"] += c["docs"]
            d["tokens"] += c["tokens"]
    per_domain = dict(sorted(per_domain.items()))
    manifest = Manifest(
        vocab_size=vocab_size,
        eos_id=eos_id,
        pad_id=pad_id,
        domains={name: i for i, name in enumerate(per_domain)},
        per_domain=per_domain,
        shards=writer.shards,
        tokenizer={
            "path": str(tokenizer_path),
            "sha256": file_sha256(tokenizer_path),
            "eos_token": eos_tok,
            "pad_token": pad_tok,
        },
        token_dtype=dtype.name,
        skipped=skips.to_dict(),
        totals={
            "docs": sum(r.docs for r in results),
            "tokens": total_tokens,
            "text_bytes": sum(r.text_bytes for r in results),
            "shards": len(writer.shards),
        },
        build={
            "inputs": inputs,
            "input_docs": {r.path: r.docs for r in results},
            "shard_size": size,
            "seed": seed,
            "on_error": on_error,
            "workers": workers,
        },
    )
    manifest.save(out / MANIFEST_NAME)
    return BuildResult(manifest, manifest.totals["text_bytes"], total_tokens, t1 - t0, t2 - t1)
