"""Fixtures of the fault-injection tests: small shard sets that tests may damage, and tiny runs."""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest

from emo_lightning.data import ShardDataModule
from tests.factories import tiny_lit_module


@pytest.fixture
def make_shards(tiny_shards: dict[str, Path], tmp_path: Path) -> Callable[[int], Path]:
    """``make_shards(n)``: a private copy of the first ``n`` training shards with a manifest listing only them."""

    def make(n: int, name: str = "shards") -> Path:
        src, out = tiny_shards["train"], tmp_path / name
        out.mkdir()
        manifest = json.loads((src / "manifest.json").read_text())
        manifest["shards"] = manifest["shards"][:n]
        for shard in manifest["shards"]:
            shutil.copy(src / shard["name"], out / shard["name"])
        manifest["totals"]["shards"] = n
        manifest["totals"]["tokens"] = sum(s["tokens"] for s in manifest["shards"])
        (out / "manifest.json").write_text(json.dumps(manifest))
        return out

    return make


def tiny_data(train: Path, **kwargs) -> ShardDataModule:
    return ShardDataModule(
        train_shards=str(train), seq_len=64, batch_size=4, num_workers=0, shuffle_buffer=20, seed=3, **kwargs
    )


def tiny_trainer(max_steps: int, callbacks: list, root: Path | None = None, **kwargs) -> L.Trainer:
    """A quiet CPU trainer; its default checkpoints go under ``root`` (never the working directory)."""
    L.seed_everything(0)
    options = dict(
        accelerator="cpu",
        default_root_dir=root,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        callbacks=callbacks,
    )
    options.update(kwargs)
    return L.Trainer(**options)


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Callable, Callable, Callable]:
    """``(tiny_module, tiny_data, tiny_trainer)`` factories; the trainer's root is the test's folder."""
    return tiny_lit_module, tiny_data, functools.partial(tiny_trainer, root=tmp_path / "trainer")


def cli_args(runs: Path, train: Path, *extra: str) -> list[str]:
    """Arguments of a tiny ``emo fit`` on ``train`` into ``runs/emo_tiny`` (no validation)."""
    root = Path(__file__).resolve().parents[2]
    return [
        "--config", str(root / "conf" / "experiment" / "emo_tiny.yaml"),
        "--runs_dir", str(runs),
        "--data.train_shards", str(train),
        "--data.val_shards", "null",
        "--data.seq_len", "64",
        "--data.batch_size", "4",
        "--data.num_workers", "0",
        "--data.shuffle_buffer", "20",
        "--model.arch.d_model", "32",
        "--model.arch.n_layers", "2",
        "--model.arch.n_heads", "2",
        "--model.router.num_experts", "8",
        "--model.router.pool_max", "7",
        "--trainer.limit_val_batches", "0",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        *extra,
    ]  # fmt: skip


@pytest.fixture
def emo_args() -> Callable[..., list[str]]:
    return cli_args
