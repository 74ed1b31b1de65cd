"""``build-shards``: documents -> tokenised WebDataset tar shards + one ``manifest.json``.

The build is split into ``tasks`` independent tasks (run by :mod:`data_tools.executors` on datatrove's local,
Slurm or Ray executor). The input files are shared out between tasks once, at submission (largest first, each to
the task with the fewest bytes so far); task ``t`` then, on its own:

1. tokenises its files one after the other into a temporary per-file pair: a flat binary of token ids (each
   document followed by EOS) and an index of ``[id, domain, n_tokens, line]`` lines;
2. merges them into its shards with a seeded random interleave weighted by the documents each file has left (a
   uniformly random interleaving, O(1) memory per file), so its shards mix the domains of its files;
3. writes a part manifest ``.build/parts/task-TTTTT.json`` (its shards, counts and skipped records).

One final step merges the parts into ``manifest.json``. A task's output depends only on (its files, tokenizer,
seed, task index), never on how many processes or machines run the tasks. One task writes ``shard-NNNNNN.tar``;
with several, task ``t`` writes ``shard-TTTTT-NNNNNN.tar``. Tars are written with the standard library (a
WebDataset shard is a plain tar; importing ``webdataset`` would pull in torch); member mtimes are fixed, so equal
inputs, tokenizer, seed and task count give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import posixpath
import random
import re
import tarfile
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fsspec.core import url_to_fs
from tqdm import tqdm

from data_tools.errors import UserError
from data_tools.inputs import InputFile, read_records
from data_tools.manifest import DOMAIN_EXT, ID_EXT, MANIFEST_NAME, TOKENS_EXT, Manifest, ShardInfo
from data_tools.records import (
    EMPTY_TEXT,
    TOKENIZER_ERROR,
    Fields,
    InputError,
    OnError,
    Record,
    SkipLog,
    handle,
)
from data_tools.tokenizer import load_tokenizer_json

ENCODE_BATCH = 256
MAX_KEY_LEN = 80
AUTO_TARGET_SHARDS = 64
AUTO_MIN_TOKENS = 1 << 14
AUTO_MAX_TOKENS = 1 << 27
BUILD_DIR = ".build"  # plan, tokenizer copy, part manifests, datatrove's logs and completions


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


def auto_shard_size(total_tokens: int, target_shards: int = AUTO_TARGET_SHARDS) -> int:
    """Aim at ``target_shards`` shards (>> ranks x workers), within [16k, 128M] tokens per shard."""
    return min(max(math.ceil(total_tokens / target_shards), AUTO_MIN_TOKENS), AUTO_MAX_TOKENS)


def shard_name(task: int, index: int, tasks: int) -> str:
    """``shard-NNNNNN.tar`` for a one-task build, ``shard-TTTTT-NNNNNN.tar`` (task, index) otherwise."""
    return f"shard-{index:06d}.tar" if tasks == 1 else f"shard-{task:05d}-{index:06d}.tar"


def assign_files(files: Sequence[InputFile], tasks: int) -> list[list[int]]:
    """File indices per task: largest file first, each to the task with the fewest bytes (ties: lowest task);
    each task keeps its files in input order. Deterministic from the sizes alone."""
    load = [0] * tasks
    out: list[list[int]] = [[] for _ in range(tasks)]
    for i in sorted(range(len(files)), key=lambda i: (-files[i].size, i)):
        t = min(range(tasks), key=lambda t: (load[t], t))
        out[t].append(i)
        load[t] += files[i].size
    return [sorted(ix) for ix in out]


@dataclass
class BuildConfig:
    """Everything a task needs (pickled to Slurm / Ray tasks: paths and numbers only)."""

    out: str  # output folder: a local path or an fsspec URL
    files: list[InputFile]
    assignment: list[list[int]]  # file indices of each task
    tokenizer: dict[str, Any]  # {path, sha256, eos_token, pad_token} as recorded in the manifest
    eos_id: int
    pad_id: int
    vocab_size: int
    fields: Fields = field(default_factory=Fields)
    on_error: OnError = "fail"
    seed: int = 0
    shard_size: int | None = None  # tokens per shard; None: automatic, per task
    workers: int = 1
    executor: str = "local"
    tmp_dir: str | None = None  # per-task scratch (default: under out for a local out, else the system's)
    single_threaded: bool = False  # one tokenizer thread per task (several tasks share a machine)
    progress: bool = False  # progress bars (tasks run one at a time in this process)

    @property
    def tasks(self) -> int:
        return len(self.assignment)

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    def fingerprint(self) -> str:
        """What decides the output: equal fingerprints give identical shards (resume is safe)."""
        key = {
            "files": [(f.path, f.size) for f in self.files],
            "tasks": self.tasks,
            "tokenizer": self.tokenizer["sha256"],
            "special": (self.eos_id, self.pad_id),
            "fields": self.fields.to_dict(),
            "on_error": self.on_error,
            "seed": self.seed,
            "shard_size": self.shard_size,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


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
class TaskResult:
    """What one task wrote (also its part manifest)."""

    task: int
    shards: list[ShardInfo]
    input_docs: dict[str, int]
    docs: int
    tokens: int
    text_bytes: int
    shard_size: int
    skipped: dict[str, Any]
    seconds_tokenize: float
    seconds_write: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shards": [asdict(s) for s in self.shards]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskResult:
        return cls(**{**data, "shards": [ShardInfo(**s) for s in data["shards"]]})


@dataclass
class BuildResult:
    """What a finished build did (also used by the benchmark)."""

    manifest: Manifest
    text_bytes: int
    tokens: int
    seconds_tokenize: float  # summed over tasks (process-seconds)
    seconds_write: float
    seconds_wall: float = 0.0
    task_results: list[TaskResult] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- output folder
class Output:
    """The output folder on any fsspec filesystem: shards, ``manifest.json`` and ``.build/``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = url_to_fs(url)
        self.local = "://" not in url or url.startswith("file://")

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_text(self, *parts: str) -> str:
        with self.fs.open(self.path(*parts), "rb") as f:
            return f.read().decode("utf-8")

    def write_text(self, text: str, *parts: str) -> None:
        """Write a small file; locally through a temporary name and a rename (a reader never sees half)."""
        target = self.path(*parts)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        tmp = target + ".tmp" if self.local else target
        with self.fs.open(tmp, "wb") as f:
            f.write(text.encode("utf-8"))
        if tmp != target:
            self.fs.mv(tmp, target)

    def remove(self, pattern: str) -> None:
        """Remove the files (or folders) matching a glob under the root."""
        for p in self.fs.glob(self.path(pattern)):
            self.fs.rm(p, recursive=True)

    def build_url(self, *parts: str) -> str:
        """A URL (or local path) under ``.build/`` for other tools (datatrove's logging folders)."""
        path = self.path(BUILD_DIR, *parts)
        return path if self.local else self.fs.unstrip_protocol(path)


