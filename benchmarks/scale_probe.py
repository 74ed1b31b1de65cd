"""``make gpu-scale-probe``: does EMO's full-model gap to the standard MoE shrink with scale? One GPU, < 8 min.

    python -m benchmarks.scale_probe [--dry] [--corpus DIR | --train-shards DIR] [--val-docs DIR] [--out DIR]
        [--tokens N] [--lr-emo LR] [--lr-standard LR] [--pool-scope running|document]
        [--balance aux_loss|bias|both] [--bias-gamma G] [--router-emo KEY=VALUE] [--router-standard KEY=VALUE]

Trains the standard MoE and EMO (the CPU study's best recipe: running pools, each model at its own best learning
rate) with the same data, seed, initial weights and token budget (``FULL``: d 512, 8 layers, 64 experts of 128
units, top-8 — ``conf/studies/emo_shared8_fine64.yaml`` scaled up; ~50M tokens each, 13.5x the CPU study's, at 20x
its FLOPs per token; bf16-mixed, one plain Lightning ``Trainer``, no DeepSpeed), then evaluates both with the
modularity toolkit (``emo_lightning.experts``):

* full-model loss on the whole val split, all experts; EMO also under leak-free pooled routing ``running:P``;
* keep 25% / 12.5% of the experts, chosen layer-wise from 8 calibration documents per domain (``layerwise_subset``,
  ``prune_model``), mean loss rise over the domains on 50 other documents per domain;
* router clustering NMI against the domains (``cluster_tokens``; a torch k-means where scikit-learn is absent);
* load imbalance and dead experts over the val split.

Training steps are planned from a short timed calibration fit of each model so that everything ends inside
``--budget-s`` (a slower device trains fewer tokens, reported). Without CUDA (or with ``--dry``) the same code runs
a few steps of a tiny model (``DRY``). Prints a table, writes ``scale_probe-<device>-<time>.{json,md}`` and
``scale_probe-latest.{json,md}`` under ``--out`` (the JSON also after training, marked incomplete). Needs torch,
lightning, torchmetrics, tokenizers, numpy and the pure-Python webdataset and braceexpand (docs/performance.md,
"Scale probe"); shards are built from ``--corpus`` when absent. User mistakes end with one line and status 2.
"""

from __future__ import annotations

import argparse
import difflib
import gc
import importlib.util
import json
import logging
import math
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.timing import machine, package_versions
from emo_lightning.errors import ArgumentParser, UserError, run_cli
from emo_lightning.model import ArchConfig, EMOTransformer, ModelConfig, RouterConfig, flops_per_token
from emo_lightning.optim import OptimConfig

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PROG = "gpu-scale-probe"
IGNORE_INDEX = -100
# imported by the training and evaluation path (pure-Python wheels for webdataset and braceexpand on a bare node)
REQUIRED = ("lightning", "torchmetrics", "tokenizers", "numpy", "yaml", "tqdm", "webdataset", "braceexpand")
MODELS = ("standard", "emo")
# The CPU study (docs/modularity.md; d 128, 4 layers, 64 experts of 32, top-8, 3.7M tokens, whole val split), for
# the last column of the table.
CPU_STUDY = {
    "tokens": 3_686_400,
    "gap_full": "+1.16% (running pools, 5 seeds; document pools +1.70%; each at its best LR +2.79%)",
    "gap_pooled": "+0.97% (running:32, 5 seeds)",
    "keep_0.25": "EMO +0.41%, std +9.74%",
    "keep_0.125": "EMO +1.85%, std +17.58%",
    "nmi": "EMO 0.133, std 0.072",
}


@dataclass(frozen=True)
class ProbeSizes:
    """Model, data and evaluation sizes of one probe: ``FULL`` on a GPU, ``DRY`` for the CPU smoke run."""

    d_model: int
    n_layers: int
    n_heads: int
    expert_hidden: int  # SwiGLU hidden units of one expert
    num_experts: int
    top_k: int
    seq_len: int  # tokens per row, training and evaluation
    batch_size: int  # rows per optimizer step
    tokens: int  # training tokens per model (the target; the time budget may cut it)
    warmup_fraction: float = 0.1  # linear LR warm-up over this share of the steps, then cosine to 0.1x
    calib_steps: int = 12  # timed calibration fit per model (includes compilation)
    calib_skip: int = 4  # first calibration steps not timed
    num_workers: int = 4  # DataLoader workers
    shuffle_buffer: int = 2000
    log_every: int = 25  # steps between progress lines and loss-curve points
    eval_batch: int = 64  # rows per evaluation batch (= batch_size: the compiled attention keeps its shape)
    val_docs_per_domain: int | None = None  # whole-split evaluation: None = every val document
    n_calib: int = 8  # calibration documents per domain (8-shot selection)
    n_eval: int = 50  # evaluation documents per domain for the keep rises and clustering
    keep: tuple[str, ...] = ("0.25", "0.125")
    running_pools: tuple[int, ...] = (8, 16, 32, 48)  # EMO leak-free pooled routings running:P
    clusters: int = 32
    cluster_tokens: int = 40_000
    budget_s: float = 450.0  # wall-clock budget of the whole probe (data, calibration, training, evaluation)
    eval_reserve_s: float = 150.0  # of it, kept for the evaluation when planning the training steps
    stage_grace_s: float = 90.0  # evaluation stages not started by budget_s + this are skipped (recorded)

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size


FULL = ProbeSizes(
    d_model=512, n_layers=8, n_heads=8, expert_hidden=128, num_experts=64, top_k=8,
    seq_len=1024, batch_size=64, tokens=50_000_000,
)  # fmt: skip
DRY = replace(
    FULL, d_model=32, n_layers=2, n_heads=2, expert_hidden=16, num_experts=8, top_k=2, seq_len=64, batch_size=4,
    tokens=6 * 4 * 64, calib_steps=3, calib_skip=1, num_workers=0, shuffle_buffer=100, log_every=2, eval_batch=8,
    val_docs_per_domain=24, n_calib=4, n_eval=8, running_pools=(2, 4), clusters=4, cluster_tokens=2000,
    budget_s=300.0, eval_reserve_s=60.0,
)  # fmt: skip


