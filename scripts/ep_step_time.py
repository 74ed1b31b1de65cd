"""Step time of the tiny EMO model (conf/arch/tiny + conf/router/emo_tiny, batch 16 x 256 per rank).

``python scripts/ep_step_time.py --devices 2 --ep-size 2 [--exchange variable|padded]`` (DeepSpeed ZeRO-2, Lightning
starts the second process) or ``--devices 1`` (plain one-process Lightning). Prints the median step time of steps
after a warm-up, from rank 0.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from emo_lightning.data import ShardDataModule
from emo_lightning.lit_module import EMOLitModule
from emo_lightning.model import ArchConfig, RouterConfig
from emo_lightning.optim import OptimConfig


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, *args) -> None:  # type: ignore[override]
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:  # type: ignore[override]
        self.times.append(time.perf_counter() - self._t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--ep-size", type=int, default=2)
    p.add_argument("--exchange", default="variable")
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--warmup", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = EMOLitModule(
        arch=ArchConfig(
            vocab_size=4096, d_model=128, n_layers=4, n_heads=4, expert_hidden=128, max_seq_len=256
        ),
        router=RouterConfig(
            kind="emo", num_experts=16, num_shared=1, top_k=3, pool_min=2, pool_max=15, pool_eval=4
        ),
        optim=OptimConfig(lr=3e-3, warmup_steps=10),
    )
    dm = ShardDataModule(
        "data/shards/train", None, seq_len=256, batch_size=16, num_workers=1, shuffle_buffer=1000
    )
    strategy = "auto"
    if args.devices > 1:
        from emo_lightning.parallel import EMODeepSpeedStrategy

        strategy = EMODeepSpeedStrategy(ep_size=args.ep_size, stage=2, exchange=args.exchange)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, gradient_clip_val=1.0,
        callbacks=[timer],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    if trainer.global_rank == 0:
        t = statistics.median(timer.times[args.warmup :])
        label = (
            f"devices={args.devices} ep={args.ep_size if args.devices > 1 else '-'} exchange={args.exchange}"
        )
        print(
            f"STEP_TIME {label}: median {t * 1000:.1f} ms/step ({16 * 256 * args.devices / t:.0f} tokens/s)"
        )


if __name__ == "__main__":
    main()
