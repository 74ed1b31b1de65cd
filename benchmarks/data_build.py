"""Shard build throughput: tokens/s per process against a plain ``tokenizers`` batch encode, and 1 -> 2 processes.

Input: the bundled training corpus (``data/corpus/train``, 6.5M tokens; ``--quick``: 160 validation documents),
shuffled and cut into 8 plain JSON Lines files of equal size (so two tasks get equal work). Three variants are
timed side by side, round-robin (``benchmarks.timing.measure``), each with one tokenizer thread per process
(``TOKENIZERS_PARALLELISM=false``):

* ``encode``: ``Tokenizer.encode_batch_fast`` (``encode_batch`` without character offsets, the same ids; the
  faster of the two) over the texts already in memory, batches of 256 (the ceiling: no reading, no JSON, no
  validation, no shards);
* ``build_1``: ``emo-data build-shards`` as 1 task in 1 process (datatrove's local executor), from the files to
  the shards and the manifest;
* ``build_2``: the same as 2 tasks in 2 processes.

Targets: ``build_1`` reaches >= 0.8x the tokens/s of ``encode``; ``build_2`` >= 1.8x ``build_1``. Run alone:
``python -m benchmarks.data_build [--quick]``.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.timing import Row, measure
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


def run(quick: bool = False, dev: torch.device | None = None) -> tuple[list[Row], dict]:
    with tempfile.TemporaryDirectory(prefix="bench-data-build-") as tmp, one_tokenizer_thread():
        files, texts = prepare(Path(tmp), quick)
        tokenizer = load_tokenizer(TOKENIZER)

        def encode() -> int:
            n = 0
            for i in range(0, len(texts), 256):
                batch = tokenizer.encode_batch_fast(texts[i : i + 256], add_special_tokens=False)
                n += sum(len(e.ids) for e in batch)
            return n

        results = {}

        def build(tasks: int):
            def fn() -> None:
                out = Path(tmp) / f"shards-{tasks}"
                results[tasks] = build_shards(
                    files, TOKENIZER, out, tasks=tasks, workers=tasks, overwrite=True, quiet=True
                )

            return fn

        timings = measure(
            {"encode": encode, "build_1": build(1), "build_2": build(2)},
            warmup=1,
            repeats=2 if quick else 5,
            dev=torch.device("cpu"),
        )
        content_tokens = encode()
        m = results[1].manifest
        assert m.totals["tokens"] - m.totals["docs"] == content_tokens  # the same tokens, EOS aside
        assert results[2].manifest.per_domain == m.per_domain  # 2 tasks: the same documents and tokens

    rate = {k: content_tokens / timings.stats(k).median for k in timings.times}
    per_process = rate["build_1"] / rate["encode"]
    scaling = rate["build_2"] / rate["build_1"]
    ratio_proc = timings.ratio("encode", "build_1")  # time_encode / time_build = build rate / encode rate
    ratio_scale = timings.ratio("build_1", "build_2")
    tasks_2 = results[2].task_results
    details = {
        "tokens": content_tokens,
        "documents": m.totals["docs"],
        "text_MB": round(m.totals["text_bytes"] / 1e6, 2),
        "tokens_per_s": {k: round(v) for k, v in rate.items()},
        "per_process_ratio": round(per_process, 3),
        "scaling_1_to_2": round(scaling, 3),
        "build_2_task_tokens_per_s": [
            round(t.tokens / (t.seconds_tokenize + t.seconds_write)) for t in tasks_2
        ],
        "build_1_seconds": {
            "tokenize": round(results[1].seconds_tokenize, 2),
            "write": round(results[1].seconds_write, 2),
        },
        "timings": timings.to_dict(),
        "cpus": os.cpu_count(),
    }
    rows = [
        Row(
            "data_build",
            "build (1 process) / tokenizers encode_batch_fast, tokens/s",
            ratio_proc,
            target=">= 0.8",
            met=ratio_proc.median >= 0.8,
            note=f"build {rate['build_1']:,.0f} tok/s, encode {rate['encode']:,.0f} tok/s (1 thread each)",
        ),
        Row(
            "data_build",
            "build 2 processes / 1 process, tokens/s",
            ratio_scale,
            target=">= 1.8",
            met=ratio_scale.median >= 1.8 if (os.cpu_count() or 1) >= 2 else None,
            note=f"2 tasks on 2 processes {rate['build_2']:,.0f} tok/s; {os.cpu_count()} logical CPUs",
        ),
    ]
    return rows, details


if __name__ == "__main__":
    table, info = run(quick="--quick" in sys.argv)
    for row in table:
        print(" | ".join(c for c in row.cells() if c))
    print(json.dumps({k: v for k, v in info.items() if k != "timings"}, indent=1))
