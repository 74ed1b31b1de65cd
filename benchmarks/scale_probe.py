"""``make gpu-scale-probe``: does EMO's full-model gap to the standard MoE shrink with scale? One GPU, < 8 min.

    python -m benchmarks.scale_probe [--dry] [--corpus DIR | --train-shards DIR] [--val-docs DIR] [--out DIR]
        [--tokens N] [--lr-emo LR] [--lr-standard LR] [--pool-scope running|document]
        [--balance aux_loss|bias|both] [--bias-gamma G] [--router-emo KEY=VALUE] [--router-standard KEY=VALUE]

Trains the standard MoE and EMO with the same data, seed, initial weights and token budget, then evaluates both
with the modularity toolkit (``emo_lightning.experts``). The models are the conf/ presets
``conf/studies/{emo,stdmoe}_scale_probe.yaml`` (the CPU study's best recipe, running pools, each model at its own
learning rate, scaled to d 512, 8 layers, 64 experts of 128 units, top-8, rows 64 x 1024: ~50M tokens each, 13.5x
the CPU study's, at 20x its FLOPs per token), composed by ``emo fit``'s parser with the flags as overrides; one
plain Lightning ``Trainer`` of ``EMOLitModule`` (bf16-mixed, no DeepSpeed). Evaluation:

* full-model loss on the whole val split, all experts (``document_losses``); EMO also under leak-free pooled
  routing ``running:P``; load imbalance and dead experts from the same pass;
* keep 25% / 12.5% of the experts, chosen layer-wise from 8 calibration documents per domain (``layerwise_subset``,
  ``prune_model``), mean loss rise over the domains on 50 other documents per domain;
* router clustering NMI against the domains (``router_features``, ``cluster_tokens``, on the GPU).

Training steps are planned from a short timed calibration fit of each model so that everything ends inside
``--budget-s`` (a slower device trains fewer tokens, reported). Without CUDA (or with ``--dry``) the same code runs
a few steps of a tiny model (``DRY``: its model sizes are overrides of the presets). Prints a table, writes
``scale_probe-<device>-<time>.{json,md}`` and ``scale_probe-latest.{json,md}`` under ``--out`` (the JSON also after
training, marked incomplete). Needs torch, lightning, torchmetrics, tokenizers, numpy and the pure-Python wheels
``make gpu-prepare`` downloads (the presets' parser, webdataset; docs/performance.md); shards are built from
``--corpus`` when absent. User mistakes end with one line and status 2.
"""

from __future__ import annotations

import argparse
import gc
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
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.timing import machine, package_versions
from emo_lightning.errors import ArgumentParser, UserError, run_cli
from emo_lightning.model import EMOTransformer, ModelConfig, flops_per_token

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PROG = "gpu-scale-probe"
# imported by the training and evaluation path (pure-Python wheels for the rest on a bare node: make gpu-prepare)
REQUIRED = (
    "lightning", "torchmetrics", "tokenizers", "numpy", "yaml", "tqdm", "webdataset", "braceexpand",
    "jsonargparse", "omegaconf", "docstring_parser", "typeshed_client",
)  # fmt: skip
MODELS = ("standard", "emo")
PRESETS = {"standard": "conf/studies/stdmoe_scale_probe.yaml", "emo": "conf/studies/emo_scale_probe.yaml"}
# The CPU study (docs/modularity.md; d 128, 4 layers, 64 experts of 32, top-8, 3.7M tokens, whole val split), for
# the last column of the table.
CPU_STUDY = {
    "tokens": 3_686_400,
    "gap_full": "+1.02% (running pools at LR 6e-3, 3 seeds; document pools +1.93%)",
    "gap_pooled": "+0.91% (running:32, 3 seeds)",
    "keep_0.25": "EMO +0.36%, std +9.74%",
    "keep_0.125": "EMO +2.07%, std +17.58%",
    "nmi": "EMO 0.133, std 0.072",
}