@dataclass
class Recipe:
    """What differs between the two models besides the router kind (the command-line flags)."""

    lr: dict[str, float] = field(default_factory=lambda: {"standard": 1.5e-3, "emo": 3e-3})
    pool_scope: str = "running"  # EMO only
    balance: str = "aux_loss"
    bias_gamma: float = 0.01  # 1e-3 balances too slowly in ~1000 steps (docs/modularity.md)
    overrides: dict[str, dict[str, str]] = field(default_factory=lambda: {"standard": {}, "emo": {}})
    attention: str = "auto"
    seed: int = 0


class Clock:
    """Seconds since the probe started; progress lines carry them."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0

    def say(self, msg: str) -> None:
        print(f"[{self():5.0f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ environment
def check_packages() -> dict[str, str]:
    """Versions of the packages the probe imports; a one-line error naming every missing one."""
    found, missing = package_versions(REQUIRED)
    found = {"torch": torch.__version__, **found}
    if missing:
        raise UserError(
            f"missing packages: {', '.join(missing)}",
            "install them (on an air-gapped node: pip install --no-index --no-deps from wheels brought along, "
            "docs/performance.md 'Scale probe')",
        )
    return found


def deepspeed_loaded() -> bool:
    return sys.modules.get("deepspeed") is not None


# ------------------------------------------------------------------------------------------------ data
def default_corpus(dry: bool) -> Path:
    """Where the corpus is looked for without ``--corpus``: the bundled one (dry), else the carried copy
    ``.scale_probe/corpus`` (device nodes) or ``../shared/corpus``."""
    if dry:
        return REPO / "data" / "corpus"
    for cand in (REPO / ".scale_probe" / "corpus", REPO.parent / "shared" / "corpus"):
        if (cand / "train").is_dir():
            return cand
    return REPO / ".scale_probe" / "corpus"


def corpus_files(folder: Path, what: str) -> list[Path]:
    files = sorted([*folder.glob("*.jsonl"), *folder.glob("*.jsonl.gz")]) if folder.is_dir() else []
    if not files:
        raise UserError(
            f"{what} {folder}: no *.jsonl or *.jsonl.gz files",
            "pass --corpus DIR holding train/ and val/ JSON Lines (text, domain), or --train-shards and --val-docs",
        )
    return files


def resolve_shards(args: argparse.Namespace, corpus: Path, work: Path, clock: Clock) -> tuple[Path, bool]:
    """(training shard folder, built now?): ``--train-shards``, else the usual ``make data`` / ``make
    data-shared`` folder, else shards built from ``<corpus>/train`` into ``<work>/shards/train``."""
    if args.train_shards is not None:
        if not (args.train_shards / "manifest.json").is_file():
            raise UserError(
                f"--train-shards {args.train_shards}: no manifest.json (not a shard folder)",
                "pass a folder written by `emo-data build-shards`, or --corpus to build one",
            )
        return args.train_shards, False
    usual = REPO / "data" / "shards" / ("train" if args.dry else "shared_train")
    if args.corpus is None and (usual / "manifest.json").is_file():
        return usual, False
    out = work / "shards" / "train"
    inputs = corpus_files(corpus / "train", "--corpus")
    if (out / "manifest.json").is_file():
        from data_tools.manifest import Manifest

        if Manifest.load(out).build.get("inputs") == [str(p) for p in inputs]:
            return out, False  # built from this corpus by an earlier run
    from data_tools.build import build_shards

    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    clock.say(
        f"data: building shards of {len(inputs)} files of {corpus / 'train'} into {out} ({workers} workers)"
    )
    res = build_shards(inputs, args.tokenizer, out, workers=workers, quiet=True, overwrite=True)
    clock.say(f"data: {res.tokens:,} tokens in {len(res.manifest.shards)} shards")
    return out, True


def check_tokenizer(tokenizer: Path, manifest: Any) -> None:
    """The evaluation tokenizer must be the one the shards were built with."""
    from data_tools.tokenizer import file_sha256

    want = (manifest.tokenizer or {}).get("sha256")
    if want and file_sha256(tokenizer) != want:
        raise UserError(
            f"--tokenizer {tokenizer}: not the tokenizer of the shards ({manifest.source})",
            "pass the tokenizer they were built with, or rebuild the shards",
        )


def load_val_docs(path: Path, tokenizer: Path, per_domain: int | None, seed: int) -> list[Any]:
    """Every val document (JSONL with ``domain``), or ``per_domain`` of each (seeded) for the dry run."""
    from emo_lightning.experts.documents import DocumentTokenizer, load_documents, split_documents

    docs = load_documents(path, DocumentTokenizer(tokenizer))
    if per_domain is not None:
        _, picked = split_documents(docs, 0, per_domain, seed)
        docs = [d for group in picked.values() for d in group]
    domains = {d.domain for d in docs}
    if len(domains) < 2:
        raise UserError(
            f"--val-docs {path}: {len(domains)} domain(s) found",
            "pass validation documents of several domains (a 'domain' field in every record)",
        )
    return docs


# ------------------------------------------------------------------------------------------------ models
def _coerce(raw: str, default: Any) -> Any:
    """A KEY=VALUE override's value, typed like the field's default (ValueError if it does not parse)."""
    word = raw.lower()
    if word in ("none", "null"):
        return None
    if isinstance(default, bool):
        if word not in ("true", "false"):
            raise ValueError(raw)
        return word == "true"
    if isinstance(default, int) or default is None:  # the router's None defaults are pool sizes (int | None)
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


def router_config(sz: ProbeSizes, kind: str, recipe: Recipe) -> RouterConfig:
    """The router of one model: ``sz``'s experts, the recipe's balance (and EMO's pool scope), then overrides."""
    base = RouterConfig(
        kind=kind,
        num_experts=sz.num_experts,
        num_shared=0,
        top_k=sz.top_k,
        seed=recipe.seed,
        balance=recipe.balance,
        bias_gamma=recipe.bias_gamma,
        pool_scope=recipe.pool_scope if kind == "emo" else "document",
    )
    names = {f.name for f in fields(RouterConfig)}
    changes = {}
    for key, raw in recipe.overrides[kind].items():
        if key not in names or key == "kind":
            close = difflib.get_close_matches(key, sorted(names - {"kind"}), n=1)
            hint = f"did you mean {close[0]}?" if close else f"router fields: {', '.join(sorted(names))}"
            raise UserError(f"--router-{kind} {key}=...: unknown router field", hint)
        try:
            changes[key] = _coerce(raw, getattr(base, key))
        except ValueError:
            kind_of = "true or false" if isinstance(getattr(base, key), bool) else "a number or none"
            raise UserError(f"--router-{kind} {key}={raw}: not a valid value", f"give {kind_of}") from None
    return replace(base, **changes)  # validated by RouterConfig (a ConfigError is a one-line user error)


def model_configs(sz: ProbeSizes, recipe: Recipe, vocab: int) -> dict[str, ModelConfig]:
    arch = ArchConfig(
        vocab_size=vocab,
        d_model=sz.d_model,
        n_layers=sz.n_layers,
        n_heads=sz.n_heads,
        expert_hidden=sz.expert_hidden,
        max_seq_len=sz.seq_len,
        attention_backend=recipe.attention,
    )
    return {kind: ModelConfig(arch=arch, router=router_config(sz, kind, recipe)) for kind in MODELS}


# ------------------------------------------------------------------------------------------------ training
def _callback_base() -> type:
    from lightning.pytorch.callbacks import Callback

    return Callback


class FitLog:
    """Lightning callback (built by :func:`fit_log`): step times, a loss curve, progress lines, a deadline."""

    def __init__(self, name: str, total: int, every: int, sync: bool, deadline: float | None, clock: Clock):
        self.name, self.total, self.every, self.sync = name, total, every, sync
        self.deadline, self.clock = deadline, clock
        self.times: list[float] = []
        self.curve: list[tuple[int, float]] = []
        self.start = self.end = 0.0
        self.steps = 0
        self.stopped_early = False

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        if self.every and (step % self.every == 0 or step == self.total):
            ce = float(pl_module.loss_terms["CE"])
            self.curve.append((step, round(ce, 4)))
            rate = step * batch_tokens(batch) / max(time.perf_counter() - self.start, 1e-9)
            self.clock.say(
                f"{self.name}: step {step}/{self.total}  train CE {ce:.4f}  {rate / 1e6:.2f}M tokens/s"
            )
        if self.deadline is not None and time.perf_counter() > self.deadline and not trainer.should_stop:
            trainer.should_stop = True
            self.stopped_early = True
            self.clock.say(f"{self.name}: time budget reached at step {step}: stopping early")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.end = time.perf_counter()
        self.steps = trainer.global_step

    def step_seconds(self, skip: int) -> float:
        """Median seconds per step after the first ``skip`` steps (compilation, warm-up)."""
        gaps = np.diff(self.times[skip:]) if len(self.times) > skip + 1 else np.diff(self.times)
        return float(np.median(gaps)) if len(gaps) else float("nan")


def fit_log(*args: Any, **kwargs: Any) -> Any:
    """A :class:`FitLog` that is a Lightning ``Callback`` (Lightning imported on use)."""
    cls = type("FitLogCallback", (FitLog, _callback_base()), {})
    return cls(*args, **kwargs)


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].numel())