def prepare_output(config: BuildConfig, tokenizer_path: str, overwrite: bool) -> bool:
    """Make ``config.out`` ready; ``True`` if it holds an interrupted build of the same plan (to resume).

    A finished build (``manifest.json``) is replaced only with ``overwrite``. Leftovers of an interrupted build
    with another plan (inputs, tokenizer, seed, tasks...) are removed without asking.
    """
    out = Output(config.out)
    out.fs.makedirs(out.root, exist_ok=True)
    if out.exists(MANIFEST_NAME) and not overwrite:
        raise UserError(f"{config.out}: already holds a shard set", "pass --overwrite to replace it")
    fingerprint = config.fingerprint()
    plan_file = (BUILD_DIR, "plan.json")
    same_plan = (
        out.exists(*plan_file) and json.loads(out.read_text(*plan_file)).get("fingerprint") == fingerprint
    )
    if same_plan and not overwrite:
        out.remove(posixpath.join(BUILD_DIR, "manifest"))  # its task must run again: no manifest.json yet
        return True
    for pattern in ("shard-*.tar", MANIFEST_NAME, BUILD_DIR):
        out.remove(pattern)
    with open(tokenizer_path, "rb") as f:
        out.write_text(f.read().decode("utf-8"), BUILD_DIR, "tokenizer.json")
    plan = {
        "fingerprint": fingerprint,
        "tasks": config.tasks,
        "files": [[config.files[i].path for i in ix] for ix in config.assignment],
    }
    out.write_text(json.dumps(plan, indent=1) + "\n", BUILD_DIR, "plan.json")
    return False


