"""``make gpu-check``: prove the CUDA path correct and measure it in one short run (a CPU dry run elsewhere).

    python -m benchmarks.gpu_check [--dry] [--cpu] [--out DIR] [--only environment,correctness,performance]

Sections (docs/performance.md):

1. environment: torch / CUDA / GPU, which packages and project modules import, that ``emo_lightning.model``
   imports nothing but torch, and a measured matmul rate (bf16 on CUDA: the MFU denominator).
2. correctness, forward and backward: FlexAttention document masks vs SDPA with a boolean mask; the grouped-GEMM
   expert path vs the per-expert loop (fp32, bf16); the EMO router and the MoE layer under
   ``torch.cuda.set_sync_debug_mode("error")`` (the first synchronising op is named); a training step of the
   tiny model under bf16 autocast vs fp32; a short Lightning fit whose ``TokenThroughputMonitor`` logs MFU.
3. performance (CUDA events, warm-up, medians; ``benchmarks.timing``): tokens/s and MFU of an ``emo_small``
   training step and its standard-MoE baseline on packed documents of log-normal lengths; our router vs the
   per-document loop at 64 documents per row; the dropless MoE layer (loop and grouped GEMM) vs a dense SwiGLU of
   equal active FLOPs; peak memory.

Without CUDA (or with ``--dry``) the same code runs at tiny sizes with few repeats; CUDA-only checks SKIP. The
models come from the conf/ presets (``emo_lightning.presets``: ``emo fit``'s parser), so besides torch, Lightning
and torchmetrics the check needs jsonargparse, omegaconf and webdataset (``make gpu-prepare`` downloads their
wheels for an air-gapped node); a check that cannot run for a missing package FAILs, only the DeepSpeed reference
is optional. Prints a table, writes ``gpu-check-<device>-<time>.{json,md}`` and ``gpu-check-latest.{json,md}``
under ``--out`` and exits 1 when a check FAILs (a missed performance target is reported, never fails).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from itertools import cycle
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.inputs import packed_doc_ids, synthetic_batches
from benchmarks.timing import loadavg, machine, measure, package_versions, peak_memory
from emo_lightning.model import (
    Attention,
    AttentionMask,
    EMOTransformer,
    ModelConfig,
    RoutedExperts,
    Router,
    flops_per_token,
    segment_positions,
)
from emo_lightning.model.moe import MoELayer
from emo_lightning.optim import OptimConfig
from emo_lightning.training import TrainStep

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PACKAGES = (
    "lightning",
    "torchmetrics",
    "tensorboard",
    "deepspeed",
    "webdataset",
    "jsonargparse",
    "omegaconf",
    "tokenizers",
    "numpy",
    "yaml",
)
PROJECT_MODULES = (
    "emo_lightning.model",
    "emo_lightning.lit_module",
    "emo_lightning.callbacks",
    "emo_lightning.data",
    "emo_lightning.parallel.expert_parallel",
    "emo_lightning.cli",
)
# what emo_lightning.model must not pull in (it is the torch-only core; its own light helpers such as
# emo_lightning.errors are fine)
HEAVY = (
    "lightning",
    "pytorch_lightning",
    "deepspeed",
    "webdataset",
    "jsonargparse",
    "omegaconf",
    "torchmetrics",
)


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run: ``FULL`` on a GPU, ``DRY`` for the CPU smoke run."""

    matmul: int  # square matmul of the rate measurement
    tiny_batch: int  # tiny model (ArchConfig defaults): attention check, bf16 step, Lightning fit
    tiny_seq: int
    tiny_doc: int  # median document length of the synthetic packed rows
    experts: int  # grouped-GEMM check: routed experts, width, hidden, token slots
    expert_d: int
    expert_h: int
    expert_slots: int
    sync_batch: int  # sync checks: emo_small router / MoE layer input rows of seq_len
    small: bool  # performance step: emo_small (conf/arch/small.yaml) or the tiny model
    step_batch: int
    step_seq: int
    step_doc: int
    router_batch: int  # router vs loop (benchmarks.router): B, S, documents per row
    router_seq: int
    router_docs: int
    layer_tokens: int  # MoE layer vs dense: tokens, d, routed experts, k, expert hidden
    layer_d: int
    layer_experts: int
    layer_k: int
    layer_h: int
    warmup: int
    repeats: int


FULL = Sizes(
    matmul=8192,
    tiny_batch=8,
    tiny_seq=1024,
    tiny_doc=256,
    experts=64,
    expert_d=512,
    expert_h=512,
    expert_slots=16384,
    sync_batch=2,
    small=True,
    step_batch=8,
    step_seq=4096,
    step_doc=512,
    router_batch=8,
    router_seq=1024,
    router_docs=64,
    layer_tokens=32768,
    layer_d=512,
    layer_experts=64,
    layer_k=8,
    layer_h=512,
    warmup=3,
    repeats=10,
)
DRY = replace(
    FULL,
    matmul=128,
    tiny_batch=2,
    tiny_seq=128,
    tiny_doc=32,
    experts=8,
    expert_d=32,
    expert_h=32,
    expert_slots=256,
    sync_batch=1,
    small=False,
    step_batch=2,
    step_seq=128,
    step_doc=32,
    router_batch=1,
    router_seq=256,
    layer_tokens=512,
    layer_d=64,
    layer_experts=8,
    layer_k=2,
    layer_h=64,
    warmup=1,
    repeats=3,
)


