"""The harness of the distributed tests: a function run in real processes joined in one gloo process group."""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Worker = Callable[[int, int, Any], Any]
ROOT = Path(__file__).resolve().parents[1]


def run_gloo(worker: Worker, payload: Any, tmp_path: Path, world: int = 2, timeout: float = 120) -> Any:
    """``worker(rank, world, payload)`` in ``world`` spawned processes of one gloo group (one thread each);
    returns what rank 0 returned. ``worker`` must be a module-level function of a module the spawned processes
    can import (e.g. ``tests.model.dist_worker``); ``payload`` and the result travel through ``torch.save``."""
    # spawned processes start with this process's sys.path: the clone's root lets them import ``tests.*``
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    payload_path, out_path = tmp_path / "gloo_payload.pt", tmp_path / "gloo_result.pt"
    torch.save(payload, payload_path)
    args = (world, str(tmp_path / "gloo_init"), worker, str(payload_path), str(out_path))
    ctx = mp.spawn(_process, args=args, nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"gloo workers did not finish in {timeout:.0f} s")
    return torch.load(out_path, weights_only=False)


def _process(rank: int, world: int, init_file: str, worker: Worker, payload_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = worker(rank, world, torch.load(payload_path, weights_only=False))
        if rank == 0:
            torch.save(result, out_path)
        # every rank done with its collectives, and no object (a model's group attribute in a reference cycle)
        # keeps the group alive past destroy: otherwise gloo's threads can be torn down at interpreter exit and
        # abort the process ("terminate called without an active exception"; seen once in CI under load)
        del result
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