def fit(
    cfg: ModelConfig,
    lr: float,
    sz: ProbeSizes,
    shards: Path,
    steps: int,
    dev: torch.device,
    log: Any,
    seed: int,
) -> tuple[Any, Any]:
    """One plain single-device Lightning fit of ``EMOLitModule`` (bf16-mixed on CUDA, no DeepSpeed, no
    checkpoints, no validation): (module, trainer)."""
    import lightning as L

    from emo_lightning.data import ShardDataModule
    from emo_lightning.lit_module import EMOLitModule

    warmup = max(1, round(sz.warmup_fraction * steps))
    dm = ShardDataModule(
        str(shards),
        None,
        seq_len=sz.seq_len,
        batch_size=sz.batch_size,
        num_workers=sz.num_workers,
        shuffle_buffer=sz.shuffle_buffer,
        seed=seed,
    )
    L.seed_everything(seed, verbose=False)
    module = EMOLitModule(arch=cfg.arch, router=cfg.router, optim=OptimConfig(lr=lr, warmup_steps=warmup))
    trainer = L.Trainer(
        accelerator="gpu" if dev.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if dev.type == "cuda" else "32-true",
        max_steps=steps,
        gradient_clip_val=1.0,
        logger=False,
        callbacks=[log],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=max(1, sz.log_every),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm)
    return module, trainer


def calibrate(
    cfgs: dict[str, ModelConfig],
    recipe: Recipe,
    sz: ProbeSizes,
    shards: Path,
    dev: torch.device,
    clock: Clock,
) -> tuple[dict[str, float], dict[str, ModelConfig], str | None]:
    """Seconds per training step of each model (median after warm-up), from a short fit; on CUDA a failing
    FlexAttention falls back to SDPA (the reason is returned)."""
    rates: dict[str, float] = {}
    fallback = None
    for kind in MODELS:
        log = fit_log(f"calibrate {kind}", sz.calib_steps, 0, True, None, clock)
        try:
            fit(cfgs[kind], recipe.lr[kind], sz, shards, sz.calib_steps, dev, log, recipe.seed)
        except Exception as err:
            if (
                isinstance(err, UserError)
                or dev.type != "cuda"
                or cfgs[kind].arch.attention_backend == "sdpa"
            ):
                raise
            fallback = (
                f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160] if str(err).strip() else ''}"
            )
            clock.say(f"calibrate {kind}: FlexAttention failed ({fallback}); retrying with SDPA")
            traceback.print_exc()
            cfgs = {k: replace(c, arch=replace(c.arch, attention_backend="sdpa")) for k, c in cfgs.items()}
            log = fit_log(f"calibrate {kind}", sz.calib_steps, 0, True, None, clock)
            fit(cfgs[kind], recipe.lr[kind], sz, shards, sz.calib_steps, dev, log, recipe.seed)
        rates[kind] = log.step_seconds(sz.calib_skip)
        clock.say(
            f"calibrate {kind}: {rates[kind] * 1e3:.1f} ms/step, {sz.tokens_per_step / rates[kind] / 1e6:.2f}M tokens/s"
        )
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rates, cfgs, fallback


def plan_steps(sz: ProbeSizes, rates: dict[str, float], time_left: float) -> tuple[int, int, bool]:
    """(steps, target steps, cut by the budget?): equal steps for both models, the target unless both fits
    (with 15% margin and 15 s of setup each) would not end within ``time_left``."""
    target = max(1, math.ceil(sz.tokens / sz.tokens_per_step))
    per_step = sum(rates.values()) * 1.15
    affordable = int(max(0.0, time_left - 30.0) / per_step) if per_step > 0 else target
    steps = max(1, min(target, affordable))
    return steps, target, steps < target