@dataclass
class Result:
    """One line of the table. status: PASS / FAIL / SKIP / INFO for checks, met / MISSED for targets."""

    section: str
    name: str
    status: str
    value: str = ""
    target: str = ""
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def cells(self) -> list[str]:
        status = f"SKIP ({self.note})" if self.status == "SKIP" and self.note else self.status
        note = "" if self.status == "SKIP" else self.note
        return [self.section, self.name, status, self.value, self.target, note]


def skip(section: str, name: str, reason: str) -> Result:
    return Result(section, name, "SKIP", note=reason)


def repo_frame(frames: list[traceback.FrameSummary]) -> str:
    """The deepest frame in this repository's code, as ``path:line `code```."""
    for fr in reversed(frames):
        path = Path(fr.filename).resolve()
        if REPO in path.parents and ".venv" not in path.parts:
            return f"{path.relative_to(REPO)}:{fr.lineno} `{(fr.line or '').strip()}`"
    return "outside the repository"


# references to third-party code that a GPU image may lack: not run without them (INFO), never a FAIL
OPTIONAL = ("deepspeed",)


def guarded(section: str, name: str, fn: Callable[..., list[Result]], *args: Any) -> list[Result]:
    """Run one check; any exception FAILs it (with where it was raised), a missing package too (a check that
    cannot run is not a pass) unless the package is ``OPTIONAL`` (a third-party reference: INFO, not run).
    Checks that do not apply to the device SKIP themselves."""
    try:
        return fn(*args)
    except ModuleNotFoundError as e:
        missing = (e.name or str(e)).split(".")[0]
        if missing in OPTIONAL:
            return [Result(section, name, "INFO", note=f"not run: {missing} is not installed (optional)")]
        return [
            Result(section, name, "FAIL", note=f"missing: {missing} (make gpu-prepare carries the wheels)")
        ]
    except Exception as e:
        where = repo_frame(traceback.extract_tb(e.__traceback__))
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return [Result(section, name, "FAIL", note=f"{type(e).__name__}: {msg} at {where}")]


def attempt(section: str, name: str, fn: Callable[[], Result]) -> Result:
    """One row of a multi-row check, guarded on its own (one failing dtype does not hide the others)."""
    return guarded(section, name, lambda: [fn()])[0]


def rel_err(a: Tensor, ref: Tensor) -> float:
    """||a - ref|| / ||ref|| in fp64."""
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def sci(x: float) -> str:
    return f"{x:.1e}"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------- models
EXPERIMENTS = {
    "tiny": "conf/experiment/emo_tiny.yaml",
    "small": "conf/experiment/emo_small_gpu.yaml",
    "small_standard": "conf/experiment/stdmoe_small_gpu.yaml",
}


def preset_model(name: str, seq: int | None = None) -> ModelConfig:
    """The model of a conf/ experiment (``emo fit``'s parser), ``max_seq_len`` raised to ``seq``."""
    from emo_lightning.presets import load_preset  # Lightning, jsonargparse: the CLI's parser

    cfg = load_preset(REPO / EXPERIMENTS[name]).model
    if seq is not None and seq > cfg.arch.max_seq_len:
        cfg = replace(cfg, arch=replace(cfg.arch, max_seq_len=seq))
    return cfg


def build_model(cfg: ModelConfig, dev: torch.device, seed: int = 0) -> EMOTransformer:
    torch.manual_seed(seed)
    return EMOTransformer(cfg).to(dev).train()


# ---------------------------------------------------------------------------------------------- environment
def matmul_rate(dev: torch.device, n: int, dtype: torch.dtype, sz: Sizes) -> float:
    """Measured FLOP/s of an (n,n) @ (n,n) product (median of CUDA-event timings after warm-up)."""
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    t = measure({"mm": lambda: a @ b}, warmup=3, repeats=max(10, sz.repeats), dev=dev)
    return 2 * n**3 / t.stats("mm").median


def project_modules() -> dict[str, str]:
    """{module: "ok" | "missing: <package>" | "<error>"} for the project's entry points."""
    out = {}
    for name in PROJECT_MODULES:
        try:
            importlib.import_module(name)
            out[name] = "ok"
        except ModuleNotFoundError as e:
            out[name] = f"missing: {(e.name or str(e)).split('.')[0]}"
        except Exception as e:
            out[name] = f"{type(e).__name__}: {str(e)[:80]}"
    return out


