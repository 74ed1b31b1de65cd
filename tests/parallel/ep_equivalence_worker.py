"""Run under ``torchrun --nproc_per_node W``: rank-local expert-parallel models vs one process.

``python ep_equivalence_worker.py OUT EP_SIZE``. For each ``router.balance`` (``aux_loss``, ``both``) every rank
builds the one-process model (the reference, whole global batch) and its own rank-local model
(:func:`build_expert_parallel_model`: meta, placement, local materialisation) from the same seed, and checks on
real gloo collectives:

1. construction: dense weights bit-identical to the one-process build, local experts equal to their slice of
   it, parameter counts = dense + shared + E/ep routed per layer (``construction/*``);
2. the expert-usage metric (routes of each rank's micro-batch, synced) equals one process (``usage``);
3. for each exchange mode, two DeepSpeed ZeRO-2 steps (gradient clipping on) on each rank's share of the batch:
   the mean loss, DeepSpeed's reduced gradients of every parameter the rank holds (its experts: their slice of the
   reference), the gradient norm, the selection bias (updated from the step's global counts, as
   ``EMOLitModule.on_before_optimizer_step`` does) and the weights after each step equal one torch AdamW run on
   the whole batch.

Every difference is taken on every rank and reduced with MAX over the ranks (a NaN counts as infinite, never as
agreement); rank 0 writes the maxima and each rank's own values as JSON to OUT.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from torch import nn

from emo_lightning.metrics import ExpertUsage
from emo_lightning.model import (
    ArchConfig,
    EMOTransformer,
    GlobalLoadBalance,
    ModelConfig,
    RouterConfig,
    objective,
)
from emo_lightning.optim import OptimConfig, build_optimizer
from emo_lightning.parallel import DeepSpeedExperts, build_expert_parallel_model

ROWS, SEQ, DOMAINS, STEPS = 8, 32, 3, 2
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1, eps=1e-8)
CFG = ModelConfig(
    arch=ArchConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, expert_hidden=32, max_seq_len=SEQ),
    # EMO router, 7 routable + 1 shared: ep 2 puts experts 0-3 on EP rank 0, 4-6 (+ the shared slot) on EP rank 1.
    # Pool size fixed (4) so that one process and every rank draw the same pools.
    router=RouterConfig(
        kind="emo", num_experts=8, num_shared=1, top_k=3, pool_min=4, pool_max=4, pool_eval=4, bias_gamma=0.05
    ),
)
BALANCES = ("aux_loss", "both")


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
        return objective(out.logits, labels, out.aux_loss)[0]

    def update_bias(self) -> None:
        """The selection-bias step of ``router.balance`` bias/both, from the step's global counts."""
        if self.model.cfg.router.uses_bias:
            self.model.update_expert_bias(self.balance.counts)


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


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|; a NaN on either side (not on both at the same place) is infinite, never agreement."""
    d = (a.double() - b.double()).abs()
    both_nan = a.isnan() & b.isnan()
    return float(d.masked_fill(both_nan, 0.0).nan_to_num(nan=float("inf")).max()) if d.numel() else 0.0


def max_diff(ep: nn.Module, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Largest difference of the rank's tensors (its experts: against their slice of the reference)."""
    assert got, "nothing to compare"
    out = 0.0
    for name, value in got.items():
        assert value is not None, f"no value for {name}"
        where = expert_slice(ep, name)
        ref = want[where[0]][where[1]] if where else want[name]
        assert ref.shape == value.shape, (name, ref.shape, value.shape)
        out = max(out, diff(value, ref))
    return out


def bias(model: EMOTransformer) -> torch.Tensor:
    """(L,E') the routers' selection bias (zeros without one)."""
    return torch.stack(
        [r.expert_bias if r.expert_bias is not None else torch.zeros(r.num_routed) for r in model.routers()]
    )