@dataclass(frozen=True)
class ProbeSizes:
    """Training and evaluation sizes of one probe: ``FULL`` on a GPU, ``DRY`` for the CPU smoke run (the model and
    its rows come from the presets; ``model`` holds the dry run's overrides of them)."""

    tokens: int  # training tokens per model (the target; the time budget may cut it)
    model: tuple[str, ...] = ()  # preset overrides, command-line style
    warmup_fraction: float = 0.1  # linear LR warm-up over this share of the steps, then cosine to 0.1x
    calib_steps: int = 12  # timed calibration fit per model (includes compilation)
    calib_skip: int = 4  # first calibration steps not timed
    num_workers: int = 4  # DataLoader workers
    shuffle_buffer: int = 2000
    log_every: int = 25  # steps between progress lines and loss-curve points
    eval_batch: int = (
        64  # rows per evaluation batch (= the training rows: the compiled attention keeps its shape)
    )
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


FULL = ProbeSizes(tokens=50_000_000)
DRY = replace(
    FULL, tokens=6 * 4 * 64, calib_steps=3, calib_skip=1, num_workers=0, shuffle_buffer=100, log_every=2,
    eval_batch=8, val_docs_per_domain=24, n_calib=4, n_eval=8, running_pools=(2, 4), clusters=4,
    cluster_tokens=2000, budget_s=300.0, eval_reserve_s=60.0,
    model=(
        "--model.arch.d_model", "32", "--model.arch.n_layers", "2", "--model.arch.n_heads", "2",
        "--model.arch.expert_hidden", "16", "--model.arch.max_seq_len", "64", "--model.router.num_experts", "8",
        "--model.router.top_k", "2", "--data.seq_len", "64", "--data.batch_size", "4",
    ),
)  # fmt: skip


@dataclass
class Probe:
    """One model of the probe: its composed preset and the overrides that made it."""

    preset: Any  # emo_lightning.presets.Preset
    overrides: list[str]

    @property
    def config(self) -> ModelConfig:
        return self.preset.model

    @property
    def seq_len(self) -> int:
        return int(self.preset.data["seq_len"])

    @property
    def batch_size(self) -> int:
        return int(self.preset.data["batch_size"])

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size


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
            "install them (an air-gapped node: the wheels of `make gpu-prepare`, docs/performance.md)",
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
def recipe_overrides(args: argparse.Namespace, kind: str) -> list[str]:
    """The command-line flags given as ``emo fit`` overrides of the ``kind`` preset (the parser validates them)."""
    flags = {
        "--model.optim.lr": args.lr_emo if kind == "emo" else args.lr_standard,
        "--model.router.pool_scope": args.pool_scope if kind == "emo" else None,
        "--model.router.balance": args.balance,
        "--model.router.bias_gamma": args.bias_gamma,
        "--model.router.seed": args.seed,
        "--model.arch.attention_backend": args.attention,
    }
    out = [part for key, value in flags.items() if value is not None for part in (key, str(value))]
    for key, value in getattr(args, f"router_{kind}"):
        out += [f"--model.router.{key}", value]
    return out