def model_import_hygiene() -> tuple[list[str], list[str]]:
    """(heavy packages, other project modules) that ``import emo_lightning.model`` loads in a fresh
    interpreter; the first must be empty."""
    code = (
        "import sys, emo_lightning.model\n"
        "top = {m.split('.')[0] for m in sys.modules}\n"
        f"print(' '.join(sorted(top & set({HEAVY!r}))))\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('emo_lightning.')"
        " and not m.startswith('emo_lightning.model'))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, timeout=120
    )
    heavy, project = [*proc.stdout.splitlines(), "", ""][:2]
    return heavy.split(), project.split()


def environment(dev: torch.device, sz: Sizes, info: dict[str, Any]) -> list[Result]:
    sec = "environment"
    rows = []
    cuda = torch.version.cuda or "none"
    rows.append(
        Result(
            sec,
            "torch / CUDA",
            "INFO",
            f"{torch.__version__} / {cuda}",
            note=f"Python {platform.python_version()}",
        )
    )
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        gpu = f"{p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs"
        info["gpu"] = {
            "name": p.name,
            "memory_GiB": round(p.total_memory / 2**30, 1),
            "capability": f"{p.major}.{p.minor}",
        }
    else:
        gpu = "none (CPU dry run)"
    rows.append(Result(sec, "GPU", "INFO", gpu))
    found, missing = package_versions(PACKAGES)
    info["packages"], info["missing_packages"] = found, missing
    note = f"missing: {', '.join(missing)}" if missing else ""
    rows.append(Result(sec, "packages", "INFO", ", ".join(f"{k} {v}" for k, v in found.items()), note=note))
    mods = project_modules()
    info["project_modules"] = mods
    ok = [m for m, s in mods.items() if s == "ok"]
    bad = [f"{m} ({s})" for m, s in mods.items() if s != "ok"]
    rows.append(Result(sec, "project modules", "INFO", ", ".join(ok), note="; ".join(bad)))
    heavy, project = model_import_hygiene()
    note = f"loads {' '.join(heavy)}" if heavy else f"checked: {', '.join(HEAVY)}"
    rows.append(
        Result(
            sec,
            "emo_lightning.model imports only torch",
            "FAIL" if heavy else "PASS",
            note=note + (f"; project modules outside model/: {' '.join(project)}" if project else ""),
        )
    )
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rate = matmul_rate(dev, sz.matmul, dtype, sz)
    info["matmul_flops"] = rate
    note = "MFU denominator"
    if dev.type == "cuda":
        try:  # the monitor's table (its module needs lightning)
            from emo_lightning.callbacks.throughput import dense_peak_flops

            sheet = dense_peak_flops(torch.cuda.get_device_name(dev), torch.bfloat16)
        except ImportError:
            sheet = None
        if sheet:
            note += f"; datasheet dense peak {sheet / 1e12:.0f} TFLOP/s ({rate / sheet:.0%} of it)"
    dname = str(dtype).removeprefix("torch.")
    rows.append(
        Result(sec, f"matmul rate, {dname} {sz.matmul}^3", "INFO", f"{rate / 1e12:.3g} TFLOP/s", note=note)
    )
    return rows


# ---------------------------------------------------------------------------------------------- correctness
def attention_grads(
    attn: Attention, x: Tensor, cot: Tensor, mask: AttentionMask, amp: bool, backward: bool
) -> list[Tensor]:
    """[output, and with ``backward`` d/dx and d/dW of every projection] of one attention call."""
    x = x.detach().clone().requires_grad_(backward)
    with torch.set_grad_enabled(backward), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        y = attn(x, mask)  # (B,S,d)
    if not backward:
        return [y.detach()]
    params = [p for p in attn.parameters() if p.requires_grad]
    return [y.detach(), *torch.autograd.grad((y.float() * cot).sum(), [x, *params])]


def check_flex(dev: torch.device, sz: Sizes) -> list[Result]:
    """FlexAttention block mask vs SDPA boolean mask on packed documents, fp32 and bf16 autocast."""
    importlib.import_module("torch.nn.attention.flex_attention")
    cfg = preset_model("tiny", sz.tiny_seq).arch
    torch.manual_seed(0)
    attn = Attention(cfg).to(dev)
    gen = torch.Generator().manual_seed(1)
    doc_ids = packed_doc_ids(sz.tiny_batch, sz.tiny_seq, sz.tiny_doc, gen).to(dev)
    x = torch.randn(sz.tiny_batch, sz.tiny_seq, cfg.d_model, device=dev)
    cot = torch.randn_like(x)
    masks = {b: AttentionMask.build(doc_ids, replace(cfg, attention_backend=b)) for b in ("sdpa", "flex")}
    backward = dev.type == "cuda"  # FlexAttention has no backward outside torch.compile (CPU: forward only)
    docs = int(doc_ids[:, -1].float().mean()) + 1

    def one(name: str, amp: bool, tol: float) -> Result:
        ref = attention_grads(attn, x, cot, masks["sdpa"], amp, backward)
        flex = attention_grads(attn, x, cot, masks["flex"], amp, backward)
        errs = [rel_err(a, b) for a, b in zip(flex, ref, strict=True)]
        return Result(
            "correctness",
            name,
            "PASS" if max(errs) <= tol else "FAIL",
            f"rel err {sci(errs[0])} out" + (f", {sci(max(errs[1:]))} grads" if backward else ""),
            f"<= {tol:g}",
            f"{'fwd+bwd' if backward else 'fwd only (CPU)'}; {docs} docs/row",
            {"errors": errs},
        )

    rows = []
    for amp, tol in ((False, 1e-3), (True, 3e-2)):
        name = f"FlexAttention doc mask vs SDPA bool mask, {'bf16 autocast' if amp else 'fp32'}"
        rows.append(attempt("correctness", name, lambda name=name, amp=amp, tol=tol: one(name, amp, tol)))
    return rows


