"""``TokenThroughputMonitor``: the dense-peak table, and MFU in TensorBoard when a peak is known (real runs)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from emo_lightning.callbacks import TokenThroughputMonitor
from emo_lightning.callbacks.throughput import dense_peak_flops

FLOPS_PER_BATCH = 1e9


@pytest.mark.parametrize(
    ("name", "dtype", "peak"),
    [  # "NVIDIA H200" is what torch reports on an H200 SXM: Lightning's table has no entry for it
        ("NVIDIA H200", torch.bfloat16, 989.4e12),
        ("NVIDIA H200 NVL", torch.bfloat16, 835.5e12),
        ("NVIDIA H100 80GB HBM3", torch.float16, 989.4e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.5e12),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
        ("NVIDIA H200", torch.float32, None),  # fp32 / tf32: left to Lightning's table
        ("Tesla T4", torch.float16, None),
    ],
)
def test_dense_peak_flops(name: str, dtype: torch.dtype, peak: float | None) -> None:
    assert dense_peak_flops(name, dtype) == peak


class Tiny(L.LightningModule):
    """One linear layer over token batches; declares its FLOPs per batch like ``EMOLitModule``."""

    flops_per_batch = FLOPS_PER_BATCH

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.lin(batch["input_ids"].float()).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp: Path, monitor: TokenThroughputMonitor) -> dict[str, list[float]]:
    """Six steps on CPU; the TensorBoard scalars written, by tag."""
    batches = [{"input_ids": torch.randint(0, 10, (4, 8))} for _ in range(6)]
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=TensorBoardLogger(tmp, name="tb"),
        callbacks=[monitor],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), DataLoader(batches, batch_size=None))
    acc = EventAccumulator(str(Path(trainer.logger.log_dir))).Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_mfu_logged_with_a_given_peak(tmp_path: Path) -> None:
    scalars = fit(tmp_path, TokenThroughputMonitor(window_size=2, peak_flops=1e12))
    assert "train/device/items_per_sec" in scalars  # tokens/s (length_fn), under Lightning's name
    mfu, flops = scalars["train/device/mfu"], scalars["train/device/flops_per_sec"]
    assert len(mfu) >= 3 and all(m > 0 for m in mfu)
    for m, f in zip(mfu, flops, strict=True):
        assert m == pytest.approx(f / 1e12, rel=1e-5)


def test_no_mfu_without_a_known_peak(tmp_path: Path) -> None:
    """CPU: no peak in any table, none given -> tokens/s only (Lightning's behaviour, unchanged)."""
    scalars = fit(tmp_path, TokenThroughputMonitor(window_size=2))
    assert "train/device/flops_per_sec" in scalars
    assert "train/device/mfu" not in scalars
