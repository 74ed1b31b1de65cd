"""Shard build throughput: tokens/s per process against a plain ``tokenizers`` batch encode, and 1 -> 2 processes.

Input: the bundled training corpus (``data/corpus/train``, 6.5M tokens; ``--quick``: 160 validation documents),
shuffled and cut into 8 plain JSON Lines files of equal size (so two tasks get equal work). Four variants are
timed side by side, round-robin with a rotating start, by wall time and by CPU time (this process: the one-process
variants), each with one tokenizer thread per process (``TOKENIZERS_PARALLELISM=false``):

* ``encode``: ``Tokenizer.encode_batch_fast`` (``encode_batch`` without character offsets, the same ids; the
  faster of the two) over the texts already in memory, batches of 256 (the ceiling: no reading, no JSON, no
  validation, no shards); ``encode_2``: the same in 2 processes started by a fork server (as the build's
  workers are), half the texts each;
* ``build_1``: ``emo-data build-shards`` as 1 task in 1 process (datatrove's local executor), from the files to
  the shards and the manifest; ``build_2``: the same as 2 tasks in 2 processes.

Targets: ``build_1`` >= 0.8x the tokens per CPU-second of ``encode`` (CPU time keeps the paired ratio meaningful
on a machine shared with other jobs; the wall ratio is in the note); ``build_2`` >= 1.8x ``build_1`` in wall time,
which needs 2 idle CPUs (under load the row says "contended" and shows no verdict); and, measurable anywhere,
the build's 1 -> 2 speed-up >= 0.9x the plain encode's 1 -> 2 speed-up measured beside it (what the machine
allows). Run alone: ``python -m benchmarks.data_build [--quick]``.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.timing import Row, Timings, loadavg
from data_tools.build import build_shards
from data_tools.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "tokenizer.json"
PARTS = 8


@contextmanager
def one_tokenizer_thread():
    """``TOKENIZERS_PARALLELISM=false`` for the block (forked task processes inherit it)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def prepare(folder: Path, quick: bool) -> tuple[list[Path], list[str]]:
    """The benchmark's input files (8 parts, shuffled documents) and their texts."""
    split, per_file = ("val", 40) if quick else ("train", None)
    records = []
    for path in sorted((REPO / "data" / "corpus" / split).glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            records += [json.loads(line) for i, line in enumerate(f) if per_file is None or i < per_file]
    random.Random(0).shuffle(records)
    files = []
    for part in range(PARTS):
        path = folder / f"part-{part}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records[part::PARTS]), encoding="utf-8")
        files.append(path)
    return files, [r["text"] for r in records]


def encode_texts(texts: list[str]) -> int:
    """Token ids of ``texts`` by ``encode_batch_fast`` in batches of 256 (the plain baseline); returns their count."""
    tokenizer = load_tokenizer(TOKENIZER)
    n = 0
    for i in range(0, len(texts), 256):
        n += sum(
            len(e.ids) for e in tokenizer.encode_batch_fast(texts[i : i + 256], add_special_tokens=False)
        )
    return n


def encode_in_processes(texts: list[str], processes: int) -> None:
    """The plain baseline in ``processes`` processes, each with its share of the texts, started like the build's
    (a fork server: the same start-up cost on both sides of the 1 -> 2 comparison)."""
    ctx = multiprocessing.get_context("forkserver")
    procs = [ctx.Process(target=encode_texts, args=(texts[i::processes],)) for i in range(processes)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
        if proc.exitcode:
            raise RuntimeError(f"an encoding process failed (exit code {proc.exitcode})")


def clocks() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its finished children)."""
    t = os.times()
    return time.perf_counter(), t.user + t.system + t.children_user + t.children_system


def measure_both(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, Timings]:
    """Wall and CPU times of every variant, round-robin with a rotating start (as ``benchmarks.timing``)."""
    names = list(fns)
    times: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    for r in range(warmup + repeats):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            w0, c0 = clocks()
            fns[name]()
            w1, c1 = clocks()
            if r >= warmup:
                times["wall"][name].append(w1 - w0)
                times["cpu"][name].append(c1 - c0)
    return {clock: Timings(t) for clock, t in times.items()}


def run(quick: bool = False, dev: torch.device | None = None) -> tuple[list[Row], dict]:
    load = loadavg()
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-data-build-") as tmp, one_tokenizer_thread():
        files, texts = prepare(Path(tmp), quick)
        results = {}

        def build(tasks: int, workers: int) -> Callable[[], None]:
            def fn() -> None:
                out = Path(tmp) / f"shards-{tasks}"
                results[tasks] = build_shards(
                    files, TOKENIZER, out, tasks=tasks, workers=workers, overwrite=True, quiet=True
                )

            return fn

        variants = {"encode": lambda: encode_texts(texts), "build_1": build(1, 1)}
        if quick:  # a smoke run: 2 tasks one after the other in this process (no worker start-up to wait for)
            build(2, 1)()
        else:
            variants.update(encode_2=lambda: encode_in_processes(texts, 2), build_2=build(2, 2))
        timings = measure_both(variants, warmup=0 if quick else 1, repeats=1 if quick else 4)
        content_tokens = encode_texts(texts)
        m = results[1].manifest
        assert m.totals["tokens"] - m.totals["docs"] == content_tokens  # the same tokens, EOS aside
        assert results[2].manifest.per_domain == m.per_domain  # 2 tasks: the same documents and tokens

    wall, cpu = timings["wall"], timings["cpu"]
    rate = {k: content_tokens / wall.stats(k).median for k in wall.times}
    cpu_rate = {k: content_tokens / cpu.stats(k).median for k in ("encode", "build_1")}  # one process
    per_process = cpu.ratio("encode", "build_1")  # CPU time encode / build = build rate / encode rate
    task_tokens = [t.tokens for t in results[2].task_results]
    balance = max(task_tokens) / (sum(task_tokens) / len(task_tokens))
    details = {
        "tokens": content_tokens,
        "documents": m.totals["docs"],
        "text_MB": round(m.totals["text_bytes"] / 1e6, 2),
        "tokens_per_s_wall": {k: round(v) for k, v in rate.items()},
        "tokens_per_cpu_s": {k: round(v) for k, v in cpu_rate.items()},
        "per_process_ratio_cpu": per_process.to_dict(),
        "per_process_ratio_wall": wall.ratio("encode", "build_1").to_dict(),
        "task_balance_max_over_mean": round(balance, 4),
        "load_at_start": load,
        "build_1_seconds": {
            "tokenize": round(results[1].seconds_tokenize, 2),
            "write": round(results[1].seconds_write, 2),
        },
        "timings": {clock: t.to_dict() for clock, t in timings.items()},
        "cpus": cpus,
    }
    rows = [
        Row(
            "data_build",
            "build (1 process) / tokenizers encode_batch_fast, tokens per CPU-s",
            per_process,
            target=">= 0.8",
            met=per_process.median >= 0.8,
            note=f"build {cpu_rate['build_1']:,.0f}, encode {cpu_rate['encode']:,.0f} tok per CPU-s (1 thread each); "
            f"wall {wall.ratio('encode', 'build_1')}",
        )
    ]
    if quick:
        rows.append(Row("data_build", "build 2 processes / 1 process", None, note="--quick: not measured"))
        return rows, details
    scaling = wall.ratio("build_1", "build_2")
    plain_scaling = wall.ratio("encode", "encode_2")
    relative = Timings(
        {
            "build": [a / b for a, b in zip(wall.times["build_2"], wall.times["build_1"], strict=True)],
            "encode": [a / b for a, b in zip(wall.times["encode_2"], wall.times["encode"], strict=True)],
        }
    ).ratio("encode", "build")  # per round (te2/te1) / (tb2/tb1): build's 1->2 speed-up / encode's
    contended = load and load[0] > cpus - 1.5  # fewer than 2 idle CPUs: the wall scaling is not measurable
    where = f"load {load[0]:.1f} on {cpus} CPUs" if load else f"{cpus} CPUs"
    details.update(
        scaling_1_to_2_wall=scaling.to_dict(),
        plain_encode_scaling_1_to_2_wall=plain_scaling.to_dict(),
        scaling_relative_to_plain_encode=relative.to_dict(),
    )
    rows += [
        Row(
            "data_build",
            "build 2 processes / 1 process, tokens/s (wall)",
            scaling,
            target=">= 1.8",
            met=None if contended or cpus < 2 else scaling.median >= 1.8,
            note=(f"contended: {where}; " if contended else f"{where}; ")
            + f"2 tasks {rate['build_2']:,.0f} tok/s, 1 task {rate['build_1']:,.0f} tok/s; "
            f"plain encode in 2 processes / 1: {plain_scaling}",
        ),
        Row(
            "data_build",
            "build 1->2 speed-up / plain encode 1->2 speed-up (wall)",
            relative,
            target=">= 0.9",
            met=relative.median >= 0.9,
            note=f"what the machine allows, side by side; tasks' tokens max/mean {balance:.3f}",
        ),
    ]
    return rows, details


if __name__ == "__main__":
    table, info = run(quick="--quick" in sys.argv)
    for row in table:
        print(" | ".join(c for c in row.cells() if c))
    print(json.dumps({k: v for k, v in info.items() if k != "timings"}, indent=1))