def expert_grads(ex: RoutedExperts, x: Tensor, counts: Tensor, cot: Tensor, impl: str) -> list[Tensor]:
    """[y, dx, dw_in, dw_out] of the routed experts on expert-sorted tokens with implementation ``impl``."""
    ex.impl = impl  # type: ignore[assignment]
    x = x.detach().clone().requires_grad_(True)
    y = ex(x, counts)  # (M,d)
    return [y.detach(), *torch.autograd.grad((y * cot.to(y.dtype)).sum(), [x, ex.w_in, ex.w_out])]


def check_grouped(dev: torch.device, sz: Sizes) -> list[Result]:
    """``torch._grouped_mm`` expert path vs the per-expert loop, both against an fp64 loop."""
    if not hasattr(torch, "_grouped_mm"):
        return [skip("correctness", "grouped GEMM vs loop", "torch._grouped_mm missing (torch < 2.8)")]
    torch.manual_seed(0)
    ex = RoutedExperts(sz.experts, sz.expert_d, sz.expert_h)
    ex.reset_parameters(0.02, seed=0, layer_idx=0)
    ex = ex.to(dev)
    load = torch.rand(sz.experts)
    load[1] = load[3] = 0.0  # empty experts included; the other counts are arbitrary (unaligned offsets)
    counts = torch.bincount(torch.multinomial(load, sz.expert_slots, replacement=True), minlength=sz.experts)
    counts = counts.to(dev)
    x = torch.randn(sz.expert_slots, sz.expert_d, device=dev)
    cot = torch.randn_like(x)
    ref = expert_grads(ex, x.double(), counts, cot.double(), "loop")
    empty = int((counts == 0).sum())

    def one(name: str, dtype: torch.dtype, tol: float) -> Result:
        errs = {
            impl: max(
                rel_err(a, b)
                for a, b in zip(expert_grads(ex, x.to(dtype), counts, cot, impl), ref, strict=True)
            )
            for impl in ("loop", "grouped_mm")
        }
        return Result(
            "correctness",
            name,
            "PASS" if errs["grouped_mm"] <= max(tol, 2 * errs["loop"]) else "FAIL",
            f"rel err vs fp64: grouped {sci(errs['grouped_mm'])}, loop {sci(errs['loop'])}",
            f"<= max({tol:g}, 2x loop)",
            f"fwd+bwd; {sz.experts} experts ({empty} empty), {sz.expert_slots} slots",
            errs,
        )

    rows = []
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 2e-2)):
        name = f"grouped GEMM vs per-expert loop, {str(dtype).removeprefix('torch.')}"
        rows.append(
            attempt("correctness", name, lambda name=name, dtype=dtype, tol=tol: one(name, dtype, tol))
        )
    return rows


def sync_site(err: BaseException, caught: list[warnings.WarningMessage]) -> str:
    """Where the synchronising op ran: the repository frame of the error, or for a backward op the forward
    traceback that autograd's anomaly mode printed for its node."""
    where = repo_frame(traceback.extract_tb(err.__traceback__))
    for w in caught:
        text = str(w.message)
        node = re.search(r"Error detected in (\w+)", text)
        if node:
            frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', text)
            inside = [(f, n, c) for f, n, c in frames if str(REPO) in f and ".venv" not in f]
            if inside:
                f, n, c = inside[-1]
                where = (
                    f"backward of {node.group(1)}, forward at {Path(f).relative_to(REPO)}:{n} `{c.strip()}`"
                )
            else:
                where = f"backward of {node.group(1)}"
    return where


def first_sync(fn: Callable[[], object], anomaly: bool = True) -> str | None:
    """None if ``fn`` (forward + backward) runs without a host synchronisation, else where the first one is.

    One untimed call first (lazy initialisation, compilation). Then ``set_sync_debug_mode("error")``, with
    autograd's anomaly mode so that a backward op is traced to its forward line.
    """
    fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autograd.set_detect_anomaly(anomaly, check_nan=False):
                fn()
        except RuntimeError as e:
            if "synchroniz" not in str(e):
                raise
            return sync_site(e, caught)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
    return None


