"""Data loader throughput vs the training step's consumption (target: the loader >= 20x faster).

The loader is ``ShardDataModule`` on the bundled shards (``make data``) at the tiny default's batch shape
(16 x 256), with 0 and 1 workers (``conf/data/bundled.yaml`` trains with 1). Consumption is the EMO training
step's tokens/s measured by ``train_step`` in the same run (or measured here, briefly, when run alone).
Shard building throughput stays in ``benchmarks/data_throughput.py`` (an offline step).
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.timing import Row, num_threads
from benchmarks.train_step import REPO, build_model, load_batches, make_step, tiny_presets


def loader_tokens_per_s(workers: int, batches: int, rounds: int) -> tuple[list[float], float]:
    """Tokens/s of ``rounds`` consecutive spans of ``batches`` batches each, and the first-batch latency."""
    from emo_lightning.data import ShardDataModule

    data = tiny_presets()["emo"].data
    b, s = data["batch_size"], data["seq_len"]
    dm = ShardDataModule(
        str(REPO / data["train_shards"]),
        seq_len=s,
        batch_size=b,
        num_workers=workers,
        shuffle_buffer=data["shuffle_buffer"],
    )
    dm.setup("fit")
    t0 = time.perf_counter()
    it = iter(dm.train_dataloader())
    next(it)
    first = time.perf_counter() - t0
    rates = []
    for _ in range(rounds):
        t1 = time.perf_counter()
        for _ in range(batches):
            next(it)
        rates.append(batches * b * s / (time.perf_counter() - t1))
    del it
    return rates, first


def step_tokens_per_s(dev: torch.device) -> float:
    """A short measurement of the EMO tiny training step (when ``train_step`` did not run)."""
    preset = tiny_presets()["emo"]
    data = preset.data
    batches, _ = load_batches(data, 4, dev)
    step = make_step(build_model(preset.model, False, dev), preset, batches)
    with num_threads(1):
        step()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return data["batch_size"] * data["seq_len"] / statistics.median(times)


def run(
    quick: bool = False, dev: torch.device | None = None, consumption: float | None = None
) -> tuple[list[Row], dict]:
    dev = dev or torch.device("cpu")
    data = tiny_presets()["emo"].data
    if not (REPO / data["train_shards"] / "manifest.json").exists():
        return [
            Row(
                "data_loader",
                "loader / training step",
                None,
                target=">= 20",
                note="no shards: run `make data`",
            )
        ], {"skipped": "no data/shards/train"}
    source = "train_step (EMO, 1 thread)"
    if consumption is None:
        consumption, source = step_tokens_per_s(dev), "measured here (EMO, 1 thread, 3 steps)"
    batches, rounds = (3, 1) if quick else (100, 5)
    details: dict = {
        "consumption_tokens_per_s": round(consumption),
        "consumption_source": source,
        "loader": {},
    }
    rows: list[Row] = []
    for workers in (0, 1):
        with num_threads(1):
            rates, first = loader_tokens_per_s(workers, batches, rounds)
        med = statistics.median(rates)
        details["loader"][workers] = {
            "tokens_per_s": [round(r) for r in rates],
            "median": round(med),
            "first_batch_s": round(first, 3),
        }
        ratio = med / consumption
        rows.append(
            Row(
                "data_loader",
                f"loader ({workers} workers) / training step",
                ratio,
                target=">= 20",
                met=ratio >= 20,
                note=f"loader {med:,.0f} tok/s (range {min(rates):,.0f}-{max(rates):,.0f}), step {consumption:,.0f} tok/s",
            )
        )
    return rows, details