def load_probes(args: argparse.Namespace, sz: ProbeSizes, vocab: int) -> dict[str, Probe]:
    """Both models from their presets: the dry sizes, the shards' vocabulary, then the flags."""
    from emo_lightning.presets import load_preset

    probes = {}
    for kind in MODELS:
        overrides = [*sz.model, "--model.arch.vocab_size", str(vocab), *recipe_overrides(args, kind)]
        preset = load_preset(Path(__file__).resolve().parents[1] / PRESETS[kind], overrides)
        probes[kind] = Probe(preset, overrides)
    return probes


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
    probe: Probe, sz: ProbeSizes, shards: Path, steps: int, dev: torch.device, log: Any, seed: int
) -> tuple[Any, Any]:
    """One plain single-device Lightning fit of ``EMOLitModule`` (bf16-mixed on CUDA, no DeepSpeed, no
    checkpoints, no validation): (module, trainer). The preset's optimizer, warm-up scaled to the steps."""
    import lightning as L

    from emo_lightning.data import ShardDataModule
    from emo_lightning.lit_module import EMOLitModule

    warmup = max(1, round(sz.warmup_fraction * steps))
    dm = ShardDataModule(
        str(shards),
        None,
        seq_len=probe.seq_len,
        batch_size=probe.batch_size,
        num_workers=sz.num_workers,
        shuffle_buffer=sz.shuffle_buffer,
        seed=seed,
    )
    L.seed_everything(seed, verbose=False)
    cfg = probe.config
    optim = replace(probe.preset.optim, warmup_steps=warmup, decay_steps=None)
    module = EMOLitModule(arch=cfg.arch, router=cfg.router, optim=optim)
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
    probes: dict[str, Probe], sz: ProbeSizes, shards: Path, dev: torch.device, clock: Clock, seed: int
) -> tuple[dict[str, float], dict[str, Probe], str | None]:
    """Seconds per training step of each model (median after warm-up), from a short fit; on CUDA a failing
    FlexAttention falls back to SDPA (the reason is returned)."""
    rates: dict[str, float] = {}
    fallback = None
    for kind in MODELS:
        log = fit_log(f"calibrate {kind}", sz.calib_steps, 0, True, None, clock)
        try:
            fit(probes[kind], sz, shards, sz.calib_steps, dev, log, seed)
        except Exception as err:
            if (
                isinstance(err, UserError)
                or dev.type != "cuda"
                or probes[kind].config.arch.attention_backend == "sdpa"
            ):
                raise
            fallback = (
                f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160] if str(err).strip() else ''}"
            )
            clock.say(f"calibrate {kind}: FlexAttention failed ({fallback}); retrying with SDPA")
            traceback.print_exc()
            for p in probes.values():
                model = p.preset.model
                p.preset.model = replace(model, arch=replace(model.arch, attention_backend="sdpa"))
            log = fit_log(f"calibrate {kind}", sz.calib_steps, 0, True, None, clock)
            fit(probes[kind], sz, shards, sz.calib_steps, dev, log, seed)
        rates[kind] = log.step_seconds(sz.calib_skip)
        rate = probes[kind].tokens_per_step / rates[kind]
        clock.say(f"calibrate {kind}: {rates[kind] * 1e3:.1f} ms/step, {rate / 1e6:.2f}M tokens/s")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rates, probes, fallback


def plan_steps(
    sz: ProbeSizes, tokens_per_step: int, rates: dict[str, float], time_left: float
) -> tuple[int, int, bool]:
    """(steps, target steps, cut by the budget?): equal steps for both models, the target unless both fits
    (with 15% margin and 15 s of setup each) would not end within ``time_left``."""
    target = max(1, math.ceil(sz.tokens / tokens_per_step))
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
    probe: Probe,
    sz: ProbeSizes,
    shards: Path,
    steps: int,
    dev: torch.device,
    deadline: float,
    clock: Clock,
    save: Path | None,
    seed: int,
) -> Trained:
    log = fit_log(kind, steps, sz.log_every, False, deadline, clock)
    module, trainer = fit(probe, sz, shards, steps, dev, log, seed)
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(save / f"{kind}.ckpt", weights_only=True)
    model = module.model.eval()
    del module, trainer  # optimizer states
    gc.collect()
    seconds = log.end - log.start
    tokens = log.steps * probe.tokens_per_step
    rate = tokens / max(seconds, 1e-9)
    peak = peak_flops(dev)
    mfu = rate * flops_per_token(probe.config, probe.seq_len) / peak if peak else None
    clock.say(f"{kind}: {log.steps} steps, {tokens:,} tokens in {seconds:.0f} s ({rate / 1e6:.2f}M tokens/s)")
    return Trained(model, log.steps, tokens, seconds, rate, mfu, log.curve, log.stopped_early)


# ------------------------------------------------------------------------------------------------ evaluation
def mean_loss(model: EMOTransformer, docs: Sequence[Any], batches: Sequence[Any], routing: Any) -> float:
    from emo_lightning.experts.evaluate import document_losses

    dl = document_losses(model, docs, batches, routing)
    return float(dl.loss_sum.sum() / dl.tokens.sum().clamp(min=1))


