"""Tokens/s (and MFU where the device's peak FLOPs are known) via Lightning's own ThroughputMonitor.

Lightning's peak table (``get_available_flops``) misses the plain "NVIDIA H200" name (it only parses "sxm1" /
"nvl1" suffixes, so an H200 logs no MFU) and lists sparse-matrix rates for some parts. ``DENSE_PEAK_FLOPS``
gives the dense bf16/fp16 tensor-core peaks of the GPUs this project trains on; ``peak_flops`` overrides both
(e.g. a measured matmul rate from ``make gpu-check``).
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

# Dense (no 2:4 sparsity) bf16/fp16 tensor-core FLOP/s per GPU, vendors' datasheets. Matched in order against
# the lower-cased device name: the more specific names first.
DENSE_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("h200 nvl", 835.5e12),
    ("h200", 989.4e12),  # H200 SXM (torch names it "NVIDIA H200"); GH200 has the same tensor cores
    ("h100 nvl", 835.5e12),
    ("h100 pcie", 756.5e12),
    ("h100", 989.4e12),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("a100", 312e12),
)


def dense_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """Dense bf16/fp16 peak FLOP/s of a GPU from its name; None for other dtypes or unlisted GPUs."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    name = device_name.lower()
    return next((peak for key, peak in DENSE_PEAK_FLOPS if key in name), None)


def batch_rows(batch: dict[str, Any]) -> int:
    """Number of packed sequences in a batch."""
    return int(batch["input_ids"].shape[0])


def batch_tokens(batch: dict[str, Any]) -> int:
    """Number of tokens in a batch (padding included: it costs compute like any token)."""
    return int(batch["input_ids"].numel())


class TokenThroughputMonitor(ThroughputMonitor):
    """Logs tokens/s (``train/device/items_per_sec``; ``train/throughput/...`` for the whole job on several
    devices), samples/s, FLOP/s and, when the device's peak is known, ``train/device/mfu``.

    FLOPs per batch come from the LightningModule's ``flops_per_batch`` (analytic, from the model config).
    The peak is ``peak_flops`` if given, else ``dense_peak_flops`` of the CUDA device, else Lightning's table.
    """

    def __init__(self, window_size: int = 50, peak_flops: float | None = None) -> None:
        super().__init__(batch_size_fn=batch_rows, length_fn=batch_tokens, window_size=window_size)
        self.peak_flops = peak_flops

    def device_peak(self, trainer: L.Trainer) -> float | None:
        """The peak FLOP/s this run's MFU is relative to (None: Lightning's table decides)."""
        if self.peak_flops:
            return float(self.peak_flops)
        device = trainer.strategy.root_device
        if device.type != "cuda":
            return None
        return dense_peak_flops(
            torch.cuda.get_device_name(device), _plugin_to_compute_dtype(trainer.precision_plugin)
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        peak = self.device_peak(trainer)
        with warnings.catch_warnings():
            if peak is not None:  # Lightning's "FLOPs not found for ..." is moot: ours is known
                warnings.filterwarnings("ignore", message=".*FLOPs not found")
                warnings.filterwarnings("ignore", message=".*does not support")
            super().setup(trainer, pl_module, stage)
        if peak is not None:
            self.available_flops = int(peak)
            for throughput in self._throughputs.values():
                throughput.available_flops = peak
