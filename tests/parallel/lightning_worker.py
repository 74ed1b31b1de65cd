"""``python lightning_worker.py OUT TRAIN VAL --max-steps N [--ckpt PATH] [--devices W] [--ep-size E]``.

Trains the tiny EMO model with ``EMODeepSpeedStrategy`` (ZeRO-2) on W CPU processes (default 4, ep 2: two
expert-data-parallel replicas); Lightning starts the other processes itself (subprocess launcher re-running this
command). Every rank writes ``OUT/rank<r>.json`` with its
per-step training loss; after ``fit`` every rank validates on the whole validation set (rank/world overridden to
0/1 so the numbers are comparable to one process) and rank 0 records ``val/ce``. Checkpoints go to ``OUT/ckpt``
(one DeepSpeed directory per step).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from emo_lightning.data import ShardDataModule
from emo_lightning.parallel import EMODeepSpeedStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repository root
from tests.factories import tiny_lit_module


def data(train: str | None, val: str | None, **kw: int) -> ShardDataModule:
    return ShardDataModule(
        train_shards=train,
        val_shards=val,
        seq_len=64,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=50,
        seed=3,
        **kw,
    )


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        self.losses[trainer.global_step] = float(outputs["loss"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("train")
    p.add_argument("val")
    p.add_argument("--max-steps", type=int, default=5)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--ep-size", type=int, default=2)
    p.add_argument("--devices", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    L.seed_everything(0)
    module, rec = tiny_lit_module(lr=1e-2, warmup_steps=1), LossRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=EMODeepSpeedStrategy(ep_size=args.ep_size, stage=2),
        max_steps=args.max_steps,
        gradient_clip_val=1.0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=4,
        callbacks=[
            rec,
            ModelCheckpoint(
                dirpath=out / "ckpt",
                filename="s{step}",
                auto_insert_metric_name=False,
                every_n_train_steps=1,
                save_top_k=-1,
            ),
        ],
    )
    trainer.fit(module, datamodule=data(args.train, None), ckpt_path=args.ckpt)
    result = {"losses": rec.losses}
    # every rank validates the same (whole) validation set: comparable with a one-process run
    metrics = trainer.validate(
        module, datamodule=data(args.train, args.val, rank=0, world_size=1), verbose=False
    )
    result["val_ce"] = metrics[0]["val/ce"]
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