def check_sync(dev: torch.device, sz: Sizes) -> list[Result]:
    """EMO router (document and running pools) and the MoE layer (bf16 autocast and bf16 weights): no host
    synchronisation in forward + backward, at ``emo_small`` layer shapes."""
    names = (
        "no host sync: EMO router, document pools",
        "no host sync: EMO router, running pools",
        "no host sync: MoE layer, bf16 autocast (bf16-mixed)",
        "no host sync: MoE layer, bf16 weights",
    )
    if dev.type != "cuda":
        return [skip("correctness", n, "CUDA only") for n in names]
    emo_cfg = preset_model("small")
    arch, rc = emo_cfg.arch, emo_cfg.router
    b, s = sz.sync_batch, sz.step_seq
    gen = torch.Generator().manual_seed(2)
    doc_ids = packed_doc_ids(b, s, sz.step_doc, gen).to(dev)
    h = torch.randn(b, s, arch.d_model, device=dev, requires_grad=True)
    cot_w = torch.randn(b * s, rc.routed_k, device=dev)

    def router_fn(r: Router) -> Callable[[], None]:
        def f() -> None:
            h.grad = r.weight.grad = None
            out = r(h, doc_ids)
            (out.weights * cot_w).sum().add(out.z_loss).add(out.scores.mean(0).square().sum()).backward()

        return f

    def layer_fn(layer: MoELayer, x: Tensor, amp: bool) -> Callable[[], None]:
        cot = torch.randn_like(x)

        def f() -> None:
            x.grad = None
            layer.zero_grad(set_to_none=True)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
                y, r = layer(x, doc_ids)
            lb = (r.counts.float() * r.scores.mean(0)).sum()
            ((y.float() * cot).sum() + lb + r.z_loss).backward()

        return f

    torch.manual_seed(0)
    routers = [
        Router(replace(rc, pool_scope=scope), arch.d_model).to(dev).train()
        for scope in ("document", "running")
    ]
    for r in routers:
        torch.nn.init.normal_(r.weight, std=arch.init_std)
    layer = MoELayer(arch, rc)
    layer.reset_parameters(arch.init_std)
    layer = layer.to(dev).train()
    layer_bf16 = MoELayer(arch, rc)
    layer_bf16.load_state_dict(layer.state_dict())
    layer_bf16 = layer_bf16.to(dev, torch.bfloat16).train()
    xb = h.detach().to(torch.bfloat16).requires_grad_(True)
    fns = [
        router_fn(routers[0]),
        router_fn(routers[1]),
        layer_fn(layer, h, True),
        layer_fn(layer_bf16, xb, False),
    ]

    def one(name: str, fn: Callable[[], None]) -> Result:
        site = first_sync(fn)
        note = f"synchronises at {site}" if site else "fwd+bwd"
        return Result("correctness", name, "PASS" if site is None else "FAIL", note=note)

    return [
        attempt("correctness", name, lambda name=name, fn=fn: one(name, fn))
        for name, fn in zip(names, fns, strict=True)
    ]


def check_amp_step(dev: torch.device, sz: Sizes) -> list[Result]:
    """Two training steps of the tiny model, bf16 autocast vs fp32 (same init, data and pool draws)."""
    cfg = preset_model("tiny", sz.tiny_seq)
    batches = synthetic_batches(2, sz.tiny_batch, sz.tiny_seq, cfg.arch.vocab_size, sz.tiny_doc, dev, seed=3)
    losses: dict[bool, list[float]] = {}
    grads: dict[bool, Tensor] = {}
    steppers: dict[bool, TrainStep] = {}
    for amp in (False, True):
        model = build_model(cfg, dev)
        st = steppers[amp] = TrainStep(model, OptimConfig(lr=3e-3, warmup_steps=0), amp=amp)
        losses[amp] = []
        for i, batch in enumerate(batches):
            model.reseed_routers(i)
            loss = st.loss(batch)
            loss.backward()
            if i == 0:
                grads[amp] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            st.update()
            losses[amp].append(loss.item())
    finite = all(math.isfinite(v) for v in losses[True] + losses[False])
    diff = max(abs(a - b) / abs(b) for a, b in zip(losses[True], losses[False], strict=True))
    cos = float(F.cosine_similarity(grads[True].double(), grads[False].double(), dim=0))
    ok = finite and diff <= 1e-2 and cos >= 0.99
    rows = [
        Result(
            "correctness",
            "tiny-model training step, bf16 autocast vs fp32",
            "PASS" if ok else "FAIL",
            f"loss rel diff {sci(diff)}, grad cosine {cos:.4f}",
            "finite; <= 1e-2; >= 0.99",
            f"2 steps; losses bf16 {losses[True][0]:.4f}, {losses[True][1]:.4f} / fp32 {losses[False][0]:.4f}, {losses[False][1]:.4f}",
            {"losses_bf16": losses[True], "losses_fp32": losses[False], "grad_cosine": cos},
        )
    ]
    if dev.type == "cuda":  # the whole step (attention mask, losses, AdamW too): reported, never failed
        st, batch = steppers[True], batches[0]
        site = first_sync(lambda: st.step(batch), anomaly=False)
        rows.append(
            Result(
                "correctness",
                "host syncs in a whole training step (bf16)",
                "INFO",
                "none" if site is None else "yes",
                note="" if site is None else f"first at {site}",
            )
        )
    return rows


