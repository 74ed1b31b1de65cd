"""``python lightning_worker.py OUT TRAIN VAL --max-steps N [--ckpt PATH] [--init-from CKPT] [--devices W]
[--ep-size E] [--balance aux_loss|both] [--accumulate A]``.

Trains the tiny EMO model with ``EMODeepSpeedStrategy`` (ZeRO-2) on W CPU processes (default 4, ep 2: two
expert-data-parallel replicas); Lightning starts the other processes itself (subprocess launcher re-running this
command). Every rank writes ``OUT/rank<r>.json`` with its per-step training loss, its selection bias after every
optimizer step and the number of bias updates, and (``--init-from``) the largest difference between every tensor
and buffer its model holds after loading and the checkpoint's value (its experts: their slice); after ``fit``
every rank validates on the whole validation set (rank/world overridden to 0/1 so the numbers are comparable to one
process) and records ``val/ce``. Checkpoints go to ``OUT/ckpt`` (one DeepSpeed directory per step).
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
    """Per-step loss, the bias after every optimizer step, how often the bias moved, and (``init_from``) how far
    the loaded model is from the checkpoint, tensor by tensor."""

    def __init__(self, init_from: str | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.bias: dict[int, list] = {}
        self.bias_updates = 0
        self.init_from = init_from
        self.init: dict[str, float] = {}

    def on_fit_start(self, trainer, pl_module) -> None:  # type: ignore[override]
        model = pl_module.model
        update = model.update_expert_bias

        def counted(counts: torch.Tensor) -> None:
            self.bias_updates += 1
            update(counts)

        model.update_expert_bias = counted
        if self.init_from:
            self.init = loaded_vs_checkpoint(model, self.init_from)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        self.losses[trainer.global_step] = float(outputs["loss"])
        routers = pl_module.model.routers()
        if routers[0].expert_bias is not None:
            self.bias[trainer.global_step] = torch.stack([r.expert_bias for r in routers]).tolist()


def loaded_vs_checkpoint(model: torch.nn.Module, path: str) -> dict[str, float]:
    """Every tensor of the rank-local model's state dict against the one-file checkpoint (experts: the slice of
    their global ids): the largest difference, how many tensors, and which buffers were among them."""

    from emo_lightning.checkpoint.deepspeed import checkpointed_tensors

    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    worst, n, buffers = 0.0, 0, []
    params = {name for name, _ in model.named_parameters()}
    for name, value in checkpointed_tensors(model).items():
        head, sep, tail = name.partition(".deepspeed_moe.experts.")
        if sep:
            local = model.get_submodule(head).local
            want = saved[f"model.{head}.{tail}"][
                local.expert_offset : local.expert_offset + local.num_experts
            ]
        else:
            want = saved[f"model.{name}"]
            if name not in params:
                buffers.append(name)
        worst = max(worst, float((value.double() - want.double()).abs().max()))
        n += 1
    return {"max_diff": worst, "tensors": n, "parameters": len(params), "buffers": buffers}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("train")
    p.add_argument("val")
    p.add_argument("--max-steps", type=int, default=5)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--ep-size", type=int, default=2)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--balance", default="aux_loss")
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--init-from", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    L.seed_everything(0)
    module = tiny_lit_module(lr=1e-2, warmup_steps=1, balance=args.balance, bias_gamma=0.05)
    module.init_from = args.init_from  # as `emo fit --init_from`: the strategy loads it into the rank's model
    rec = LossRecorder(args.init_from)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=EMODeepSpeedStrategy(ep_size=args.ep_size, stage=2),
        max_steps=args.max_steps,
        gradient_clip_val=1.0,
        accumulate_grad_batches=args.accumulate,
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
    result = {"losses": rec.losses, "bias": rec.bias, "bias_updates": rec.bias_updates, "init": rec.init}
    result["global_step"] = trainer.global_step
    # every rank validates the same (whole) validation set: comparable with a one-process run
    metrics = trainer.validate(
        module, datamodule=data(args.train, args.val, rank=0, world_size=1), verbose=False
    )
    result["val_ce"] = metrics[0]["val/ce"]
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