def eval_full(
    model: EMOTransformer, val_docs: list[Any], seq_len: int, sz: ProbeSizes, pad: int
) -> dict[str, Any]:
    """Loss on the whole val split with all experts (per domain; load imbalance and dead experts from the expert
    counts of the same pass) and, for EMO, under leak-free pooled routing ``running:P``."""
    from emo_lightning.experts.documents import pack_documents
    from emo_lightning.experts.evaluate import document_losses, domain_table
    from emo_lightning.metrics import routing_stats as rs
    from emo_lightning.model import FULL, Routing

    rc = model.cfg.router
    val = pack_documents(val_docs, seq_len, sz.eval_batch, pad)
    dl = document_losses(model, val_docs, val, FULL, pad)
    table = domain_table(val_docs, dl)
    res: dict[str, Any] = {
        "full": {"loss": table["all"]["loss"], "tokens": table["all"]["tokens"], "domains": table},
        "load": {
            "imbalance": float(rs.load_imbalance(dl.counts).mean()),
            "dead_fraction": float(rs.dead_fraction(dl.counts).mean()),
        },
        "routing": {"full": table["all"]["loss"]},
    }
    if rc.kind == "emo":  # the standard router has no pools
        for size in sz.running_pools:
            if rc.routed_k <= size <= rc.num_routed:
                r = Routing("running", size)
                res["routing"][str(r)] = mean_loss(model, val_docs, val, r)
    return res


def pack_tight(docs: Sequence[Any], seq_len: int, pad: int) -> list[Any]:
    """One batch of just enough rows for ``docs`` (no padding rows)."""
    from emo_lightning.experts.documents import pack_documents

    rows = max(1, math.ceil(sum(len(d.tokens) for d in docs) / seq_len))
    return pack_documents(docs, seq_len, rows, pad)