def check_lightning_mfu(dev: torch.device, sz: Sizes, peak: float) -> list[Result]:
    """A 4-step Lightning fit of ``EMOLitModule`` (bf16-mixed on CUDA) with ``TokenThroughputMonitor``: MFU in
    TensorBoard. On CUDA the monitor finds the peak itself; on CPU it is given the measured matmul rate."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.data import DataLoader

    from emo_lightning.callbacks.throughput import TokenThroughputMonitor, dense_peak_flops
    from emo_lightning.lit_module import EMOLitModule

    name = "Lightning fit logs MFU to TensorBoard"
    given = None if dev.type == "cuda" else peak
    if dev.type == "cuda" and dense_peak_flops(torch.cuda.get_device_name(dev), torch.bfloat16) is None:
        from lightning.fabric.utilities.throughput import get_available_flops

        if get_available_flops(dev, torch.bfloat16) is None:
            return [skip("correctness", name, f"no peak FLOPs known for {torch.cuda.get_device_name(dev)}")]
    cfg = preset_model("tiny", sz.tiny_seq)
    batches = synthetic_batches(
        4, sz.tiny_batch, sz.tiny_seq, cfg.arch.vocab_size, sz.tiny_doc, torch.device("cpu")
    )
    monitor = TokenThroughputMonitor(window_size=2, peak_flops=given)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(
            accelerator="gpu" if dev.type == "cuda" else "cpu",
            devices=1,
            precision="bf16-mixed" if dev.type == "cuda" else "32-true",
            max_steps=4,
            logger=TensorBoardLogger(tmp, name="tb"),
            callbacks=[monitor],
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        module = EMOLitModule(arch=cfg.arch, router=cfg.router, optim=OptimConfig(warmup_steps=0))
        trainer.fit(module, DataLoader(batches, batch_size=None))
        acc = EventAccumulator(str(trainer.logger.log_dir)).Reload()
        scalars = {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    mfu = scalars.get("train/device/mfu", [])
    ok = bool(mfu) and all(0 < m < 1.5 for m in mfu)
    src = "given (measured matmul rate)" if given else "the monitor's table"
    return [
        Result(
            "correctness",
            name,
            "PASS" if ok else "FAIL",
            f"train/device/mfu {mfu[-1]:.3g}" if mfu else "no train/device/mfu",
            note=f"peak {monitor.available_flops / 1e12:.3g} TFLOP/s from {src}"
            if monitor.available_flops
            else "no peak",
            data={"mfu": mfu, "available_flops": monitor.available_flops},
        )
    ]


# ---------------------------------------------------------------------------------------------- performance
def perf_train_step(dev: torch.device, sz: Sizes, peak: float) -> list[Result]:
    """EMO vs standard-MoE training step: tokens/s, MFU (``flops_per_token`` / measured matmul rate), peak
    memory."""
    if sz.small:
        cfgs = {"emo": preset_model("small"), "standard": preset_model("small_standard")}
        label = "emo_small"
    else:
        emo = preset_model("tiny", sz.step_seq)
        cfgs = {"emo": emo, "standard": replace(emo, router=replace(emo.router, kind="standard"))}
        label = "tiny (dry)"
    b, s = sz.step_batch, sz.step_seq
    amp = dev.type == "cuda"
    vocab = cfgs["emo"].arch.vocab_size
    batches = synthetic_batches(4, b, s, vocab, sz.step_doc, dev, seed=4)
    data = {k: cycle(batches) for k in cfgs}
    steppers = {k: TrainStep(build_model(c, dev), amp=amp) for k, c in cfgs.items()}
    fns = {k: (lambda k=k: steppers[k].step(next(data[k]))) for k in cfgs}
    t = measure(fns, warmup=sz.warmup, repeats=sz.repeats, dev=dev)
    mem = {k: peak_memory(f, dev) for k, f in fns.items()} if dev.type == "cuda" else {}
    tokens = b * s
    docs = float(torch.stack([bt["doc_ids"][:, -1] + 1 for bt in batches]).float().mean())
    ctx = float(torch.stack([segment_positions(bt["doc_ids"]) + 1 for bt in batches]).float().mean())
    rows = []
    for k, cfg in cfgs.items():
        med = t.stats(k).median
        fpt = flops_per_token(cfg, s)  # the convention of EMOLitModule.flops_per_batch (full causal context)
        mfu = tokens * fpt / med / peak
        mfu_doc = tokens * flops_per_token(cfg, s, mean_context=ctx) / med / peak
        note = f"{med * 1e3:.1f} ms/step, {b}x{s} tokens, {docs:.1f} docs/row"
        if mem:
            note += f", peak {mem[k] / 2**30:.2f} GiB"
        rows.append(
            Result(
                "performance",
                f"{label} step, {k}{' (bf16 autocast)' if amp else ' (fp32)'}",
                "INFO",
                f"{tokens / med:,.0f} tok/s, MFU {mfu:.1%}",
                note=note + f"; MFU counting doc-masked attention {mfu_doc:.1%}",
                data={
                    "stats": t.stats(k).to_dict(),
                    "flops_per_token": fpt,
                    "mfu": mfu,
                    "mfu_doc_masked": mfu_doc,
                    "peak_memory_bytes": mem.get(k),
                },
            )
        )
    r = t.ratio("emo", "standard")
    rows.append(
        Result(
            "performance",
            f"{label} step, EMO / standard",
            "met" if r.median <= 1.05 else "MISSED",
            str(r),
            "<= 1.05",
            "released EMO code: ~1.2x at 64 experts",
            {"ratio": r.to_dict()},
        )
    )
    return rows


def perf_router(dev: torch.device, sz: Sizes) -> list[Result]:
    """Our EMO router vs the per-document loop reference (``benchmarks.router``), forward + backward."""
    from benchmarks import router as rb

    emo, std = rb.build(dev)
    fns = rb.step_fns(emo, std, sz.router_batch, sz.router_seq, sz.router_docs, dev)
    t = measure(fns, warmup=sz.warmup, repeats=sz.repeats, dev=dev)
    med = {k: t.stats(k).median * 1e3 for k in t.times}
    shape = f"B={sz.router_batch}, S={sz.router_seq}, E={rb.E}, d={rb.D}"
    loop = t.ratio("loop", "emo")
    rows = [
        Result(
            "performance",
            f"router: loop reference / EMO, {sz.router_docs} docs/row",
            "met" if loop.median >= 10 else "MISSED",
            str(loop),
            ">= 10",
            f"loop {med['loop']:.2f} ms, EMO {med['emo']:.2f} ms; {shape}",
            {"times": t.to_dict()},
        )
    ]
    for a, b in (("loop+metric", "emo"), ("emo", "standard"), ("emo running", "emo")):
        rows.append(
            Result(
                "performance",
                f"router: {a} / {b}, {sz.router_docs} docs/row",
                "INFO",
                str(t.ratio(a, b)),
                note=f"{a} {med[a]:.2f} ms, {b} {med[b]:.2f} ms",
            )
        )
    return rows


def perf_moe_layer(dev: torch.device, sz: Sizes) -> list[Result]:
    """Dropless MoE layer (loop and grouped GEMM) vs a dense SwiGLU of equal active FLOPs (``benchmarks.moe_layer``)."""
    from benchmarks import moe_layer as mb

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    fns, _ = mb.build_fns(
        sz.layer_tokens,
        sz.layer_experts,
        dev,
        deepspeed=False,
        d=sz.layer_d,
        k=sz.layer_k,
        hidden=sz.layer_h,
        dtype=dtype,
    )
    t = measure(fns, warmup=sz.warmup, repeats=sz.repeats, dev=dev)
    mem = {k: peak_memory(f, dev) for k, f in fns.items()} if dev.type == "cuda" else {}
    auto = "dropless_grouped_mm" if dev.type == "cuda" else "dropless"  # what impl="auto" picks here
    shape = f"{sz.layer_tokens} tokens, d {sz.layer_d}, E {sz.layer_experts}, k {sz.layer_k}, h {sz.layer_h}, {str(dtype).removeprefix('torch.')}"
    rows = []
    for name, label in (("dropless", "loop"), ("dropless_grouped_mm", "grouped GEMM")):
        if name not in fns:
            rows.append(
                skip(
                    "performance",
                    f"MoE layer ({label}) / dense",
                    "torch._grouped_mm failed here: see correctness",
                )
            )
            continue
        r = t.ratio(name, "dense")
        target = name == auto
        note = f"{t.stats(name).median * 1e3:.2f} ms vs dense {t.stats('dense').median * 1e3:.2f} ms; {shape}"
        if mem:
            note += f"; peak {mem[name] / 2**20:.0f} MiB vs {mem['dense'] / 2**20:.0f} MiB"
        rows.append(
            Result(
                "performance",
                f"MoE layer ({label}) / dense SwiGLU, fwd+bwd",
                ("met" if r.median <= 1.3 else "MISSED") if target else "INFO",
                str(r),
                "<= 1.3" if target else "",
                note,
                {"times": t.to_dict()},
            )
        )
    return rows


def perf_deepspeed_moe(dev: torch.device, sz: Sizes) -> list[Result]:
    """DeepSpeed's MoE layer without dropping, for reference (needs deepspeed)."""
    importlib.import_module("deepspeed")
    from benchmarks import moe_layer as mb

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    name = "MoE layer: DeepSpeed (no drop) / dropless"
    try:
        fns, _ = mb.build_fns(
            sz.layer_tokens,
            sz.layer_experts,
            dev,
            deepspeed=True,
            d=sz.layer_d,
            k=sz.layer_k,
            hidden=sz.layer_h,
            dtype=dtype,
        )
        ours = "dropless_grouped_mm" if dev.type == "cuda" and "dropless_grouped_mm" in fns else "dropless"
        sub = {k: fns[k] for k in (ours, "ds_nodrop")}
        t = measure(sub, warmup=sz.warmup, repeats=sz.repeats, dev=dev)
    except Exception as e:  # a third-party reference: reported, never failed
        return [
            Result(
                "performance",
                name,
                "INFO",
                note=f"DeepSpeed could not run: {type(e).__name__}: {str(e)[:120]}",
            )
        ]
    return [Result("performance", name, "INFO", str(t.ratio("ds_nodrop", ours)), note=f"ours = {ours}")]


