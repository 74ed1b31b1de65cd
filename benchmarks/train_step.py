"""Full training step of the tiny default (conf/experiment/emo_tiny.yaml): EMO vs standard MoE vs dense.

One step = forward (cross-entropy + auxiliary losses with the step's global balance), backward, gradient
clipping at 1.0, AdamW step and scheduler step, exactly the arithmetic of ``EMOLitModule.training_step``
without Lightning's loop. Batches come from the bundled shards (``make data``; synthetic packed documents when
they are absent) and are prefetched, so data loading is not timed here (see ``data_loader``).
The dense model has the same active parameters: every MoE layer becomes one SwiGLU FFN of hidden k*h.
Reports step time ratios, tokens/s and the peak tensor memory of one step.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import cycle
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from benchmarks.timing import Row, measure, num_threads, peak_memory, profile_ops
from emo_lightning.model import ArchConfig, EMOTransformer, GlobalLoadBalance, ModelConfig, RouterConfig
from emo_lightning.model.router import RouterOutput
from emo_lightning.optim import OptimConfig, build_optimizer

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def _yaml(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def tiny_configs() -> tuple[ArchConfig, RouterConfig, RouterConfig, OptimConfig, dict]:
    """(arch, EMO router, standard router, optim, data) of the tiny default experiment."""
    arch = ArchConfig(**_yaml(CONF / "arch" / "tiny.yaml"))
    emo = RouterConfig(**_yaml(CONF / "router" / "emo_tiny.yaml"))
    std = replace(emo, kind="standard")  # conf/experiment/stdmoe_tiny.yaml: the same file, kind standard
    optim = _yaml(CONF / "optim" / "tiny.yaml")
    optim["betas"] = tuple(optim["betas"])
    data = _yaml(CONF / "data" / "bundled.yaml")
    return arch, emo, std, OptimConfig(**optim), data


class DenseFFN(nn.Module):
    """Stand-in for ``MoELayer``: one SwiGLU of hidden k*h; returns a neutral ``RouterOutput``."""

    def __init__(self, d: int, hidden: int, num_routed: int, routed_k: int) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(d, 2 * hidden) * 0.02)
        self.w_out = nn.Parameter(torch.randn(hidden, d) * 0.02)
        self.e, self.k = num_routed, routed_k

    def forward(self, h: Tensor, doc_ids: Tensor) -> tuple[Tensor, RouterOutput]:
        b, s, d = h.shape
        g, u = (h.reshape(-1, d) @ self.w_in).chunk(2, dim=-1)
        y = ((F.silu(g) * u) @ self.w_out).view(b, s, d)
        n, dev = b * s, h.device
        zeros = torch.zeros((), device=dev)
        r = RouterOutput(
            experts=torch.zeros(n, self.k, dtype=torch.long, device=dev),
            weights=torch.zeros(n, self.k, device=dev),
            scores=torch.zeros(n, self.e, device=dev),
            z_loss=zeros,
            counts=torch.zeros(self.e, dtype=torch.long, device=dev),
            pool_sizes=torch.full((b, s), -1, dtype=torch.long, device=dev),
            logits=torch.zeros(n, self.e, device=dev),
        )
        return y, r


def build_model(arch: ArchConfig, router: RouterConfig, dense: bool, dev: torch.device) -> EMOTransformer:
    torch.manual_seed(0)
    model = EMOTransformer(ModelConfig(arch=arch, router=router))
    if dense:
        for blk in model.blocks:
            blk.moe = DenseFFN(
                arch.d_model, router.top_k * arch.expert_hidden, router.num_routed, router.routed_k
            )
    return model.to(dev).train()


def load_batches(data: dict, n: int, dev: torch.device) -> tuple[list[dict[str, Tensor]], str]:
    """``n`` training batches from the bundled shards, or synthetic packed documents without them."""
    shards = REPO / data["train_shards"]
    b, s = data["batch_size"], data["seq_len"]
    if (shards / "manifest.json").exists():
        from emo_lightning.data import ShardDataModule

        dm = ShardDataModule(str(shards), seq_len=s, batch_size=b, num_workers=0, shuffle_buffer=100)
        dm.setup("fit")
        it = iter(dm.train_dataloader())
        batches = [next(it) for _ in range(n)]
        source = str(shards.relative_to(REPO))
    else:
        g = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(n):
            lengths = torch.randint(16, 400, (b, 8), generator=g).cumsum(1)
            doc_ids = (torch.arange(s).view(1, s, 1) >= lengths.unsqueeze(1)).sum(-1)
            ids = torch.randint(0, 4096, (b, s), generator=g)
            labels = torch.where(doc_ids[:, 1:] == doc_ids[:, :-1], ids[:, 1:], -100)
            labels = torch.cat([labels, torch.full((b, 1), -100)], 1)
            batches.append({"input_ids": ids, "labels": labels, "doc_ids": doc_ids})
        source = "synthetic (no data/shards/train: run `make data`)"
    keys = ("input_ids", "labels", "doc_ids")
    return [{k: bt[k].to(dev) for k in keys} for bt in batches], source


def make_step(model: EMOTransformer, optim_cfg: OptimConfig, batches: list[dict[str, Tensor]]):
    """A closure running one full optimizer step on the next batch."""
    optimizer, scheduler = build_optimizer(model, optim_cfg, 10_000)
    balance = GlobalLoadBalance.for_model(model.cfg)
    data = cycle(batches)

    def step() -> None:
        batch = next(data)
        balance.reset()
        out = model(batch["input_ids"], batch["doc_ids"], balance=balance, route_probs=False)
        labels = batch["labels"]
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        (ce + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run(quick: bool = False, dev: torch.device | None = None) -> tuple[list[Row], dict]:
    dev = dev or torch.device("cpu")
    repeats, warmup = (5, 2) if quick else (11, 3)
    arch, emo_cfg, std_cfg, optim_cfg, data = tiny_configs()
    batches, source = load_batches(data, 8, dev)
    tokens = data["batch_size"] * data["seq_len"]
    models = {
        "emo": build_model(arch, emo_cfg, False, dev),
        "standard": build_model(arch, std_cfg, False, dev),
        "dense": build_model(arch, std_cfg, True, dev),
    }
    steps = {k: make_step(m, optim_cfg, batches) for k, m in models.items()}
    details: dict = {
        "config": "conf/experiment/emo_tiny.yaml (+ stdmoe_tiny.yaml; dense = SwiGLU of hidden k*h)",
        "batch": {"batch_size": data["batch_size"], "seq_len": data["seq_len"], "source": source},
        "threads": {},
    }
    rows: list[Row] = []
    for threads in (1,):  # 2 threads on a shared 2-core machine measures the other jobs, not the step
        with num_threads(threads):
            t = measure(steps, warmup=warmup, repeats=repeats, dev=dev)
            mem = {k: peak_memory(f, dev) for k, f in steps.items()}
            details["profile_emo"] = profile_ops(steps["emo"], steps=2, top=10)
        med = {k: t.stats(k).median for k in t.times}
        tps = {k: tokens / v for k, v in med.items()}
        details["threads"][threads] = {
            "times": t.to_dict(),
            "tokens_per_s": {k: round(v) for k, v in tps.items()},
            "emo/standard": t.ratio("emo", "standard").to_dict(),
            "emo/dense": t.ratio("emo", "dense").to_dict(),
            "standard/dense": t.ratio("standard", "dense").to_dict(),
        }
        if mem:
            details["peak_memory_MB"] = {k: round(v / 2**20, 1) for k, v in mem.items()}
        r = t.ratio("emo", "standard")
        rows.append(
            Row(
                "train_step",
                f"EMO / standard MoE, {threads} thr",
                r,
                target="<= 1.10",
                met=r.median <= 1.10,
                note=f"tokens/s EMO {tps['emo']:,.0f}, std {tps['standard']:,.0f}, dense {tps['dense']:,.0f}",
            )
        )
        r = t.ratio("emo", "dense")
        note = ""
        if mem:
            note = "peak MB " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in mem.items())
        rows.append(Row("train_step", f"EMO / dense (same active params), {threads} thr", r, note=note))
    return rows, details
