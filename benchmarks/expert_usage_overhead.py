"""Training step time with and without ``ExpertUsageMonitor`` on the tiny default model (conf/experiment/emo_tiny.yaml).

Both variants are real ``Trainer.fit`` runs (same seed, same synthetic batches, same TensorBoard logger),
alternating A/B, B/A, ... so that load from other processes and order effects hit both alike. Step time = time
between consecutive ``on_train_batch_start`` calls (so the monitor's ``on_train_batch_end`` work, its window
logging and its images are included), averaged over each run after a warm-up, in wall time and in process CPU
time. Ratios are taken per pair; the median pair is reported.

A low-noise cross-check is reported as well, all in CPU time: the time spent inside the monitor's
``on_train_batch_end`` per step (accumulation and window logging), the image round (figures + ``add_figure``)
amortised over its interval (runs shorter than the image interval never draw one), and the forward cost of the
routes (min over interleaved repeats), over the baseline step.

Batches are synthetic but follow the batch contract (``benchmarks.inputs``): packed documents of log-normal
length (median ``--doc-len``), each of one of 8 domains, tokens drawn from a per-domain vocabulary slice.

    .venv/bin/python -m benchmarks.expert_usage_overhead [--steps 150 --pairs 3 --threads 1 --router emo]

``make bench`` runs it (``run``) with 40 steps and 1 pair (the module's own defaults are the study's, ~10 min);
``--quick`` a few steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from benchmarks.inputs import synthetic_batches
from benchmarks.timing import Row
from benchmarks.train_step import tiny_presets
from emo_lightning.callbacks import ExpertUsageMonitor
from emo_lightning.lit_module import EMOLitModule
from emo_lightning.model import EMOTransformer, ModelConfig, RouterConfig

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ["biomedical", "code", "forum", "law", "math", "news", "reviews", "wiki"]


class Batches(L.LightningDataModule):
    def __init__(self, batches: list[dict]) -> None:
        super().__init__()
        self.batches, self.domains = batches, DOMAINS

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None, shuffle=False)


class StepTimer(L.Callback):
    """Wall and process CPU time between consecutive training batch starts (and the last batch to the end).

    CPU time (``time.process_time``: every thread of this process, including the logger's writer thread) is far
    less sensitive than wall time to other jobs on a shared machine.
    """

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []

    def on_train_batch_start(self, *args) -> None:
        self.stamps.append((time.perf_counter(), time.process_time()))

    def on_train_end(self, *args) -> None:
        self.stamps.append((time.perf_counter(), time.process_time()))

    def mean_step(self, warmup: int) -> tuple[float, float]:
        """Mean (wall, cpu) seconds per step after ``warmup`` steps."""
        (w0, c0), (w1, c1) = self.stamps[warmup], self.stamps[-1]
        n = len(self.stamps) - 1 - warmup
        return (w1 - w0) / n, (c1 - c0) / n


def forward_cpu_seconds(conf: tuple, batch: dict, repeats: int) -> tuple[float, float]:
    """Min CPU seconds of a training-mode forward without / with the monitor's routes (interleaved repeats).

    The only model-side cost of the monitor (``return_routes=True, route_probs=False``: expert ids with the
    shared experts appended, and the per-segment pool mask); it has no backward.
    """
    arch, router, _ = conf
    torch.manual_seed(0)
    model = EMOTransformer(ModelConfig(arch, router)).train()
    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms up
            for routes in (False, True):
                t = time.process_time()
                model(batch["input_ids"], batch["doc_ids"], return_routes=routes, route_probs=False)
                times[routes].append(time.process_time() - t)
    return min(times[False][1:]), min(times[True][1:])


def timed_hook(monitor: ExpertUsageMonitor) -> list[float]:
    """Wrap the monitor's ``on_train_batch_end`` (Lightning looks hooks up on the instance); returns the times."""
    times: list[float] = []
    hook = monitor.on_train_batch_end

    def wrapper(*args, **kwargs) -> None:
        t = time.process_time()
        hook(*args, **kwargs)
        times.append(time.process_time() - t)

    monitor.on_train_batch_end = wrapper
    return times


def image_round_seconds(monitor: ExpertUsageMonitor, log_dir: str) -> float:
    """One image round (all heatmaps + the summary, rendered and written) on the monitor's (reset) metric."""
    writer = TensorBoardLogger(log_dir, name="images").experiment
    result = {k: v.cpu() for k, v in monitor.metric.compute().items()}
    t = time.process_time()
    for tag, fig in monitor.figures(result).items():
        writer.add_figure(tag, fig, 0, close=False)
    writer.flush()
    return time.process_time() - t


def run_fit(
    batches: list[dict], conf: tuple, steps: int, monitor: ExpertUsageMonitor | None, log_dir: str
) -> StepTimer:
    L.seed_everything(0, verbose=False)
    arch, router, optim = conf
    module = EMOLitModule(arch=arch, router=router, optim=optim)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu", precision="32-true", max_steps=steps, logger=TensorBoardLogger(log_dir, name="bench"),
        log_every_n_steps=10, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        limit_val_batches=0, gradient_clip_val=1.0, callbacks=[timer] + ([monitor] if monitor else []),
    )  # fmt: skip
    trainer.fit(module, datamodule=Batches(batches))
    return timer