# ---------------------------------------------------------------------------------------------- report
def table(results: list[Result]) -> str:
    head = ["section", "check", "status", "value", "target", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r.cells()) + " |" for r in results]
    return "\n".join(lines)


def write(out: Path, report: dict[str, Any], results: list[Result]) -> list[Path]:
    """gpu-check-<device>-<stamp>.{json,md} and gpu-check-latest.{json,md} under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md = "\n".join(
        [
            f"# gpu-check {report['timestamp']} ({'dry run' if report['dry'] else 'full run'})",
            "",
            f"Device: {report['device_name']}; torch {torch.__version__}, CUDA {torch.version.cuda}; "
            f"{report['elapsed_s']:.0f} s; {report['failed']} failed check(s).",
            "",
            table(results),
            "",
        ]
    )
    body = json.dumps({**report, "results": [asdict(r) for r in results]}, indent=1, default=str)
    stem = f"gpu-check-{report['device']}-{report['timestamp']}"
    paths = []
    for name in (stem, "gpu-check-latest"):
        for suffix, text in ((".json", body), (".md", md)):
            path = out / f"{name}{suffix}"
            path.write_text(text)
            paths.append(path)
    return paths


def checks(
    dev: torch.device, sz: Sizes, info: dict[str, Any]
) -> Iterator[tuple[str, str, Callable[[], list[Result]]]]:
    """(section, name, thunk) of every check in run order (the matmul rate comes first: MFU needs it)."""

    def peak() -> float:
        if "matmul_flops" not in info:  # environment not run (--only)
            info["matmul_flops"] = matmul_rate(
                dev, sz.matmul, torch.bfloat16 if dev.type == "cuda" else torch.float32, sz
            )
        return info["matmul_flops"]

    yield "environment", "environment", lambda: environment(dev, sz, info)
    yield "correctness", "FlexAttention vs SDPA", lambda: check_flex(dev, sz)
    yield "correctness", "grouped GEMM vs loop", lambda: check_grouped(dev, sz)
    yield "correctness", "no host sync", lambda: check_sync(dev, sz)
    yield "correctness", "bf16 training step", lambda: check_amp_step(dev, sz)
    yield "correctness", "Lightning fit logs MFU", lambda: check_lightning_mfu(dev, sz, peak())
    yield "performance", "training step", lambda: perf_train_step(dev, sz, peak())
    yield "performance", "router vs loop", lambda: perf_router(dev, sz)
    yield "performance", "MoE layer vs dense", lambda: perf_moe_layer(dev, sz)
    yield "performance", "DeepSpeed MoE layer", lambda: perf_deepspeed_moe(dev, sz)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="tiny sizes and few repeats (automatic without CUDA)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is available")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument(
        "--only", default="", help="comma-separated sections: environment,correctness,performance"
    )
    ap.add_argument("--step-batch", type=int, default=0, help="rows of seq_len per measured training step")
    ap.add_argument(
        "--budget-s", type=float, default=450.0, help="skip remaining performance checks after this"
    )
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dry = args.dry or dev.type != "cuda"
    sz = DRY if dry else FULL
    if args.step_batch:
        sz = replace(sz, step_batch=args.step_batch)
    if dev.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors; other jobs share the cores
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    info: dict[str, Any] = {"machine": machine(), "load_at_start": loadavg()}
    results: list[Result] = []
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    print(f"gpu-check on {dev} ({'dry run' if dry else 'full run'})", flush=True)
    for section, name, thunk in checks(dev, sz, info):
        if only and section not in only:
            continue
        if section == "performance" and time.perf_counter() - t_all > args.budget_s:
            results.append(skip(section, name, f"time budget of {args.budget_s:.0f} s spent"))
            continue
        t0 = time.perf_counter()
        torch.manual_seed(0)
        rows = guarded(section, name, thunk)
        sync(dev)
        timings[name] = round(time.perf_counter() - t0, 2)
        for r in rows:
            if dry and r.status in ("met", "MISSED"):  # tiny sizes on a CPU: the targets are for a GPU
                r.status, r.note = "INFO", f"dry run, target is for a GPU; {r.note}"
            print(f"  [{r.status:>6}] {r.section}: {r.name}: {r.value} {r.note}".rstrip(), flush=True)
        results += rows
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    failed = sum(r.status == "FAIL" for r in results)
    elapsed = time.perf_counter() - t_all
    report = {
        "timestamp": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
        "dry": dry,
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else info["machine"]["cpu"],
        "sizes": asdict(sz),
        "elapsed_s": round(elapsed, 1),
        "check_seconds": timings,
        "failed": failed,
        **info,
    }
    paths = write(args.out, report, results)
    print()
    print(table(results))
    print(f"\n{failed} failed check(s) in {elapsed:.0f} s; wrote {', '.join(str(p) for p in paths[:2])}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