def eval_keep(
    model: EMOTransformer,
    calib: dict[str, list[Any]],
    evals: dict[str, list[Any]],
    seq_len: int,
    sz: ProbeSizes,
    pad: int,
) -> dict[str, Any]:
    """Per keep fraction: experts chosen layer-wise from the calibration documents of each domain
    (``layerwise_subset``), the model cut to them (``prune_model``) and evaluated on the domain's evaluation
    documents; rise = loss / full-model loss on the same documents - 1, and its mean over domains."""
    from emo_lightning.experts.documents import pack_documents
    from emo_lightning.experts.selection import layerwise_subset, parse_keep
    from emo_lightning.model import FULL, prune_model

    rc = model.cfg.router
    keeps: dict[str, Any] = {label: {"experts": parse_keep(label, rc), "domains": {}} for label in sz.keep}
    for domain, docs in evals.items():
        ev = pack_documents(docs, seq_len, sz.eval_batch, pad)
        full = mean_loss(model, docs, ev, FULL)
        cb = pack_tight(calib[domain], seq_len, pad)
        for entry in keeps.values():
            subset = layerwise_subset(model, cb, entry["experts"])
            pruned = prune_model(model, subset.layers).eval()
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
    model: EMOTransformer, evals: dict[str, list[Any]], seq_len: int, sz: ProbeSizes, pad: int, seed: int
) -> dict[str, Any]:
    """Router clustering of the evaluation documents' tokens against their domains (NMI, purity)."""
    from emo_lightning.experts.clustering import cluster_tokens, router_features
    from emo_lightning.experts.documents import pack_documents

    all_eval = [d for group in evals.values() for d in group]
    feats, index, _ = router_features(model, pack_documents(all_eval, seq_len, sz.eval_batch, pad))
    labels = np.asarray([all_eval[i].domain for i in index])
    res = cluster_tokens(
        feats,
        labels,
        sz.clusters,
        max_tokens=sz.cluster_tokens,
        seed=seed,
        device=model.lm_head.weight.device,
    )
    res.pop("clusters")
    return res


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
    seq_len: int,
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
        "full": lambda m: eval_full(m, val_docs, seq_len, sz, pad),
        "keep": lambda m: {"keep": eval_keep(m, calib, evals, seq_len, sz, pad)},
        "clustering": lambda m: {"clustering": eval_clustering(m, evals, seq_len, sz, pad, seed)},
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
    sz, pm = report["sizes"], report["presets"]
    a, emo, std = pm["emo"]["arch"], pm["emo"]["router"], pm["standard"]["router"]
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
        f"Models (`{pm['emo']['preset']}`, `{pm['standard']['preset']}`): d {a['d_model']}, {a['n_layers']} layers, "
        f"{a['n_heads']} heads, {emo['num_experts']} experts of {a['expert_hidden']} units ({emo['num_shared']} "
        f"shared), top-{emo['top_k']}; rows {pm['emo']['batch_size']} x {pm['emo']['seq_len']} tokens. Standard MoE "
        f"at LR {pm['standard']['lr']:g}, EMO at LR {pm['emo']['lr']:g} with `pool_scope: {emo['pool_scope']}`; "
        f"balance `{emo['balance']}`"
        + (f" (gamma {emo['bias_gamma']:g})" if emo["balance"] != "aux_loss" else "")
        + f"; seed {emo['seed']}; attention {report['attention']}; standard router `{std['kind']}`.",
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
    ap.add_argument("--lr-emo", type=float, default=None, help="EMO peak LR (default: the preset's, 3e-3)")
    ap.add_argument(
        "--lr-standard", type=float, default=None, help="standard-MoE peak LR (default: the preset's, 1.5e-3)"
    )
    ap.add_argument(
        "--pool-scope",
        choices=("running", "document"),
        default=None,
        help="EMO pools in training (preset: running)",
    )
    ap.add_argument(
        "--balance", choices=("aux_loss", "bias", "both"), default=None, help="both models (preset: aux_loss)"
    )
    ap.add_argument(
        "--bias-gamma", type=float, default=None, help="bias update step of balance bias/both (preset: 0.01)"
    )
    ap.add_argument(
        "--router-emo",
        type=_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any router field of the EMO model (repeatable), e.g. pool_min=16: --model.router.KEY VALUE",
    )
    ap.add_argument("--router-standard", type=_override, action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--attention",
        choices=("auto", "flex", "sdpa"),
        default="auto",
        help="attention backend (auto: FlexAttention on CUDA; falls back to SDPA if it fails)",
    )
    ap.add_argument("--seed", type=int, default=0, help="data, initialisation and router seed")
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
        sz = replace(sz, tokens=int(args.tokens))
    if args.budget_s is not None:
        sz = replace(sz, budget_s=args.budget_s)
    if dev.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors; other jobs share the cores
    import lightning  # noqa: F401  (sets its loggers to INFO on import: quieten them after)

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    load_probes(args, sz, 4096)  # a bad flag fails before any data work (the parser names it)
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
    probes = load_probes(args, sz, manifest.vocab_size)
    step_tokens, seq_len = probes["emo"].tokens_per_step, probes["emo"].seq_len
    if sz.tokens < step_tokens:
        raise UserError(f"--tokens {sz.tokens:g}: fewer than one step ({step_tokens:,} tokens)")
    from emo_lightning.model import param_counts

    pc = param_counts(probes["emo"].config)
    clock.say(
        f"model: {pc.total:,} parameters ({pc.active:,} active), "
        f"{flops_per_token(probes['emo'].config, seq_len) / 1e6:.0f} MFLOP per training token; target {sz.tokens:,} tokens"
    )

    # calibration, plan, training
    rates, probes, fallback = calibrate(probes, sz, shards, dev, clock, args.seed)
    train_deadline = clock.t0 + sz.budget_s - sz.eval_reserve_s
    steps, target, cut = plan_steps(sz, step_tokens, rates, train_deadline - time.perf_counter())
    clock.say(
        f"plan: {steps} steps x {step_tokens:,} tokens per model"
        + (f" (time budget: target {target})" if cut else "")
    )
    save = args.work_dir / "ckpt" if args.save_ckpt else None
    trained: dict[str, Trained] = {}
    per_step = sum(rates.values())
    for i, kind in enumerate(MODELS):
        share = rates[kind] / per_step if i == 0 else 1.0
        left = train_deadline - time.perf_counter()
        deadline = min(train_deadline, time.perf_counter() + max(left * share * 1.2, 0.0) + 20.0)
        trained[kind] = train(kind, probes[kind], sz, shards, steps, dev, deadline, clock, save, args.seed)
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
        "presets": {
            kind: {
                "preset": PRESETS[kind],
                "overrides": p.overrides,
                "arch": asdict(p.config.arch),
                "router": asdict(p.config.router),
                "lr": p.preset.optim.lr,
                "seq_len": p.seq_len,
                "batch_size": p.batch_size,
            }
            for kind, p in probes.items()
        },
        "attention": probes["emo"].config.arch.attention_backend
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
        "flops_per_token": flops_per_token(probes["emo"].config, seq_len),
        "training": {k: t.info() for k, t in trained.items()},
        "models": {},
        "errors": {},
        "complete": False,
        "elapsed_s": round(clock(), 1),
    }
    write(args.out, report)

    # evaluation
    evaluate(trained, val_docs, calib, evals, seq_len, sz, pad, args.seed, clock, report, args.out)
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
