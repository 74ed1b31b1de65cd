"""Worker of the 2-process gloo test of ``ExpertUsage`` (imported by test_expert_usage.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torchmetrics.utilities.distributed import gather_all_tensors

from emo_lightning.metrics import ExpertUsage


def run(rank: int, world: int, init_file: str, payload_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        payload = torch.load(payload_path, weights_only=False)
        fast = ExpertUsage(*payload["shape"])  # default: one all_reduce per state
        gather = ExpertUsage(*payload["shape"], dist_sync_fn=gather_all_tensors)  # torchmetrics' default
        for update in payload["updates"][rank::world]:  # this rank's micro-batches
            fast.update(**update)
            gather.update(**update)
        local = fast.counts.clone()
        results = {"fast": fast.compute(), "gather": gather.compute()}  # every rank computes (collective)
        results["local_after"] = fast.counts.clone()  # states are unsynced again after compute
        results["local"] = local
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()