@dataclass
class Trained:
    """A trained model and how its training went."""

    model: EMOTransformer
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    mfu: float | None
    curve: list[tuple[int, float]]
    stopped_early: bool

    def info(self) -> dict[str, Any]:
        return dict(
            steps=self.steps,
            tokens=self.tokens,
            seconds=round(self.seconds, 1),
            tokens_per_s=round(self.tokens_per_s),
            mfu=None if self.mfu is None else round(self.mfu, 4),
            final_train_ce=self.curve[-1][1] if self.curve else None,
            stopped_early=self.stopped_early,
            curve=self.curve,
        )


def peak_flops(dev: torch.device) -> float | None:
    """Dense bf16 peak of the GPU (the MFU denominator of ``TokenThroughputMonitor``); None on a CPU."""
    if dev.type != "cuda":
        return None
    from emo_lightning.callbacks.throughput import dense_peak_flops

    return dense_peak_flops(torch.cuda.get_device_name(dev), torch.bfloat16)


def train(
    kind: str,
    cfg: ModelConfig,
    recipe: Recipe,
    sz: ProbeSizes,
    shards: Path,
    steps: int,
    dev: torch.device,
    deadline: float,
    clock: Clock,
    save: Path | None,
) -> Trained:
    log = fit_log(kind, steps, sz.log_every, False, deadline, clock)
    module, trainer = fit(cfg, recipe.lr[kind], sz, shards, steps, dev, log, recipe.seed)
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(save / f"{kind}.ckpt", weights_only=True)
    model = module.model.eval()
    del module, trainer  # optimizer states
    gc.collect()
    seconds = log.end - log.start
    tokens = log.steps * sz.tokens_per_step
    rate = tokens / max(seconds, 1e-9)
    peak = peak_flops(dev)
    mfu = rate * flops_per_token(cfg, sz.seq_len) / peak if peak else None
    clock.say(f"{kind}: {log.steps} steps, {tokens:,} tokens in {seconds:.0f} s ({rate / 1e6:.2f}M tokens/s)")
    return Trained(model, log.steps, tokens, seconds, rate, mfu, log.curve, log.stopped_early)


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def document_losses_on(
    model: EMOTransformer, n_docs: int, batches: Sequence[Any], routing: Any
) -> tuple[Any, torch.Tensor]:
    """``emo_lightning.experts.evaluate.document_losses`` on the model's device (the toolkit's own keeps its
    sums on the CPU): per-document loss sums and scored targets (CPU), plus the summed expert counts (L,E')."""
    from emo_lightning.experts.evaluate import DocLosses
    from emo_lightning.experts.routing import eval_routing

    dev = next(model.parameters()).device
    loss_sum = torch.zeros(n_docs, dtype=torch.float64, device=dev)
    tokens = torch.zeros(n_docs, dtype=torch.long, device=dev)
    counts = None
    with eval_routing(model, routing):
        for b in batches:
            ids, doc_ids, labels, index = (t.to(dev) for t in (b.input_ids, b.doc_ids, b.labels, b.doc_index))
            out = model(ids, doc_ids)
            layer_counts = torch.stack([lr.counts for lr in out.layers]).double()  # (L,E')
            counts = layer_counts if counts is None else counts + layer_counts
            ce = F.cross_entropy(
                out.logits.flatten(0, 1).float(),
                labels.flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="none",
            )
            flat = ((labels != IGNORE_INDEX) & (index >= 0)).flatten()
            idx = index.flatten()[flat]
            loss_sum.index_add_(0, idx, ce[flat].double())
            tokens.index_add_(0, idx, torch.ones_like(idx))
    return DocLosses(loss_sum.cpu(), tokens.cpu()), (counts.cpu() if counts is not None else torch.zeros(0))


def mean_loss(model: EMOTransformer, docs: Sequence[Any], batches: Sequence[Any], routing: Any) -> float:
    dl, _ = document_losses_on(model, len(docs), batches, routing)
    return float(dl.loss_sum.sum() / dl.tokens.sum().clamp(min=1))


