"""``ExpertUsageMonitor`` in real short runs: TensorBoard tags read back, EMO vs standard, collapse warnings."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from emo_lightning.callbacks import ExpertUsageMonitor, RoutingCollapseWarning
from emo_lightning.data import ShardDataModule
from tests.factories import tiny_lit_module

N_LAYERS, ROUTED, K = 2, 7, 2


class CountingMonitor(ExpertUsageMonitor):
    """Records the window's total count before each log, and the valid tokens it was fed."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.window_totals: list[int] = []
        self.fed_tokens = 0
        self.seen_domains: set[int] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.fed_tokens += int((batch["domain_ids"] >= 0).sum())
        self.seen_domains |= set(batch["domain_ids"].unique().tolist()) - {-1}
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _log_window(self, trainer, step: int) -> None:
        self.window_totals.append(int(self.metric.counts.sum()))
        super()._log_window(trainer, step)


def run(
    tmp: Path, shards: dict[str, Path], kind: str, **monitor
) -> tuple[CountingMonitor, EventAccumulator, list]:
    L.seed_everything(0)
    module = tiny_lit_module(kind)
    data = ShardDataModule(
        train_shards=str(shards["train"]), seq_len=64, batch_size=4, num_workers=0, shuffle_buffer=50, seed=3
    )
    monitor = CountingMonitor(**{"log_every_n_steps": 2, "image_every_n_steps": 2, **monitor})
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, accumulate_grad_batches=2, logger=TensorBoardLogger(tmp, name=kind),
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[monitor],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert module.collect_routes is False and module.last_routing is None  # switched off after fit
    (event_file,) = Path(trainer.logger.log_dir).glob("events.out.tfevents.*")
    acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    return monitor, acc, [data.domains[d] for d in sorted(monitor.seen_domains)]


def expected_scalar_tags(domains: list[str]) -> set[str]:
    layers = [f"layer{i}" for i in range(N_LAYERS)]
    names = [f"usage/{n}" for n in ("imbalance", "cv", "dead_fraction", "entropy", "pool_size", "lb", "z")]
    names += [
        f"modularity/{n}" for n in ("nmi", "jaccard_within", "jaccard_across", "experts50", "experts90")
    ]
    tags = {f"{n}/{sfx}" for n in names for sfx in layers} | set(names) | {"usage/collapse_streak"}
    return tags | {f"modularity/experts{p}/{d}" for p in (50, 90) for d in domains}


def test_emo_run_logs_scalars_images_histograms_and_warns_on_collapse(tmp_path: Path, tiny_shards) -> None:
    # imbalance is always > 1.0: a collapse on every window, warned after 2 windows in a row
    with pytest.warns(RoutingCollapseWarning, match="routing collapse for 2 windows"):
        monitor, acc, domains = run(tmp_path, tiny_shards, "emo", collapse_imbalance=1.0, collapse_windows=2)
    assert (
        len(domains) >= 2
    )  # per-domain tags exist for every domain seen (a domain without tokens is skipped)
    tags = acc.Tags()
    missing = expected_scalar_tags(domains) - set(tags["scalars"])
    assert not missing, sorted(missing)
    assert [e.step for e in acc.Scalars("usage/imbalance")] == [2, 4]
    assert {"experts/heatmap/layer0", "experts/heatmap/layer1", "experts/summary"} <= set(tags["images"])
    image = acc.Images("experts/summary")[0]
    assert image.width > 100 and image.height > 100 and image.encoded_image_string[:4] == b"\x89PNG"
    assert {"experts/load/layer0", "experts/load/layer1"} <= set(tags["histograms"])
    assert [e.value for e in acc.Scalars("usage/collapse_streak")] == [1.0, 2.0]
    assert "usage/collapse/text_summary" in tags["tensors"]  # the warning, as TensorBoard text
    # every micro-batch (2 per step) is counted: k' slots per valid token and layer, over both windows
    assert sum(monitor.window_totals) == monitor.fed_tokens * K * N_LAYERS
    for name in ("imbalance", "entropy", "nmi", "pool_size", "jaccard_within", "jaccard_across"):
        for e in acc.Scalars(
            f"usage/{name}" if name in ("imbalance", "entropy", "pool_size") else f"modularity/{name}"
        ):
            assert torch.isfinite(torch.tensor(e.value)), name
    assert 1.0 <= acc.Scalars("usage/imbalance")[0].value <= ROUTED / K
    assert 2.0 <= acc.Scalars("usage/pool_size")[0].value <= ROUTED


def test_standard_run_logs_the_same_tags(tmp_path: Path, tiny_shards) -> None:
    _, acc, domains = run(tmp_path, tiny_shards, "standard", image_every_n_steps=100)
    # the first window draws the heatmaps, long before image_every_n_steps: a new run shows them at once
    assert [e.step for e in acc.Images("experts/heatmap/layer0")] == [2]
    assert expected_scalar_tags(domains) <= set(acc.Tags()["scalars"])
    assert all(e.value == ROUTED for e in acc.Scalars("usage/pool_size"))  # no pools: every expert
    assert all(e.value == 1.0 for e in acc.Scalars("modularity/jaccard_across"))
    assert all(e.value == 0.0 for e in acc.Scalars("usage/collapse_streak"))


def test_collapse_streak_warns_every_n_windows() -> None:
    monitor = ExpertUsageMonitor(collapse_dead_fraction=0.5, collapse_imbalance=3.0, collapse_windows=3)
    monitor.layers = [0, 1]
    ok = {"dead_fraction": torch.tensor([0.0, 0.1]), "imbalance": torch.tensor([1.2, 1.5])}
    dead = {"dead_fraction": torch.tensor([0.0, 0.6]), "imbalance": torch.tensor([1.2, 1.5])}
    skewed = {"dead_fraction": torch.tensor([0.0, 0.0]), "imbalance": torch.tensor([3.5, 1.5])}
    messages = [monitor._check_collapse(r) for r in (dead, skewed, ok, dead, skewed, dead, dead, dead, dead)]
    assert [m is not None for m in messages] == [False] * 5 + [True, False, False, True]
    assert "layer 1: dead 0.60" in messages[5] and "layer 0" not in messages[5]
    assert monitor.collapse_streak == 6
