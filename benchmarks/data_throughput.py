"""Data pipeline throughput: shard building (1 and 2 workers) and the packed loader (S=1024, B=8).

Run: ``.venv/bin/python -m benchmarks.data_throughput [--corpus data/corpus/train] [--batches 150]``.
Writes ``benchmarks/results/data_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from data_tools.build import build_shards
from emo_lightning.data import ShardDataModule

REPO = Path(__file__).resolve().parents[1]


def bench_build(inputs: list[Path], tokenizer: Path, out: Path, workers: int) -> dict[str, float]:
    t0 = time.perf_counter()
    result = build_shards(inputs, tokenizer, out, workers=workers, quiet=True, overwrite=True)
    seconds = time.perf_counter() - t0
    return {
        "workers": workers,
        "seconds": round(seconds, 2),
        "seconds_tokenize": round(result.seconds_tokenize, 2),
        "seconds_write": round(result.seconds_write, 2),
        "text_MB": round(result.text_bytes / 1e6, 2),
        "tokens": result.tokens,
        "text_MB_per_s": round(result.text_bytes / 1e6 / seconds, 2),
        "tokens_per_s": round(result.tokens / seconds),
    }


def bench_loader(shards: Path, workers: int, batches: int, seq_len: int = 1024, batch_size: int = 8) -> dict:
    dm = ShardDataModule(
        str(shards), seq_len=seq_len, batch_size=batch_size, num_workers=workers, shuffle_buffer=1000
    )
    dm.setup("fit")
    t0 = time.perf_counter()
    it = iter(dm.train_dataloader())
    next(it)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - t1
    del it
    return {
        "workers": workers,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "first_batch_s": round(first, 3),
        "tokens_per_s": round(batches * seq_len * batch_size / seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", default=str(REPO / "data" / "corpus" / "train"))
    parser.add_argument("--tokenizer", default=str(REPO / "data" / "tokenizer.json"))
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_throughput.json"))
    args = parser.parse_args()
    inputs = sorted(Path(args.corpus).glob("*.jsonl*"))
    results: dict[str, list] = {"build": [], "loader": []}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            results["build"].append(bench_build(inputs, Path(args.tokenizer), Path(tmp) / "shards", workers))
            print("build ", results["build"][-1], flush=True)
        for workers in (0, 1, 2):
            results["loader"].append(bench_loader(Path(tmp) / "shards", workers, args.batches))
            print("loader", results["loader"][-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
