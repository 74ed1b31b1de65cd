"""Run under ``torchrun --nproc_per_node 2``: expert parallelism (ep_size = world) vs one process.

For each exchange mode, checks on real gloo collectives: (1) the mean of the ranks' losses equals the one-process
loss of the whole global batch; (2) after the data-parallel reduction, dense and expert gradients equal the
one-process gradients; (3) one DeepSpeed ZeRO-2 step gives the weights of one torch AdamW step on the whole
batch. Writes a JSON report (max abs differences) to argv[1] from rank 0.
"""

from __future__ import annotations

import copy
import json
import sys

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from emo_lightning.model import ArchConfig, EMOTransformer, GlobalLoadBalance, ModelConfig, RouterConfig
from emo_lightning.optim import OptimConfig, build_optimizer
from emo_lightning.parallel import ExpertParallelMoE, convert_to_expert_parallel

ROWS, SEQ = 4, 32
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1, eps=1e-8)


class LossModel(nn.Module):
    """CE + auxiliary losses of a batch, with the global load balance over ``group``."""

    def __init__(self, model: EMOTransformer, group: object) -> None:
        super().__init__()
        self.model = model
        self.balance = GlobalLoadBalance.for_model(model.cfg, group=group)

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.balance.reset()
        out = self.model(input_ids, doc_ids, balance=self.balance)
        ce = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
        return ce + out.aux_loss


def make_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 256, (ROWS, SEQ), generator=g)
    cuts = torch.rand(ROWS, SEQ, generator=g) < 0.08  # document boundaries
    doc = cuts.long().cumsum(1)
    labels = torch.randint(0, 256, (ROWS, SEQ), generator=g)  # every position a target: CE means add up
    return ids, doc, labels


def main(out_path: str) -> None:
    deepspeed.init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    cfg = ModelConfig(
        arch=ArchConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, expert_hidden=32, max_seq_len=SEQ),
        # EMO router, 7 routable + 1 shared: ep 2 puts experts 0-3 on rank 0, 4-6 (+ the shared slot) on rank 1.
        # Pool size fixed (4) so that both runs draw the same pools.
        router=RouterConfig(
            kind="emo", num_experts=8, num_shared=1, top_k=3, pool_min=4, pool_max=4, pool_eval=4
        ),
    )
    torch.manual_seed(0)
    base = EMOTransformer(cfg)
    ids, doc, labels = make_batch()
    half = slice(rank * ROWS // world, (rank + 1) * ROWS // world)

    ref = LossModel(copy.deepcopy(base), group=None)
    ref.balance.sync = False
    ref_loss = ref(ids, doc, labels)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref_opt, _ = build_optimizer(ref.model, OPTIM, 10)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    ref_opt.step()
    ref_after = {n: p.detach().clone() for n, p in ref.named_parameters()}

    report: dict[str, float] = {}
    for exchange in ("variable", "padded"):
        ep = LossModel(copy.deepcopy(base), group=dist.group.WORLD)
        convert_to_expert_parallel(ep.model, world, exchange)
        for m in ep.modules():
            if isinstance(m, ExpertParallelMoE):
                m.set_deepspeed_parallelism()  # what the engine does: DeepSpeed's groups -> our layer
        loss = ep(ids[half], doc[half], labels[half])
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        report[f"{exchange}/loss"] = abs(mean_loss.item() - ref_loss.item())
        grad_diff = 0.0
        for name, p in ep.named_parameters():
            g = p.grad.clone()
            if getattr(p, "allreduce", True):
                dist.all_reduce(g)
                g /= world
                want = ref_grads[name]
            else:  # expert: summed over the ranks that sent tokens already; data-parallel mean = / world
                g /= world
                layer = int(name.split(".")[2])
                moe = ep.model.blocks[layer].moe
                src = name.replace("deepspeed_moe.experts", "experts")
                want = ref_grads[src][moe.first_expert : moe.first_expert + moe.num_local_routed]
            grad_diff = max(grad_diff, (g - want).abs().max().item())
        report[f"{exchange}/grad"] = grad_diff

        # one ZeRO-2 step through DeepSpeed's engine (expert groups, MoE param groups, grad reduction)
        engine_model = LossModel(copy.deepcopy(base), group=dist.group.WORLD)
        convert_to_expert_parallel(engine_model.model, world, exchange)
        opt, _ = build_optimizer(engine_model, OPTIM, 10)
        engine, *_ = deepspeed.initialize(
            model=engine_model,
            optimizer=opt,
            config={
                "train_micro_batch_size_per_gpu": ROWS // world,
                "gradient_clipping": 1.0,
                "zero_optimization": {"stage": 2},
                "zero_allow_untested_optimizer": True,
            },
        )
        loss = engine(ids[half], doc[half], labels[half])
        engine.backward(loss)
        engine.step()
        w_diff = 0.0
        for name, p in engine.module.named_parameters():
            if getattr(p, "allreduce", True):
                want = ref_after[name]
            else:
                layer = int(name.split(".")[2])
                moe = engine.module.model.blocks[layer].moe
                src = name.replace("deepspeed_moe.experts", "experts")
                want = ref_after[src][moe.first_expert : moe.first_expert + moe.num_local_routed]
            w_diff = max(w_diff, (p.detach() - want).abs().max().item())
        report[f"{exchange}/zero2_step_weights"] = w_diff
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)
    # Without this, gloo's worker threads can outlive interpreter shutdown and abort the process
    # ("terminate called without an active exception"; seen once in CI, pytorch/pytorch#190489).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