# ---------------------------------------------------------------------------------------- phase 1
def _encode(
    tokenizer: Any, batch: list[Record], path: str, on_error: OnError, skips: SkipLog
) -> list[list[int] | None]:
    """Encode a batch; on a tokenizer failure, find the culprit record and report its line."""
    texts = [r.text for r in batch]
    try:  # the same ids as encode_batch, without computing character offsets
        return [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    except Exception:
        out: list[list[int] | None] = []
        for r in batch:
            try:
                out.append(tokenizer.encode(r.text, add_special_tokens=False).ids)
            except Exception as err:
                handle(InputError(path, r.line, TOKENIZER_ERROR, str(err)), on_error, skips)
                out.append(None)
        return out


def tokenize_file(
    index: int, file: InputFile, tokenizer: Any, config: BuildConfig, tmpdir: str, bar: tqdm | None
) -> FileResult:
    """Tokenise one input file into ``<tmpdir>/<index>.bin`` / ``.idx``."""
    result = FileResult(index=index, path=file.path)
    np_dtype, eos_id, on_error = config.dtype, config.eos_id, config.on_error
    start = bar.n if bar is not None else 0

    def progress(pos: int) -> None:
        if bar is not None:
            bar.update(start + pos - bar.n)

    with (
        open(Path(tmpdir) / f"{index}.bin", "wb") as fbin,
        open(Path(tmpdir) / f"{index}.idx", "w", encoding="utf-8") as fidx,
    ):

        def flush(batch: list[Record]) -> None:
            for record, ids in zip(
                batch, _encode(tokenizer, batch, file.path, on_error, result.skips), strict=True
            ):
                if ids is None:
                    continue
                if not ids:
                    handle(
                        InputError(file.path, record.line, EMPTY_TEXT, "text has no tokens"),
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
                text = record.text
                result.text_bytes += len(text) if text.isascii() else len(text.encode("utf-8"))

        batch: list[Record] = []
        records = read_records(file.path, on_error, result.skips, progress, config.fields, file.size)
        for record in records:
            batch.append(record)
            if len(batch) == ENCODE_BATCH:
                flush(batch)
                batch = []
        flush(batch)
    progress(file.size)
    return result


# ---------------------------------------------------------------------------------------- phase 2
def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _ustar_template() -> tuple[bytes, int]:
    """The ustar header of an empty-named, empty regular file (mode 0444, mtime 0, root) with blank name, size
    and checksum fields, and the byte sum of what stays: the checksum of a header is that plus its name and
    size bytes."""
    info = tarfile.TarInfo("")
    info.mtime, info.mode = 0, 0o444
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
    header[124:136] = bytes(12)  # size
    header[148:156] = b" " * 8  # checksum, counted as spaces
    return bytes(header), sum(header)


_USTAR, _USTAR_SUM = _ustar_template()


def _header(name: str, size: int) -> bytes:
    """``tarfile.TarInfo(name).tobuf(USTAR_FORMAT)`` of a member of ``size`` bytes (mode 0444, mtime 0), byte for
    byte, in a few microseconds instead of ~20 (the shards' tests compare with ``tarfile``)."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or not name.isascii():
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o444
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    size_field = b"%011o\0" % size
    chksum = _USTAR_SUM + sum(raw) + sum(size_field)
    return b"".join(
        (
            raw,
            bytes(100 - len(raw)),
            _USTAR[100:124],
            size_field,
            _USTAR[136:148],
            b"%06o\0 " % chksum,
            _USTAR[156:],
        )
    )


class _ShardWriter:
    """Writes samples into the task's ``shard-*.tar`` files of about ``shard_size`` tokens.

    Each member is a ustar header, the data and its zero padding; the archive ends as ``tarfile`` ends it (two
    zero blocks, padded to a record): the bytes are those ``tarfile.addfile`` writes. Framed here because
    ``tarfile``'s generic header code and ``addfile`` (which copies every ``TarInfo`` and keeps all of them in
    memory, 3 per document) took a fifth of a one-process build of short documents.
    """

    def __init__(self, out: Output, task: int, tasks: int, shard_size: int) -> None:
        self.out, self.task, self.tasks, self.shard_size = out, task, tasks, shard_size
        self.shards: list[ShardInfo] = []
        self.file: Any = None
        self.written = 0  # bytes of the open shard

    def _add(self, name: str, data: bytes) -> None:
        pad = -len(data) % tarfile.BLOCKSIZE
        header = _header(name, len(data))
        self.file.write(header)
        self.file.write(data)
        self.file.write(b"\0" * pad)
        self.written += len(header) + len(data) + pad

    def write(self, key: str, tokens: np.ndarray, domain: str, doc_id: str) -> None:
        if self.file is None:
            name = shard_name(self.task, len(self.shards), self.tasks)
            self.file = self.out.fs.open(self.out.path(name), "wb")
            self.written = 0
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
        if self.file is not None:
            end = self.written + 2 * tarfile.BLOCKSIZE  # end-of-archive marker, then pad to a whole record
            self.file.write(b"\0" * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
            self.file.close()
            self.file = None


def _key(doc_id: str, used: set[str]) -> str:
    """Sanitised WebDataset key unique within the task (no dots or slashes; duplicates get ``_dupN``)."""
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


def task_seed(seed: int, task: int) -> int:
    """The interleaving seed of task ``task`` (task 0 uses ``seed`` itself: a one-task build is unchanged)."""
    return seed + (task << 32)


def part_path(task: int) -> tuple[str, str, str]:
    return (BUILD_DIR, "parts", f"task-{task:05d}.json")


def build_task(config: BuildConfig, task: int) -> TaskResult:
    """Run task ``task``: tokenise its files, write its shards and its part manifest (replacing any partial
    output of an earlier, interrupted attempt)."""
    if config.single_threaded:  # several tasks share the machine: one tokenizer thread each
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    out = Output(config.out)
    out.remove("shard-??????.tar" if config.tasks == 1 else f"shard-{task:05d}-??????.tar")
    out.remove(posixpath.join(*part_path(task)))
    tokenizer = load_tokenizer_json(out.read_text(BUILD_DIR, "tokenizer.json"), config.tokenizer["path"])
    files = [(i, config.files[i]) for i in config.assignment[task]]
    scratch = config.tmp_dir or (out.path(BUILD_DIR) if out.local else None)
    if scratch is not None:
        os.makedirs(scratch, exist_ok=True)
    quiet = not config.progress
    with tempfile.TemporaryDirectory(dir=scratch, prefix=f"tmp-task-{task:05d}-") as tmpdir:
        t0 = time.perf_counter()
        desc = "tokenising" if config.tasks == 1 else f"tokenising (task {task + 1}/{config.tasks})"
        with tqdm(
            total=sum(f.size for _, f in files), unit="B", unit_scale=True, desc=desc, disable=quiet
        ) as bar:
            results = [
                tokenize_file(i, f, tokenizer, config, tmpdir, None if quiet else bar) for i, f in files
            ]
        t1 = time.perf_counter()
        tokens = sum(r.tokens for r in results)
        target = max(1, math.ceil(AUTO_TARGET_SHARDS / config.tasks))
        size = config.shard_size or auto_shard_size(tokens, target)
        writer = _ShardWriter(out, task, config.tasks, size)
        _merge(results, tmpdir, config.dtype, writer, task_seed(config.seed, task), quiet)
        t2 = time.perf_counter()
    skips = SkipLog()
    for r in results:
        skips.merge(r.skips)
    result = TaskResult(
        task=task,
        shards=writer.shards,
        input_docs={r.path: r.docs for r in results},
        docs=sum(r.docs for r in results),
        tokens=tokens,
        text_bytes=sum(r.text_bytes for r in results),
        shard_size=size,
        skipped=skips.to_dict(),
        seconds_tokenize=t1 - t0,
        seconds_write=t2 - t1,
    )
    out.write_text(json.dumps(result.to_dict(), ensure_ascii=False) + "\n", *part_path(task))
    return result


# ---------------------------------------------------------------------------------------- the manifest
def read_parts(config: BuildConfig) -> list[TaskResult]:
    """Every task's part manifest, in task order; a missing one is an error naming the task."""
    out = Output(config.out)
    parts = []
    for task in range(config.tasks):
        if not out.exists(*part_path(task)):
            raise UserError(
                f"{config.out}: task {task} of {config.tasks} has not finished (no {'/'.join(part_path(task))})",
                "see its log under .build/, then run the same command again: finished tasks are kept",
            )
        parts.append(TaskResult.from_dict(json.loads(out.read_text(*part_path(task)))))
    return parts


def merge_manifest(config: BuildConfig) -> Manifest:
    """Merge the tasks' part manifests into ``manifest.json`` (shards in task order)."""
    parts = read_parts(config)
    shards = [s for p in parts for s in p.shards]
    skips = SkipLog()
    for p in parts:
        skips.merge(SkipLog.from_dict(p.skipped))
    per_domain: dict[str, dict[str, int]] = {}
    for shard in shards:
        for name, c in shard.domains.items():
            d = per_domain.setdefault(name, {"docs": 0, "tokens": 0})
            d["docs"] += c["docs"]
            d["tokens"] += c["tokens"]
    per_domain = dict(sorted(per_domain.items()))
    input_docs = {f.path: 0 for f in config.files}
    for p in parts:
        input_docs.update(p.input_docs)
    sizes = {p.shard_size for p in parts}
    manifest = Manifest(
        vocab_size=config.vocab_size,
        eos_id=config.eos_id,
        pad_id=config.pad_id,
        domains={name: i for i, name in enumerate(per_domain)},
        per_domain=per_domain,
        shards=shards,
        tokenizer=config.tokenizer,
        token_dtype=config.dtype.name,
        skipped=skips.to_dict(),
        totals={
            "docs": sum(p.docs for p in parts),
            "tokens": sum(p.tokens for p in parts),
            "text_bytes": sum(p.text_bytes for p in parts),
            "shards": len(shards),
        },
        build={
            "inputs": [f.path for f in config.files],
            "input_docs": input_docs,
            "shard_size": sizes.pop() if len(sizes) == 1 else "auto",
            "seed": config.seed,
            "on_error": config.on_error,
            "workers": config.workers,
            "tasks": config.tasks,
            "executor": config.executor,
            "fields": config.fields.to_dict(),
        },
    )
    Output(config.out).write_text(
        json.dumps(manifest.to_dict(), indent=1, ensure_ascii=False) + "\n", MANIFEST_NAME
    )
    return manifest
