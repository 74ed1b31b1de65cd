"""Full training step of the tiny default (conf/experiment/emo_tiny.yaml): EMO vs standard MoE vs dense.

One step = ``emo_lightning.training.TrainStep`` (forward, the training objective with the step's global
balance, backward, clipping at 1.0, AdamW and scheduler steps: ``EMOLitModule``'s arithmetic without Lightning's
loop); the models and optimizer come from the conf/ presets. Batches come from the bundled shards (``make data``; synthetic packed documents when
they are absent) and are prefetched, so data loading is not timed here (see ``data_loader``).
The dense model has the same active parameters: every MoE layer becomes one SwiGLU FFN of hidden k*h.
Reports step time ratios, tokens/s and the peak tensor memory of one step.
"""

from __future__ import annotations

from itertools import cycle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.inputs import synthetic_batches
from benchmarks.timing import Row, measure, num_threads, peak_memory, profile_ops
from emo_lightning.model import EMOTransformer, ModelConfig
from emo_lightning.model.router import RouterOutput
from emo_lightning.presets import Preset, load_preset
from emo_lightning.training import TrainStep

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = {"emo": "conf/experiment/emo_tiny.yaml", "standard": "conf/experiment/stdmoe_tiny.yaml"}


def tiny_presets() -> dict[str, Preset]:
    """The tiny default experiment and its standard-MoE baseline (``make train`` / ``make train-baseline``)."""
    return {k: load_preset(REPO / path) for k, path in EXPERIMENTS.items()}


class DenseFFN(nn.Module):
    """Stand-in for ``MoELayer``: one SwiGLU of hidden k*h; returns a neutral ``RouterOutput``."""

    def __init__(self, d: int, hidden: int, num_routed: int, routed_k: int) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(d, 2 * hidden) * 0.02)
        self.w_out = nn.Parameter(torch.randn(hidden, d) * 0.02)
        self.e, self.k = num_routed, routed_k

    def forward(self, h: Tensor, doc_ids: Tensor, *_: object) -> tuple[Tensor, RouterOutput]:
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


def build_model(cfg: ModelConfig, dense: bool, dev: torch.device) -> EMOTransformer:
    torch.manual_seed(0)
    model = EMOTransformer(cfg)
    if dense:
        arch, router = cfg.arch, cfg.router
        for blk in model.blocks:
            blk.moe = DenseFFN(
                arch.d_model, router.top_k * arch.expert_hidden, router.num_routed, router.routed_k
            )
    return model.to(dev).train()


def load_batches(data: dict, n: int, dev: torch.device) -> tuple[list[dict[str, Tensor]], str]:
    """``n`` training batches from the bundled shards, or synthetic packed documents without them."""
    shards = REPO / data["train_shards"]
    b, s = data["batch_size"], data["seq_len"]
    keys = ("input_ids", "labels", "doc_ids")
    if not (shards / "manifest.json").exists():
        batches = synthetic_batches(n, b, s, 4096, median=150, dev=dev)
        return [
            {k: bt[k] for k in keys} for bt in batches
        ], "synthetic (no data/shards/train: run `make data`)"
    from emo_lightning.data import ShardDataModule

    dm = ShardDataModule(str(shards), seq_len=s, batch_size=b, num_workers=0, shuffle_buffer=100)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    return [{k: bt[k].to(dev) for k in keys} for bt in (next(it) for _ in range(n))], str(
        shards.relative_to(REPO)
    )


def make_step(model: EMOTransformer, preset: Preset, batches: list[dict[str, Tensor]]):
    """A closure running one full optimizer step (``emo_lightning.training.TrainStep``) on the next batch."""
    step, data = TrainStep(model, preset.optim), cycle(batches)
    return lambda: step.step(next(data))


def run(quick: bool = False, dev: torch.device | None = None) -> tuple[list[Row], dict]:
    dev = dev or torch.device("cpu")
    repeats, warmup = (2, 1) if quick else (11, 3)
    presets = tiny_presets()
    data = presets["emo"].data
    if quick:  # a smoke run: a few short rows
        data = {**data, "batch_size": 2, "seq_len": 64}
    batches, source = load_batches(data, 2 if quick else 8, dev)
    tokens = data["batch_size"] * data["seq_len"]
    models = {
        "emo": build_model(presets["emo"].model, False, dev),
        "standard": build_model(presets["standard"].model, False, dev),
        "dense": build_model(presets["standard"].model, True, dev),
    }
    steps = {k: make_step(m, presets["emo"], batches) for k, m in models.items()}
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
            details["profile_emo"] = profile_ops(steps["emo"], steps=1 if quick else 2, top=10)
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