@torch.no_grad()
def router_features_on(model: EMOTransformer, batches: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """``emo_lightning.experts.clustering.router_features`` on the model's device: (T, L*E') float32 router
    probabilities of every non-padding token (full routing) and its document index."""
    from emo_lightning.experts.routing import FULL, eval_routing

    dev = next(model.parameters()).device
    feats, index = [], []
    with eval_routing(model, FULL):
        for b in batches:
            out = model(b.input_ids.to(dev), b.doc_ids.to(dev), return_routes=True)
            keep = (b.doc_index >= 0).flatten()
            feats.append(
                torch.cat([lr.probs for lr in out.layers], -1).flatten(0, 1)[keep.to(dev)].float().cpu()
            )
            index.append(b.doc_index.flatten()[keep])
    return torch.cat(feats).numpy(), torch.cat(index).numpy()


def nmi_score(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Normalised mutual information, arithmetic normalisation (scikit-learn's ``normalized_mutual_info_score``)."""
    _, a = np.unique(labels, return_inverse=True)
    _, b = np.unique(clusters, return_inverse=True)
    if a.max(initial=0) == 0 and b.max(initial=0) == 0:
        return 1.0
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    p = table / table.sum()
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum())
    if abs(mi) < np.finfo(np.float64).eps:
        return 0.0
    ha = -float((pa[pa > 0] * np.log(pa[pa > 0])).sum())
    hb = -float((pb[pb > 0] * np.log(pb[pb > 0])).sum())
    return mi / ((ha + hb) / 2)


def kmeans_torch(
    z: torch.Tensor, k: int, seed: int, n_init: int = 4, max_iter: int = 300, tol: float = 1e-4
) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding, best of ``n_init`` by inertia (scikit-learn's defaults): labels (N,)."""
    gen = torch.Generator(device=z.device).manual_seed(seed)
    threshold = tol * float(z.var(0).mean())
    best, best_inertia = None, math.inf
    for _ in range(n_init):
        first = torch.randint(len(z), (1,), generator=gen, device=z.device)
        centres = z[first]
        d2 = ((z - centres) ** 2).sum(1)
        for _ in range(1, k):
            pick = torch.multinomial(d2.clamp_min(0) + 1e-30, 1, generator=gen)
            centres = torch.cat([centres, z[pick]])
            d2 = torch.minimum(d2, ((z - z[pick]) ** 2).sum(1))
        for _ in range(max_iter):
            assign = torch.cdist(z, centres).argmin(1)
            sums = torch.zeros_like(centres).index_add_(0, assign, z)
            n = torch.bincount(assign, minlength=k).unsqueeze(1)
            new = torch.where(n > 0, sums / n.clamp_min(1), centres)  # an empty cluster keeps its centre
            shift = float(((new - centres) ** 2).sum())
            centres = new
            if shift <= threshold:
                break
        assign = torch.cdist(z, centres).argmin(1)
        inertia = float(((z - centres[assign]) ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = assign, inertia
    return best


def cluster_torch(
    features: np.ndarray,
    labels: np.ndarray,
    k: int,
    max_tokens: int,
    seed: int,
    dev: torch.device,
    variance: float = 0.95,
) -> dict[str, Any]:
    """``cluster_tokens``'s method without scikit-learn: centre, PCA to ``variance``, L2-normalise, k-means; NMI
    and purity against ``labels``."""
    from emo_lightning.experts.clustering import purity  # the toolkit (imports the data stack)

    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(features), size=min(max_tokens, len(features)), replace=False))
    x = torch.from_numpy(features[pick]).to(dev, torch.float64)
    x = x - x.mean(0, keepdim=True)
    evals, evecs = torch.linalg.eigh(x.T @ x)  # ascending
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    ratio = (evals.cumsum(0) / evals.sum().clamp_min(1e-300)).cpu().numpy()
    dims = int(np.searchsorted(ratio, variance, side="right") + 1)
    dims = min(dims, x.shape[1])
    z = x @ evecs[:, :dims]
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    assign = kmeans_torch(z, k, seed).cpu().numpy()
    lab = np.asarray(labels)[pick]
    _, counts = np.unique(lab, return_counts=True)
    return {
        "method": "torch k-means (scikit-learn absent)",
        "k": k,
        "tokens": len(pick),
        "pca_dims": dims,
        "nmi": nmi_score(lab, assign),
        "purity": purity(lab, assign),
        "majority_baseline": float(counts.max() / len(lab)),
    }


def cluster(
    features: np.ndarray, labels: np.ndarray, sz: ProbeSizes, seed: int, dev: torch.device
) -> dict[str, Any]:
    """Router clustering: the toolkit's ``cluster_tokens`` (scikit-learn, as in the CPU study) if importable, else
    :func:`cluster_torch`."""
    if importlib.util.find_spec("sklearn") is None:
        return cluster_torch(features, labels, sz.clusters, sz.cluster_tokens, seed, dev)
    from emo_lightning.experts.clustering import cluster_tokens

    res = cluster_tokens(features, labels, sz.clusters, max_tokens=sz.cluster_tokens, seed=seed)
    res.pop("clusters", None)
    return {"method": "scikit-learn (cluster_tokens)", **res}


def cpu_copy(model: EMOTransformer) -> EMOTransformer:
    """The model on the CPU in eval mode (the layer-wise selection of the toolkit runs there)."""
    if next(model.parameters()).device.type == "cpu":
        return model
    cpu = EMOTransformer(model.cfg)
    cpu.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return cpu.eval()


def eval_full(model: EMOTransformer, val_docs: list[Any], sz: ProbeSizes, pad: int) -> dict[str, Any]:
    """Loss on the whole val split with all experts (per domain; load imbalance and dead experts from the expert
    counts) and, for EMO, under leak-free pooled routing ``running:P``."""
    from emo_lightning.experts.documents import pack_documents
    from emo_lightning.experts.evaluate import domain_table
    from emo_lightning.experts.routing import FULL, Routing
    from emo_lightning.metrics import routing_stats as rs

    rc = model.cfg.router
    val = pack_documents(val_docs, sz.seq_len, sz.eval_batch, pad)
    dl, counts = document_losses_on(model, len(val_docs), val, FULL)
    table = domain_table(val_docs, dl)
    res: dict[str, Any] = {
        "full": {"loss": table["all"]["loss"], "tokens": table["all"]["tokens"], "domains": table},
        "load": {
            "imbalance": float(rs.load_imbalance(counts).mean()),
            "dead_fraction": float(rs.dead_fraction(counts).mean()),
        },
        "routing": {"full": table["all"]["loss"]},
    }
    if rc.kind == "emo":  # the standard router has no pools
        for p in sz.running_pools:
            if rc.routed_k <= p <= rc.num_routed:
                r = Routing("running", p)
                res["routing"][str(r)] = mean_loss(model, val_docs, val, r)
    return res


def pack_tight(docs: Sequence[Any], seq_len: int, pad: int) -> list[Any]:
    """One batch of just enough rows for ``docs`` (the selection runs on the CPU: no padding rows)."""
    from emo_lightning.experts.documents import pack_documents

    rows = max(1, math.ceil(sum(len(d.tokens) for d in docs) / seq_len))
    return pack_documents(docs, seq_len, rows, pad)


def eval_keep(
    model: EMOTransformer,
    calib: dict[str, list[Any]],
    evals: dict[str, list[Any]],
    sz: ProbeSizes,
    pad: int,
) -> dict[str, Any]:
    """Per keep fraction: experts chosen layer-wise from the calibration documents of each domain (the toolkit's
    ``layerwise_subset`` on a CPU copy), the model cut to them (``prune_model``) and evaluated on the domain's
    evaluation documents; rise = loss / full-model loss on the same documents - 1, and its mean over domains."""
    from emo_lightning.experts.documents import pack_documents
    from emo_lightning.experts.prune import prune_model
    from emo_lightning.experts.routing import FULL
    from emo_lightning.experts.selection import layerwise_subset, parse_keep

    dev = next(model.parameters()).device
    rc = model.cfg.router
    cpu = cpu_copy(model)
    keeps: dict[str, Any] = {label: {"experts": parse_keep(label, rc), "domains": {}} for label in sz.keep}
    for domain, docs in evals.items():
        ev = pack_documents(docs, sz.seq_len, sz.eval_batch, pad)
        full = mean_loss(model, docs, ev, FULL)
        cb = pack_tight(calib[domain], sz.seq_len, pad)
        for entry in keeps.values():
            subset = layerwise_subset(cpu, cb, entry["experts"])
            pruned = prune_model(cpu, subset.layers).to(dev).eval()
            loss = mean_loss(pruned, docs, ev, FULL)
            del pruned
            entry["domains"][domain] = {
                "full": full,
                "loss": loss,
                "rise": loss / full - 1,
                "layers": subset.layers,
            }
    for entry in keeps.values():
        entry["rise"] = float(np.mean([d["rise"] for d in entry["domains"].values()]))
    return keeps


def eval_clustering(
    model: EMOTransformer, evals: dict[str, list[Any]], sz: ProbeSizes, pad: int, seed: int
) -> dict[str, Any]:
    """Router clustering of the evaluation documents' tokens against their domains (NMI, purity)."""
    from emo_lightning.experts.documents import pack_documents

    all_eval = [d for group in evals.values() for d in group]
    feats, index = router_features_on(model, pack_documents(all_eval, sz.seq_len, sz.eval_batch, pad))
    labels = np.asarray([all_eval[i].domain for i in index])
    return cluster(feats, labels, sz, seed, next(model.parameters()).device)


def failure(err: BaseException) -> str:
    """``Type: message at path:line`` of the deepest frame in this repository."""
    where = "outside the repository"
    for fr in reversed(traceback.extract_tb(err.__traceback__)):
        path = Path(fr.filename).resolve()
        if REPO in path.parents and ".venv" not in path.parts:
            where = f"{path.relative_to(REPO)}:{fr.lineno}"
            break
    msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    return f"{type(err).__name__}: {msg} at {where}"


def evaluate(
    trained: dict[str, Trained],
    val_docs: list[Any],
    calib: dict[str, list[Any]],
    evals: dict[str, list[Any]],
    sz: ProbeSizes,
    pad: int,
    seed: int,
    clock: Clock,
    report: dict[str, Any],
    out: Path,
) -> None:
    """Each stage for both models before the next (the full-model gap first), each guarded: a failing stage is
    recorded in ``report["errors"]`` and the others still run; the results are written after every stage."""
    stages = {
        "full": lambda m: eval_full(m, val_docs, sz, pad),
        "keep": lambda m: {"keep": eval_keep(m, calib, evals, sz, pad)},
        "clustering": lambda m: {"clustering": eval_clustering(m, evals, sz, pad, seed)},
    }
    for stage, fn in stages.items():
        for kind in MODELS:
            t0 = time.perf_counter()
            if clock() > sz.budget_s + sz.stage_grace_s:  # keep clear of the device command's time limit
                report["errors"][f"{kind} {stage}"] = (
                    f"skipped: {clock():.0f} s, past the budget of {sz.budget_s:.0f} s"
                )
                clock.say(f"{kind} {stage}: {report['errors'][f'{kind} {stage}']}")
                continue
            part = report["models"].setdefault(kind, {"router": asdict(trained[kind].model.cfg.router)})
            try:
                part.update(fn(trained[kind].model))
            except Exception as err:  # recorded, the other stages still run
                report["errors"][f"{kind} {stage}"] = failure(err)
                clock.say(f"{kind} {stage}: FAILED {failure(err)}")
                traceback.print_exc()
                continue
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            part.setdefault("seconds", {})[stage] = round(time.perf_counter() - t0, 1)
            clock.say(f"{kind}: {describe(part, stage)} ({time.perf_counter() - t0:.0f} s)")
        report["summary"] = summarise(report["models"])
        report["elapsed_s"] = round(clock(), 1)
        write(out, report)


def describe(part: dict[str, Any], stage: str) -> str:
    """One progress line of a finished stage."""
    if stage == "full":
        routes = ", ".join(f"{k} {v:.4f}" for k, v in part["routing"].items())
        return f"val loss {part['full']['loss']:.4f} over {part['full']['tokens']:,} targets ({routes})"
    if stage == "keep":
        e = part["router"]["num_experts"]
        return "keep " + ", ".join(
            f"{k} ({v['experts']}/{e}) {v['rise']:+.2%}" for k, v in part["keep"].items()
        )
    c = part["clustering"]
    return f"router clustering NMI {c['nmi']:.3f} ({c['method']})"


# ------------------------------------------------------------------------------------------------ report
def summarise(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Gaps and rises of EMO vs the standard MoE from what the per-model results hold so far."""
    std, emo = models.get("standard", {}), models.get("emo", {})
    out: dict[str, Any] = {}
    if "full" in std and "full" in emo:
        base = std["full"]["loss"]
        pooled = {k: v for k, v in emo["routing"].items() if k != "full"}
        best = min(pooled, key=pooled.get) if pooled else None
        out.update(
            loss_standard=base,
            loss_emo=emo["full"]["loss"],
            gap_full=emo["full"]["loss"] / base - 1,
            best_pooled_routing=best,
            loss_emo_pooled=pooled[best] if best else None,
            gap_pooled=pooled[best] / base - 1 if best else None,
        )
    if "keep" in std and "keep" in emo:
        out["keep"] = {k: {m: models[m]["keep"][k]["rise"] for m in MODELS} for k in emo["keep"]}
    if "clustering" in std and "clustering" in emo:
        out["nmi"] = {m: models[m]["clustering"]["nmi"] for m in MODELS}
    return out


def _pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:+.{digits}f}%"


def table(report: dict[str, Any]) -> str:
    """The summary table (Markdown): what has been measured so far."""
    m, s, tr = report["models"], report.get("summary") or {}, report["training"]
    lines = ["| | standard MoE | EMO | EMO vs standard | CPU study |", "|---|---|---|---|---|"]
    if "gap_full" in s:
        lines.append(
            f"| val loss, all experts (whole val split) | {s['loss_standard']:.4f} | {s['loss_emo']:.4f} | "
            f"**{_pct(s['gap_full'])}** | {CPU_STUDY['gap_full']} |"
        )
        if s["best_pooled_routing"]:
            lines.append(
                f"| EMO, best leak-free pooled routing (`{s['best_pooled_routing']}`) | | "
                f"{s['loss_emo_pooled']:.4f} | **{_pct(s['gap_pooled'])}** | {CPU_STUDY['gap_pooled']} |"
            )
    for k, v in s.get("keep", {}).items():
        n, e = m["emo"]["keep"][k]["experts"], m["emo"]["router"]["num_experts"]
        lines.append(
            f"| keep {float(k):.1%} ({n}/{e}), 8-shot: mean loss rise | {_pct(v['standard'])} | {_pct(v['emo'])} "
            f"| | {CPU_STUDY.get(f'keep_{k}', '')} |"
        )
    if "nmi" in s:
        nmi = s["nmi"]
        lines.append(
            f"| router clustering NMI | {nmi['standard']:.3f} | {nmi['emo']:.3f} | | {CPU_STUDY['nmi']} |"
        )
    if all("load" in m.get(k, {}) for k in MODELS):
        cells = " | ".join(
            f"{m[k]['load']['imbalance']:.2f}, {m[k]['load']['dead_fraction']:.1%}" for k in MODELS
        )
        lines.append(f"| val load imbalance (max/mean), dead experts | {cells} | | |")
    cells = " | ".join(f"{tr[k]['tokens']:,} ({tr[k]['steps']})" for k in MODELS)
    lines.append(f"| trained tokens (steps) | {cells} | | {CPU_STUDY['tokens']:,} |")
    cells = " | ".join(
        f"{tr[k]['tokens_per_s'] / 1e6:.2f}M, " + ("n/a" if tr[k]["mfu"] is None else f"{tr[k]['mfu']:.1%}")
        for k in MODELS
    )
    lines.append(f"| training tokens/s, MFU (dense bf16 peak) | {cells} | | |")
    lines.append("| final train CE | " + " | ".join(f"{tr[k]['final_train_ce']}" for k in MODELS) + " | | |")
    return "\n".join(lines)


def routing_table(report: dict[str, Any]) -> str:
    """EMO's routings and the per-domain full-model losses (empty before the full-model stage)."""
    m = report["models"]
    if not all("full" in m.get(k, {}) for k in MODELS):
        return ""
    std = m["standard"]["full"]["loss"]
    lines = ["| EMO routing | val loss | vs standard (all experts) |", "|---|---|---|"]
    for k, v in m["emo"]["routing"].items():
        lines.append(f"| `{k}` | {v:.4f} | {_pct(v / std - 1)} |")
    domains = [d for d in m["emo"]["full"]["domains"] if d != "all"]
    lines += ["", "| domain | standard loss | EMO loss | EMO vs standard |", "|---|---|---|---|"]
    for d in domains:
        a, b = m["standard"]["full"]["domains"][d]["loss"], m["emo"]["full"]["domains"][d]["loss"]
        lines.append(f"| {d} | {a:.4f} | {b:.4f} | {_pct(b / a - 1)} |")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    sz, rec = report["sizes"], report["recipe"]
    head = [
        f"# gpu-scale-probe {report['timestamp']} ({'dry run' if report['dry'] else 'full run'})",
        "",
        f"Device: {report['device_name']}; torch {report['packages'].get('torch')}, lightning "
        f"{report['packages'].get('lightning')}; {report['elapsed_s']:.0f} s"
        + (
            ""
            if report["complete"]
            else "; **incomplete** (evaluation pending or failed: see errors in the JSON)"
        )
        + ".",
        "",
        f"Models: d {sz['d_model']}, {sz['n_layers']} layers, {sz['n_heads']} heads, {sz['num_experts']} experts of "
        f"{sz['expert_hidden']} units, top-{sz['top_k']}, no shared expert; rows {sz['batch_size']} x {sz['seq_len']} "
        f"tokens. Standard MoE at LR {rec['lr']['standard']:g}, EMO at LR {rec['lr']['emo']:g} with "
        f"`pool_scope: {rec['pool_scope']}`; balance `{rec['balance']}`"
        + (f" (gamma {rec['bias_gamma']:g})" if rec["balance"] != "aux_loss" else "")
        + f"; seed {rec['seed']}; attention {report['attention']}."
        + (f" Overrides: {rec['overrides']}." if any(rec["overrides"].values()) else ""),
        "",
        f"Data: {report['data']['train_tokens']:,} training tokens ({report['data']['epochs']:.2f} epochs per model); "
        f"{report['data']['val_docs']:,} val documents of {len(report['data']['domains'])} domains"
        f"; keep rises and NMI on {sz['n_eval']} documents per domain, subsets from {sz['n_calib']}."
        + (
            f" **Time budget cut the target of {report['plan']['target_steps']} steps.**"
            if report["plan"]["cut"]
            else ""
        ),
        "",
        table(report),
    ]
    if routing_table(report):
        head += [
            "",
            "The best pooled routing is picked on the same val split it is reported on (a mild selection).",
            "",
            routing_table(report),
        ]
    head += ["", *(f"FAILED {name}: {err}" for name, err in report["errors"].items())]
    return "\n".join(head) + "\n"


def write(out: Path, report: dict[str, Any]) -> list[Path]:
    """scale_probe-<device>-<stamp>.{json,md} and scale_probe-latest.{json,md} under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    body = json.dumps(report, indent=1, default=str)
    md = markdown(report)
    paths = []
    for name in (f"scale_probe-{report['device']}-{report['timestamp']}", "scale_probe-latest"):
        for suffix, text in ((".json", body), (".md", md)):
            path = out / f"{name}{suffix}"
            path.write_text(text)
            paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------ main
def _override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="a few steps of a tiny model (automatic without CUDA)")
    ap.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="train/ and val/ JSON Lines (text, domain); shards are built from train/ when absent "
        "(default: .scale_probe/corpus or ../shared/corpus; dry: data/corpus)",
    )
    ap.add_argument(
        "--train-shards", type=Path, default=None, help="pre-built training shards (emo-data build-shards)"
    )
    ap.add_argument(
        "--val-docs", type=Path, default=None, help="evaluation documents (default: <corpus>/val)"
    )
    ap.add_argument("--tokenizer", type=Path, default=REPO / "data" / "tokenizer.json")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument(
        "--work-dir", type=Path, default=REPO / "runs" / "scale_probe", help="built shards, checkpoints"
    )
    ap.add_argument("--tokens", type=float, default=None, help="training tokens per model (FULL: 5e7)")
    ap.add_argument(
        "--budget-s", type=float, default=None, help="wall-clock budget of the whole probe (FULL: 450)"
    )
    ap.add_argument("--lr-emo", type=float, default=3e-3, help="EMO peak LR (CPU study best: 3e-3..6e-3)")
    ap.add_argument("--lr-standard", type=float, default=1.5e-3, help="standard-MoE peak LR (CPU study best)")
    ap.add_argument(
        "--pool-scope", choices=("running", "document"), default="running", help="EMO pools in training"
    )
    ap.add_argument("--balance", choices=("aux_loss", "bias", "both"), default="aux_loss", help="both models")
    ap.add_argument("--bias-gamma", type=float, default=0.01, help="bias update step (balance bias/both)")
    ap.add_argument(
        "--router-emo",
        type=_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any RouterConfig field of the EMO model (repeatable), e.g. pool_min=16",
    )
    ap.add_argument("--router-standard", type=_override, action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--attention",
        choices=("auto", "flex", "sdpa"),
        default="auto",
        help="attention backend (auto: FlexAttention on CUDA; falls back to SDPA if it fails)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-ckpt", action="store_true", help="write <work-dir>/ckpt/{standard,emo}.ckpt")
    return ap


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    clock = Clock()
    packages = check_packages()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.dry = args.dry or dev.type != "cuda"
    sz = DRY if args.dry else FULL
    if args.tokens is not None:
        if args.tokens < sz.tokens_per_step:
            raise UserError(f"--tokens {args.tokens:g}: fewer than one step ({sz.tokens_per_step:,} tokens)")
        sz = replace(sz, tokens=int(args.tokens))
    if args.budget_s is not None:
        sz = replace(sz, budget_s=args.budget_s)
    for name in ("lr_emo", "lr_standard", "bias_gamma"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be > 0")
    if dev.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors; other jobs share the cores
    import lightning  # noqa: F401  (sets its loggers to INFO on import: quieten them after)

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    recipe = Recipe(
        lr={"standard": args.lr_standard, "emo": args.lr_emo},
        pool_scope=args.pool_scope,
        balance=args.balance,
        bias_gamma=args.bias_gamma,
        overrides={"standard": dict(args.router_standard), "emo": dict(args.router_emo)},
        attention=args.attention,
        seed=args.seed,
    )
    for kind in MODELS:  # a bad override fails before any data work
        router_config(sz, kind, recipe)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(machine()["cpu"])
    clock.say(f"gpu-scale-probe on {device_name} ({'dry run' if args.dry else 'full run'})")

    # data: training shards (built from the corpus when absent) and the val documents
    if not args.tokenizer.is_file():
        raise UserError(
            f"--tokenizer {args.tokenizer}: no such file", "pass the tokenizer.json of the shards"
        )
    corpus = args.corpus or default_corpus(args.dry)
    shards, built = resolve_shards(args, corpus, args.work_dir, clock)
    from data_tools.manifest import Manifest

    manifest = Manifest.load(shards)
    train_tokens = sum(s.tokens for s in manifest.shards)
    check_tokenizer(args.tokenizer, manifest)
    val_path = args.val_docs or corpus / "val"
    if val_path.is_dir() or not val_path.is_file():
        corpus_files(val_path, "--val-docs")
    val_docs = load_val_docs(val_path, args.tokenizer, sz.val_docs_per_domain, args.seed)
    from emo_lightning.experts.documents import DocumentTokenizer, split_documents

    pad = DocumentTokenizer(args.tokenizer).pad_id
    calib, evals = split_documents(val_docs, sz.n_calib, sz.n_eval, args.seed)
    short = {d: len(evals[d]) for d in evals if len(evals[d]) < sz.n_eval}
    if short:
        clock.say(f"note: fewer than {sz.n_eval} evaluation documents in {short}")
    clock.say(
        f"data: {shards} ({train_tokens:,} tokens); {len(val_docs):,} val documents of {len(evals)} domains"
    )
    cfgs = model_configs(sz, recipe, manifest.vocab_size)
    from emo_lightning.model import param_counts

    pc = param_counts(cfgs["emo"])
    clock.say(
        f"model: {pc.total:,} parameters ({pc.active:,} active), "
        f"{flops_per_token(cfgs['emo'], sz.seq_len) / 1e6:.0f} MFLOP per training token; target {sz.tokens:,} tokens"
    )

    # calibration, plan, training
    rates, cfgs, fallback = calibrate(cfgs, recipe, sz, shards, dev, clock)
    train_deadline = clock.t0 + sz.budget_s - sz.eval_reserve_s
    steps, target, cut = plan_steps(sz, rates, train_deadline - time.perf_counter())
    clock.say(
        f"plan: {steps} steps x {sz.tokens_per_step:,} tokens per model"
        + (f" (time budget: target {target})" if cut else "")
    )
    save = args.work_dir / "ckpt" if args.save_ckpt else None
    trained: dict[str, Trained] = {}
    per_step = sum(rates.values())
    for i, kind in enumerate(MODELS):
        share = rates[kind] / per_step if i == 0 else 1.0
        left = train_deadline - time.perf_counter()
        deadline = min(train_deadline, time.perf_counter() + max(left * share * 1.2, 0.0) + 20.0)
        trained[kind] = train(kind, cfgs[kind], recipe, sz, shards, steps, dev, deadline, clock, save)
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    report: dict[str, Any] = {
        "timestamp": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
        "dry": args.dry,
        "device": dev.type,
        "device_name": device_name,
        "packages": packages,
        "python": platform.python_version(),
        "sizes": asdict(sz),
        "recipe": asdict(recipe),
        "attention": cfgs["emo"].arch.attention_backend
        + (f" (FlexAttention failed: {fallback})" if fallback else ""),
        "data": {
            "train_shards": str(shards),
            "built_now": built,
            "train_tokens": train_tokens,
            "epochs": trained["emo"].tokens / max(train_tokens, 1),
            "val_docs": len(val_docs),
            "val_path": str(val_path),
            "domains": sorted(evals),
        },
        "calibration_s_per_step": rates,
        "plan": {"steps": steps, "target_steps": target, "cut": cut},
        "flops_per_token": flops_per_token(cfgs["emo"], sz.seq_len),
        "training": {k: t.info() for k, t in trained.items()},
        "models": {},
        "errors": {},
        "complete": False,
        "elapsed_s": round(clock(), 1),
    }
    write(args.out, report)

    # evaluation
    evaluate(trained, val_docs, calib, evals, sz, pad, args.seed, clock, report, args.out)
    report["complete"] = not report["errors"]
    report["deepspeed_imported"] = deepspeed_loaded()
    report["elapsed_s"] = round(clock(), 1)
    paths = write(args.out, report)
    print()
    print(table(report))
    print()
    print(routing_table(report))
    for name, err in report["errors"].items():
        print(f"FAILED {name}: {err}")
    print(
        f"\n{len(report['errors'])} failed stage(s) in {report['elapsed_s']:.0f} s; wrote {paths[0]}, {paths[1]}"
    )
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    run_cli(PROG, main)