def reference(cfg: ModelConfig, batch: dict[str, torch.Tensor]) -> tuple[EMOTransformer, dict[str, list]]:
    """The one-process run: fresh model, STEPS AdamW steps (clip 1.0, bias update) on the whole batch."""
    torch.manual_seed(0)
    model = EMOTransformer(cfg)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref = LossModel(model, group=None)
    opt, _ = build_optimizer(ref.model, OPTIM, 10)
    hist: dict[str, list] = {"loss": [], "grads": [], "weights": [], "norm": [], "bias": []}
    for _ in range(STEPS):
        opt.zero_grad()
        loss = ref(batch["ids"], batch["doc"], batch["labels"])
        loss.backward()
        hist["loss"].append(loss.item())
        hist["grads"].append({n: p.grad.clone() for n, p in ref.model.named_parameters()})
        ref.update_bias()
        hist["bias"].append(bias(model).clone())
        hist["norm"].append(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0).item())
        opt.step()
        hist["weights"].append({n: p.detach().clone() for n, p in ref.model.named_parameters()})
    model.load_state_dict(init)  # back to the initial weights and bias (routes of the usage check)
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


def compare(cfg: ModelConfig, batch: dict, local_batch: dict, ep_size: int, rank: int, world: int) -> dict:
    """This rank's differences to the one-process reference for one router configuration."""
    ref_model, ref = reference(cfg, batch)
    ref_init = dict(ref_model.named_parameters())
    report: dict[str, float] = {}
    modes = ("variable", "padded") if ep_size > 1 else ("variable",)
    for exchange in modes:
        torch.manual_seed(0)  # the same global RNG state as the one-process build
        model = build_expert_parallel_model(cfg, ep_size, exchange)
        if exchange == modes[0]:
            p = {n: t.detach() for n, t in model.named_parameters()}
            report["construction/weights"] = max_diff(model, p, ref_init)
            s = model.parameter_summary()
            e = cfg.router.num_experts // ep_size
            one = 3 * cfg.arch.d_model * cfg.arch.expert_hidden
            placed = [m for m in model.modules() if isinstance(m, DeepSpeedExperts)]
            held = {m.local.num_experts for m in placed}
            ok = (
                s.routed == sum(m.local.num_experts for m in placed) * one
                and held <= {e, e - cfg.router.num_shared}
                and s.shared == cfg.arch.n_layers * cfg.router.num_shared * one
                and s.dense + s.shared
                == ref_model.parameter_summary().dense + ref_model.parameter_summary().shared
            )
            report["construction/counts_wrong"] = float(not ok)
            report["construction/local_experts"] = float(s.local_experts)  # per rank (not a difference)
            want = usage(
                ref_model,
                batch,
                [slice(r * ROWS // world, (r + 1) * ROWS // world) for r in range(world)],
                None,
            )
            got = usage(model, local_batch, [slice(None)], dist.group.WORLD)
            report["usage"] = max(diff(got[key], value) for key, value in want.items())

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
            engine_model.update_bias()  # before the step, as on_before_optimizer_step
            report[f"{key}/bias"] = diff(bias(model), ref["bias"][step])
            engine.step()
            report[f"{key}/grad_norm"] = abs(float(engine.get_global_grad_norm()) / ref["norm"][step] - 1)
            weights = {n: q.detach() for n, q in engine.module.model.named_parameters()}
            report[f"{key}/weights"] = max_diff(model, weights, ref["weights"][step])
    if not cfg.router.uses_bias:
        report = {k: v for k, v in report.items() if not k.endswith("/bias")}
    return report


def main(out_path: str, ep_size: int) -> None:
    deepspeed.init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    batch = make_batch()
    mine = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    local_batch = {k: v[mine] for k, v in batch.items()}
    mine_report = {}
    for balance in BALANCES:
        cfg = replace(CFG, router=replace(CFG.router, balance=balance))
        for key, value in compare(cfg, batch, local_batch, ep_size, rank, world).items():
            mine_report[f"{balance}/{key}"] = value
    keys = sorted(mine_report)
    values = torch.tensor([mine_report[k] for k in keys], dtype=torch.float64)
    worst = values.clone()
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # every rank's differences, not rank 0's
    per_rank = [torch.zeros_like(values) for _ in range(world)]
    dist.all_gather(per_rank, values)
    if rank == 0:
        report = {"max": dict(zip(keys, worst.tolist(), strict=True)), "world": world}
        report["ranks"] = [dict(zip(keys, v.tolist(), strict=True)) for v in per_rank]
        with open(out_path, "w") as f:
            json.dump(report, f)
    # Without this, gloo's worker threads can outlive interpreter shutdown and abort the process
    # ("terminate called without an active exception"; seen once in CI, pytorch/pytorch#190489).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
