"""Tokens/s (and MFU where the device's peak FLOPs are known) via Lightning's own ThroughputMonitor."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor


def batch_rows(batch: dict[str, Any]) -> int:
    """Number of packed sequences in a batch."""
    return int(batch["input_ids"].shape[0])


def batch_tokens(batch: dict[str, Any]) -> int:
    """Number of tokens in a batch (padding included: it costs compute like any token)."""
    return int(batch["input_ids"].numel())


class TokenThroughputMonitor(ThroughputMonitor):
    """Logs ``train|throughput/tokens_per_sec``, samples/s and, on GPUs with known peak FLOPs, MFU.

    FLOPs per batch come from the LightningModule's ``flops_per_batch`` (analytic, from the model config).
    """

    def __init__(self, window_size: int = 50) -> None:
        super().__init__(batch_size_fn=batch_rows, length_fn=batch_tokens, window_size=window_size)
