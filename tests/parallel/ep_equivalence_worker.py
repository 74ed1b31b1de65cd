"""Run under ``torchrun --nproc_per_node W``: rank-local expert-parallel models vs one process.

``python ep_equivalence_worker.py OUT EP_SIZE``. Every rank builds the one-process model (the reference, whole
global batch) and its own rank-local model (:func:`build_expert_parallel_model`: meta, placement, local
materialisation) from the same seed, and checks on real gloo collectives:

1. construction: dense weights bit-identical to the one-process build, local experts equal to their slice of
   it, parameter counts = dense + shared + E/ep routed per layer (``construction/*``);
2. the expert-usage metric (routes of each rank's micro-batch, synced) equals one process (``usage``);
3. for each exchange mode, two DeepSpeed ZeRO-2 steps (gradient clipping on) on each rank's share of the batch:
   the mean loss, DeepSpeed's reduced gradients (``safe_get_full_grad``) and the weights after each step equal
   one torch AdamW run on the whole batch.

Rank 0 writes the maximum absolute differences as JSON to OUT.
"""

from __future__ import annotations

import json
import sys

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_grad
from torch import nn

from emo_lightning.metrics import ExpertUsage
from emo_lightning.model import ArchConfig, EMOTransformer, GlobalLoadBalance, ModelConfig, RouterConfig
from emo_lightning.optim import OptimConfig, build_optimizer
from emo_lightning.parallel import DeepSpeedExperts, build_expert_parallel_model

ROWS, SEQ, DOMAINS, STEPS = 8, 32, 3, 2
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1, eps=1e-8)
CFG = ModelConfig(
    arch=ArchConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, expert_hidden=32, max_seq_len=SEQ),
    # EMO router, 7 routable + 1 shared: ep 2 puts experts 0-3 on EP rank 0, 4-6 (+ the shared slot) on EP rank 1.
    # Pool size fixed (4) so that one process and every rank draw the same pools.
    router=RouterConfig(
        kind="emo", num_experts=8, num_shared=1, top_k=3, pool_min=4, pool_max=4, pool_eval=4
    ),
)


class LossModel(nn.Module):
    """CE + auxiliary losses of a batch, with the global load balance over ``group``."""

    def __init__(self, model: EMOTransformer, group: object) -> None:
        super().__init__()
        self.model = model
        self.balance = GlobalLoadBalance.for_model(model.cfg, group=group)
        self.balance.sync = group is not None

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.balance.reset()
        out = self.model(input_ids, doc_ids, balance=self.balance)
        ce = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
        return ce + out.aux_loss


def make_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 256, (ROWS, SEQ), generator=g)
    doc = (torch.rand(ROWS, SEQ, generator=g) < 0.08).long().cumsum(1)  # document boundaries
    labels = torch.randint(0, 256, (ROWS, SEQ), generator=g)  # every position a target: CE means add up
    domains = torch.randint(0, DOMAINS, (ROWS, 1), generator=g).expand(ROWS, SEQ).contiguous()
    return {"ids": ids, "doc": doc, "labels": labels, "domains": domains}


def expert_slice(model: nn.Module, name: str) -> tuple[str, slice] | None:
    """One-process name and row slice of a rank-local expert parameter (None for dense ones)."""
    head, sep, tail = name.partition(".deepspeed_moe.experts.")
    if not sep:
        return None
    local = model.get_submodule(head).local
    return f"{head}.{tail}", slice(local.expert_offset, local.expert_offset + local.num_experts)


def max_diff(ep: nn.Module, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    out = 0.0
    for name, value in got.items():
        where = expert_slice(ep, name)
        ref = want[where[0]][where[1]] if where else want[name]
        out = max(out, (value - ref).abs().max().item())
    return out


def reference(batch: dict[str, torch.Tensor]) -> tuple[EMOTransformer, dict[str, list]]:
    """The one-process run: fresh model, STEPS AdamW steps (clip 1.0) on the whole batch."""
    torch.manual_seed(0)
    model = EMOTransformer(CFG)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = LossModel(model, group=None)
    opt, _ = build_optimizer(ref.model, OPTIM, 10)
    hist: dict[str, list] = {"loss": [], "grads": [], "weights": [], "norm": []}
    for _ in range(STEPS):
        opt.zero_grad()
        loss = ref(batch["ids"], batch["doc"], batch["labels"])
        loss.backward()
        hist["loss"].append(loss.item())
        hist["grads"].append({n: p.grad.clone() for n, p in ref.model.named_parameters()})
        hist["norm"].append(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0).item())
        opt.step()
        hist["weights"].append({n: p.detach().clone() for n, p in ref.model.named_parameters()})
    model.load_state_dict(init)  # back to the initial weights (routes of the usage check)
    return model, hist


