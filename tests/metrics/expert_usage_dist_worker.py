"""One rank of the 2-process gloo test of ``ExpertUsage`` (``run_gloo`` in test_expert_usage.py)."""

from __future__ import annotations

from typing import Any

from torchmetrics.utilities.distributed import gather_all_tensors

from emo_lightning.metrics import ExpertUsage


def run(rank: int, world: int, payload: dict[str, Any]) -> dict[str, Any]:
    """Every rank updates with its micro-batches and computes (a collective), with both sync functions."""
    fast = ExpertUsage(*payload["shape"])  # default: one all_reduce per state
    gather = ExpertUsage(*payload["shape"], dist_sync_fn=gather_all_tensors)  # torchmetrics' default
    for update in payload["updates"][rank::world]:  # this rank's micro-batches
        fast.update(**update)
        gather.update(**update)
    local = fast.counts.clone()
    results = {"fast": fast.compute(), "gather": gather.compute()}
    results["local_after"] = fast.counts.clone()  # states are unsynced again after compute
    results["local"] = local
    return results
