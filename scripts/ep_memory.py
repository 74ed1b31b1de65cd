"""Measured vs estimated resident memory of every rank: ZeRO-2 + expert parallelism on CPU processes (gloo).

``torchrun --standalone --nproc_per_node 4 scripts/ep_memory.py [--ep-size 2] [--size study|small] [--out DIR]``

Every rank builds its rank-local model (``study``: a 0.22 B-parameter config; ``small``: 56 M, the test's), fp32,
wraps it in a DeepSpeed ZeRO-2 engine and runs two optimizer steps, reading its resident set
(``/proc/self/status``) after each stage and its peak (VmHWM, reset before each stage). Rank 0 prints its growth
over the baseline (after imports and process groups) next to ``emo estimate``'s figures for the same layout
(``emo_lightning.parallel.cost``); ``--out DIR`` writes every rank's measurements and the estimate of its layout
to ``DIR/rank<r>.json`` (``tests/parallel/test_estimate.py`` holds the estimate against them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from emo_lightning.model import ArchConfig, GlobalLoadBalance, ModelConfig, RouterConfig, objective
from emo_lightning.optim import OptimConfig, build_optimizer
from emo_lightning.parallel import build_expert_parallel_model
from emo_lightning.parallel.cost import Layout, estimate

GB = 1e9
MICRO_BATCH, SEQ, BUCKET = 4, 256, 50_000_000
CONFIGS = {
    "study": ModelConfig(
        arch=ArchConfig(
            vocab_size=4096, d_model=512, n_layers=4, n_heads=8, expert_hidden=512, max_seq_len=SEQ
        ),
        router=RouterConfig(kind="emo", num_experts=32, num_shared=1, top_k=4),
    ),
    "small": ModelConfig(
        arch=ArchConfig(
            vocab_size=4096, d_model=256, n_layers=4, n_heads=4, expert_hidden=512, max_seq_len=SEQ
        ),
        router=RouterConfig(kind="emo", num_experts=32, num_shared=1, top_k=4),
    ),
}


def status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class LossModel(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.balance = GlobalLoadBalance.for_model(model.cfg)

    def forward(self, ids: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
        self.balance.reset()
        out = self.model(ids, doc, balance=self.balance)
        return objective(out.logits, ids.roll(-1, 1), out.aux_loss)[0]  # next token (memory only: no masking)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ep-size", type=int, default=2)
    p.add_argument("--size", choices=sorted(CONFIGS), default="study")
    p.add_argument("--out", default=None, help="folder: every rank writes rank<r>.json")
    args = p.parse_args()
    cfg = CONFIGS[args.size]
    deepspeed.init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    dist.barrier()
    base = status()["VmRSS"]
    stages: dict[str, dict[str, float]] = {}

    def mark(name: str) -> None:
        s = status()
        stages[name] = {"rss": (s["VmRSS"] - base) / GB, "peak": (s["VmHWM"] - base) / GB}
        reset_peak()

    reset_peak()
    torch.manual_seed(0)
    model = build_expert_parallel_model(cfg, args.ep_size)
    mark("construction")
    engine, *_ = deepspeed.initialize(
        model=LossModel(model),
        optimizer=build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=0), 10)[0],
        config={
            "train_micro_batch_size_per_gpu": MICRO_BATCH,
            "gradient_clipping": 1.0,
            "zero_optimization": {
                "stage": 2,
                "reduce_bucket_size": BUCKET,
                "overlap_comm": True,
                "contiguous_gradients": True,
            },
            "zero_allow_untested_optimizer": True,
        },
    )
    mark("engine")
    g = torch.Generator().manual_seed(rank)
    for step in range(2):
        ids = torch.randint(0, cfg.arch.vocab_size, (MICRO_BATCH, SEQ), generator=g)
        doc = (torch.rand(MICRO_BATCH, SEQ, generator=g) < 0.01).long().cumsum(1)
        engine.backward(engine(ids, doc))
        engine.step()
        mark(f"step{step}")
    layout = Layout(
        nodes=1,
        gpus_per_node=world,
        ep_size=args.ep_size,
        micro_batch=MICRO_BATCH,
        seq=SEQ,
        precision="32-true",
        zero_stage=2,
        reduce_bucket_size=BUCKET,
        overlap_comm=True,
        dense_attention_mask=True,  # SDPA with a document mask on CPU
    )
    est = estimate(cfg, layout)  # EP rank 0's layout: the fullest rank
    if rank == 0:
        print(f"rank 0/{world}, ep_size {args.ep_size}: resident growth over the baseline (GB)")
        for name, v in stages.items():
            print(f"  {name:<13} now {v['rss']:6.2f}   peak during the stage {v['peak']:6.2f}")
        print("estimate (GB): " + ", ".join(f"{k} {v / GB:.2f}" for k, v in est.memory.items()))
        print(f"  total {est.total_memory / GB:.2f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        memory = {k: v / GB for k, v in est.memory.items()}
        result = {"measured": stages, "estimate": memory, "estimate_total": est.total_memory / GB}
        result["model_GB"] = model.parameter_summary().bytes / GB
        (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