def usage(model: EMOTransformer, batch: dict[str, torch.Tensor], parts: list[slice], group: object) -> dict:
    """ExpertUsage of one forward of ``batch`` (load balance over ``group``), one update per row slice in
    ``parts`` (the one process: the ranks' micro-batches; a rank: its whole micro-batch)."""
    # the one-process reference runs in every process: its metric must not sum over them
    metric = ExpertUsage(CFG.arch.n_layers, DOMAINS, CFG.router.num_routed, sync_on_compute=group is not None)
    balance = GlobalLoadBalance.for_model(CFG, group=group, sync=group is not None)
    with torch.no_grad():
        out = model(batch["ids"], batch["doc"], balance=balance, return_routes=True)
    layers = out.layers
    for part in parts:
        metric.update(
            torch.stack([r.experts[part, :, : CFG.router.routed_k] for r in layers]),
            batch["domains"][part],
            doc_ids=batch["doc"][part],
            pool_sizes=torch.stack([r.pool_sizes[part] for r in layers]),
            pool_mask=torch.stack([r.pool_mask[part] for r in layers]),
            lb=torch.stack([r.lb for r in layers]),  # a rank's lb uses the global counts: the whole batch's
            z=torch.stack([r.z for r in layers]),
        )
    return metric.compute()


def main(out_path: str, ep_size: int) -> None:
    deepspeed.init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    batch = make_batch()
    mine = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    local_batch = {k: v[mine] for k, v in batch.items()}
    ref_model, ref = reference(batch)
    ref_init = dict(ref_model.named_parameters())
    report: dict[str, float] = {}

    modes = ("variable", "padded") if ep_size > 1 else ("variable",)
    for exchange in modes:
        torch.manual_seed(0)  # the same global RNG state as the one-process build
        model = build_expert_parallel_model(CFG, ep_size, exchange)
        if exchange == modes[0]:
            p = {n: t.detach() for n, t in model.named_parameters()}
            report["construction/weights"] = max_diff(model, p, ref_init)
            s = model.parameter_summary()
            e = CFG.router.num_experts // ep_size
            one = 3 * CFG.arch.d_model * CFG.arch.expert_hidden
            placed = [m for m in model.modules() if isinstance(m, DeepSpeedExperts)]
            held = {m.local.num_experts for m in placed}
            ok = (
                s.routed == sum(m.local.num_experts for m in placed) * one
                and held <= {e, e - CFG.router.num_shared}
                and s.shared == CFG.arch.n_layers * CFG.router.num_shared * one
                and s.dense + s.shared
                == ref_model.parameter_summary().dense + ref_model.parameter_summary().shared
            )
            report["construction/counts_ok"] = float(ok)
            report["construction/line"] = s.line(rank, world)  # type: ignore[assignment]
            report["usage"] = 0.0
            want = usage(
                ref_model,
                batch,
                [slice(r * ROWS // world, (r + 1) * ROWS // world) for r in range(world)],
                None,
            )
            got = usage(model, local_batch, [slice(None)], dist.group.WORLD)
            for key, value in want.items():
                diff = (got[key].double() - value.double()).abs().nan_to_num(0.0).max().item()
                report["usage"] = max(report["usage"], diff)

        engine_model = LossModel(model, group=dist.group.WORLD)
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
        for step in range(STEPS):
            loss = engine(local_batch["ids"], local_batch["doc"], local_batch["labels"])
            engine.backward(loss)
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            key = f"{exchange}/step{step}"
            report[f"{key}/loss"] = abs(mean.item() / world - ref["loss"][step])
            grads = {n: safe_get_full_grad(q) for n, q in engine.module.model.named_parameters()}
            report[f"{key}/grad"] = max_diff(model, grads, ref["grads"][step])
            engine.step()
            report[f"{key}/grad_norm"] = abs(float(engine.get_global_grad_norm()) / ref["norm"][step] - 1)
            weights = {n: q.detach() for n, q in engine.module.model.named_parameters()}
            report[f"{key}/weights"] = max_diff(model, weights, ref["weights"][step])
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)
    # Without this, gloo's worker threads can outlive interpreter shutdown and abort the process
    # ("terminate called without an active exception"; seen once in CI, pytorch/pytorch#190489).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