def summary(
    args: argparse.Namespace,
    router: RouterConfig,
    monitor: ExpertUsageMonitor,
    base: list[tuple[float, float]],
    mon: list[tuple[float, float]],
    hook_ms: list[float],
    image_s: list[float],
    fwd: tuple[float, float],
) -> dict:
    """The results so far (written after every pair, so an interrupted run keeps its finished pairs)."""
    wall_ratios = [m[0] / b[0] for m, b in zip(mon, base, strict=True)]
    cpu_ratios = [m[1] / b[1] for m, b in zip(mon, base, strict=True)]
    base_cpu = statistics.median(b[1] for b in base)
    fwd_off, fwd_on = fwd
    hook_s, img_s = statistics.median(hook_ms) / 1e3, statistics.median(image_s)
    result = {
        "router": router.kind,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "log_every_n_steps": monitor.log_every_n_steps,
        "image_every_n_steps": monitor.image_every_n_steps,
        "wall_ms_per_step_off": [round(1e3 * b[0], 2) for b in base],
        "wall_ms_per_step_on": [round(1e3 * m[0], 2) for m in mon],
        "cpu_ms_per_step_off": [round(1e3 * b[1], 2) for b in base],
        "cpu_ms_per_step_on": [round(1e3 * m[1], 2) for m in mon],
        "wall_ratios": [round(r, 4) for r in wall_ratios],
        "cpu_ratios": [round(r, 4) for r in cpu_ratios],
        "median_wall_ratio": round(statistics.median(wall_ratios), 4),
        "median_cpu_ratio": round(statistics.median(cpu_ratios), 4),
        "monitor_hook_ms_per_step": [round(t, 3) for t in hook_ms],
        "image_round_s": [round(t, 3) for t in image_s],
        "forward_cpu_ms_off_min": round(1e3 * fwd_off, 2),
        "forward_cpu_ms_routes_min": round(1e3 * fwd_on, 2),
        # hook + amortised images + the routes' forward cost over the baseline step (CPU time): the overhead
        # without the run-to-run noise of the A/B ratios
        "component_overhead_fraction": round(
            (hook_s + img_s / monitor.image_every_n_steps + max(fwd_on - fwd_off, 0.0)) / base_cpu, 5
        ),
        "loadavg_at_end": os.getloadavg(),
    }
    return result


def measure_overhead(args: argparse.Namespace, out: Path | None = None) -> dict:
    """A/B pairs of real fits without / with the monitor (see the module docstring); the summary dict."""
    torch.set_num_threads(args.threads)
    preset = tiny_presets()["emo"]
    arch, router, optim = preset.model.arch, preset.model.router, preset.optim
    if args.router:
        router = replace(router, kind=args.router)
    arch = replace(arch, max_seq_len=max(arch.max_seq_len, args.seq))
    batches = synthetic_batches(
        64, args.batch, args.seq, arch.vocab_size, int(args.doc_len), domains=len(DOMAINS)
    )
    conf = (arch, router, optim)
    base, mon, hook_ms, image_s = [], [], [], []  # base / mon: (wall, cpu) seconds per step
    fwd = forward_cpu_seconds(conf, batches[0], args.forward_repeats)
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            monitor = ExpertUsageMonitor(image_every_n_steps=args.image_every)
            hook = timed_hook(monitor)
            for on in (False, True) if pair % 2 == 0 else (True, False):  # A B, B A, ...: no order bias
                timer = run_fit(batches, conf, args.steps, monitor if on else None, tmp)
                (mon if on else base).append(timer.mean_step(args.warmup))
            hook_ms.append(1e3 * statistics.fmean(hook[args.warmup :]))
            image_s.append(image_round_seconds(monitor, tmp))
            print(
                f"pair {pair}: wall off {1e3 * base[-1][0]:.1f} / on {1e3 * mon[-1][0]:.1f} ms/step "
                f"(ratio {mon[-1][0] / base[-1][0]:.4f}); cpu off {1e3 * base[-1][1]:.1f} / on "
                f"{1e3 * mon[-1][1]:.1f} ms/step (ratio {mon[-1][1] / base[-1][1]:.4f}); "
                f"monitor hook {hook_ms[-1]:.2f} ms/step (cpu), image round {image_s[-1]:.2f} s (cpu)",
                flush=True,
            )
            result = summary(args, router, monitor, base, mon, hook_ms, image_s, fwd)
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--router", choices=["emo", "standard"], default=None, help="override the router kind")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--doc-len", type=float, default=150.0, help="median document length (tokens)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run (monitor logs every 50)")
    p.add_argument("--warmup", type=int, default=10, help="first steps of each run left out")
    p.add_argument("--pairs", type=int, default=3, help="A/B pairs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--forward-repeats", type=int, default=10, help="repeats of the forward-only cost check")
    p.add_argument("--image-every", type=int, default=None, help="monitor image interval (default: its own)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "expert_usage_overhead.json"))
    return p


def run(quick: bool = False, dev: torch.device | None = None) -> tuple[list[Row], dict]:
    """The suite's entry (CPU): 40 steps x 1 pair (quick: 4 steps of 2 x 64 tokens)."""
    flags = ["--steps", "40", "--pairs", "1", "--warmup", "5"]
    if quick:
        flags = ["--steps", "4", "--pairs", "1", "--warmup", "1", "--batch", "2", "--seq", "64"]
        flags += ["--forward-repeats", "1", "--image-every", "2"]
    res = measure_overhead(build_parser().parse_args(flags))
    note = (
        f"components (hook + images + routes) {res['component_overhead_fraction']:.2%} of a step; "
        f"{res['steps']} steps x {len(res['wall_ratios'])} pairs"
    )
    rows = [
        Row("expert_usage", "step with / without ExpertUsageMonitor (wall)", res["median_wall_ratio"], target="<= 1.05",
            met=res["median_wall_ratio"] <= 1.05, note=note),
        Row("expert_usage", "step with / without ExpertUsageMonitor (CPU time)", res["median_cpu_ratio"]),
    ]  # fmt: skip
    return rows, res


def main() -> None:
    args = build_parser().parse_args()
    print(json.dumps(measure_overhead(args, Path(args.out)), indent=1))


if __name__ == "__main__":
    main()
