"""Run under ``torchrun --nproc_per_node W``: what one rank's construction and weight loading cost in memory.

``python memory_worker.py OUT CONSOLIDATED``. Every rank builds its rank-local model of :data:`CFG` (routed
experts of ~1.2 GB in fp32) with ``ep_size = W``, measuring its resident set (``/proc/self/status``: VmRSS, and
VmHWM reset just before, the peak during construction) and the time; then it loads the one-file checkpoint
CONSOLIDATED (memory-mapped) with ``load_local_weights`` and measures the peak resident growth while the file
is mapped (its pages count once touched). Every rank writes
``OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from emo_lightning.checkpoint.deepspeed import load_local_weights
from emo_lightning.model import ArchConfig, ModelConfig, RouterConfig
from emo_lightning.parallel import build_expert_parallel_model

MB = 2**20
# 2 layers x 23 routable experts of 3 x 1024 x 2048 parameters: 289M parameters, 1.16 GB in fp32; little else
CFG = ModelConfig(
    arch=ArchConfig(vocab_size=256, d_model=1024, n_layers=2, n_heads=8, expert_hidden=2048, max_seq_len=64),
    router=RouterConfig(kind="emo", num_experts=24, num_shared=1, top_k=3),
)


def status() -> dict[str, int]:
    """VmRSS, VmHWM (peak since the last reset), RssAnon, RssFile in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def main(out: str, consolidated: str) -> None:
    deepspeed.init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    dist.barrier()
    before = status()
    reset_peak()
    t0 = time.perf_counter()
    model = build_expert_parallel_model(CFG, ep_size=world)
    seconds = time.perf_counter() - t0
    built = status()
    summary = model.parameter_summary()
    finite = bool(all(torch.isfinite(p).all() for p in model.parameters()))
    dist.barrier()
    reset_peak()
    load_local_weights(model, consolidated)  # the mapped file's touched pages count while it is mapped: peak
    loaded = status()
    result = {
        "construction_seconds": seconds,
        "construction_growth": built["VmRSS"] - before["VmRSS"],
        "construction_peak_growth": built["VmHWM"] - before["VmRSS"],
        "load_peak_growth": loaded["VmHWM"] - built["VmRSS"],
        "model_bytes": summary.bytes,
        "routed": summary.routed,
        "line": summary.line(rank, world),
        "finite": finite,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
