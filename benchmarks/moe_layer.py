"""Dropless MoE layer forward+backward vs a dense SwiGLU FFN and DeepSpeed's MoE layer.

Shapes: 8192 tokens, d 256, E 32 experts (no shared expert), top-k 4, expert hidden 256; one and two threads.
* ``dense``: one SwiGLU FFN of hidden k*256 (the same active parameters per token; the arithmetic floor).
* ``dropless``: ``emo_lightning.model.MoELayer`` with the standard top-k router (router + sort-based dispatch
  + experts + combine), experts ``loop`` (``split``/``unbind``) and ``grouped_mm`` (``torch._grouped_mm``).
* ``ds_*``: ``deepspeed.moe.layer.MoE`` (its ``TopKGate`` and capacity-padded dispatch) with the same SwiGLU
  experts: without dropping (capacity = the largest expert load), and at capacity factors 1.0 and 1.25 (which
  drop routes beyond capacity). Their dropped-route fraction and capacity padding are reported.
Every variant's loss is ``(y * cotangent).sum()`` plus its auxiliary loss.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.timing import Row, loadavg, measure, num_threads
from emo_lightning.model import ArchConfig, RouterConfig, load_balance
from emo_lightning.model.moe import MoELayer

TOKENS, D, E, K, H = 8192, 256, 32, 4, 256
TWO_THREADS = ("dense", "dropless", "ds_nodrop", "ds_cf1.0")


class SwiGLU(nn.Module):
    """x (...,d) -> (...,d); gate|up fused in one matrix."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(d, 2 * hidden) * 0.02)
        self.w_out = nn.Parameter(torch.randn(hidden, d) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        g, u = (x @ self.w_in).chunk(2, dim=-1)
        return (F.silu(g) * u) @ self.w_out


def init_dist() -> None:
    """A one-process gloo group through DeepSpeed's comm layer (its MoE needs expert-parallel groups)."""
    import deepspeed
    import deepspeed.comm as ds_dist

    if ds_dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", str(port)),
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
    ):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)


class DeepSpeedMoE(nn.Module):
    """DeepSpeed's MoE layer; records the dropped-route fraction and capacity padding of the last forward."""

    def __init__(
        self, tokens_drop: bool, capacity_factor: float, d: int, e: int, k: int, hidden: int
    ) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.moe = MoE(
            hidden_size=d,
            expert=SwiGLU(d, hidden),
            num_experts=e,
            ep_size=1,
            k=k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=capacity_factor,
            min_capacity=4,
            drop_tokens=tokens_drop,
        )
        self.moe.set_deepspeed_parallelism()
        with torch.no_grad():  # Experts deep-copies one expert: give each its own weights
            for ex in self.moe.deepspeed_moe.experts.deepspeed_experts:
                ex.w_in.normal_(std=0.02)
                ex.w_out.normal_(std=0.02)
        self.e = e
        self._last: tuple[int, Tensor] | None = None
        self.moe.deepspeed_moe.gate.register_forward_hook(self._record)

    def _record(self, _m: nn.Module, _inp: Any, out: tuple) -> None:
        self._last = (out[1], out[3].detach())  # capacity, indices (k,S) int32 with -1 = dropped

    @property
    def stats(self) -> dict[str, float]:
        """Dropped-route fraction and capacity padding of the last forward (read after timing: no sync)."""
        if self._last is None:
            return {}
        cap, indices = int(self._last[0]), self._last[1]
        kept = int((indices >= 0).sum())
        return {
            "dropped_routes": 1.0 - kept / indices.numel(),
            "capacity": cap,
            "capacity_padding": 1.0 - kept / (self.e * cap),
        }

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, l_aux, _ = self.moe(x)
        return y, l_aux


def build_fns(
    tokens: int,
    e: int,
    dev: torch.device,
    deepspeed: bool = True,
    *,
    d: int = D,
    k: int = K,
    hidden: int = H,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict, dict]:
    """Closures (forward+backward) of every variant, and the DeepSpeed layers (for their statistics).

    Inputs and weights in ``dtype`` (the router's logits stay fp32); the dense floor has hidden k*hidden.
    """
    torch.manual_seed(0)
    x = torch.randn(1, tokens, d, device=dev, dtype=dtype, requires_grad=True)
    cot = torch.randn(1, tokens, d, device=dev, dtype=dtype)
    doc_ids = torch.zeros(1, tokens, dtype=torch.long, device=dev)
    dense = SwiGLU(d, k * hidden).to(dev, dtype)
    arch = ArchConfig(d_model=d, expert_hidden=hidden, n_heads=4)
    rcfg = RouterConfig(kind="standard", num_experts=e, num_shared=0, top_k=k)
    layers = {}
    for impl in ("loop", "grouped_mm"):
        layer = MoELayer(arch, rcfg, impl=impl)
        layer.reset_parameters(0.02)
        layers[impl] = layer.to(dev, dtype)

    def run_dense() -> None:
        x.grad = None  # as in a training step: no gradient accumulation
        dense.zero_grad(set_to_none=True)
        (dense(x) * cot).sum().backward()

    def run_ours(layer: MoELayer):
        def f() -> None:
            x.grad = None
            layer.zero_grad(set_to_none=True)
            y, r = layer(x, doc_ids)
            lb = load_balance(r.counts, tokens, r.scores.mean(0), k)  # the model's own auxiliary loss
            ((y * cot).sum() + lb + r.z_loss).backward()

        return f

    fns: dict[str, Any] = {
        "dense": run_dense,
        "dropless": run_ours(layers["loop"]),
        "dropless_grouped_mm": run_ours(layers["grouped_mm"]),
    }
    try:  # torch._grouped_mm may not support this device/dtype (e.g. fp32 on some GPUs)
        fns["dropless_grouped_mm"]()
    except RuntimeError:
        del fns["dropless_grouped_mm"]
    ds: dict[str, DeepSpeedMoE] = {}
    if deepspeed:
        init_dist()
        for name, drop, cf in (("ds_nodrop", False, 1.0), ("ds_cf1.0", True, 1.0), ("ds_cf1.25", True, 1.25)):
            m = DeepSpeedMoE(drop, cf, d, e, k, hidden).to(dev, dtype)
            ds[name] = m

            def f(m: DeepSpeedMoE = m) -> None:
                x.grad = None
                m.zero_grad(set_to_none=True)
                y, l_aux = m(x)
                ((y * cot).sum() + l_aux).backward()

            fns[name] = f
    return fns, ds


def deepspeed_available() -> bool:
    try:
        import deepspeed.moe.layer  # noqa: F401
    except Exception:
        return False
    return True


def run(quick: bool = False, dev: torch.device | None = None) -> tuple[list[Row], dict]:
    dev = dev or torch.device("cpu")
    repeats, warmup = (2, 1) if quick else (5, 1)
    have_ds = deepspeed_available()
    shape = (
        dict(tokens=256, e=8, d=32, k=2, hidden=32) if quick else dict(tokens=TOKENS, e=E, d=D, k=K, hidden=H)
    )
    fns, ds = build_fns(
        shape["tokens"],
        shape["e"],
        dev,
        deepspeed=have_ds,
        d=shape["d"],
        k=shape["k"],
        hidden=shape["hidden"],
    )
    rows: list[Row] = []
    details: dict = {"shape": shape, "threads": {}}
    for threads in (1, 2):
        # two threads: the main variants only, fewer repeats (the second core is shared with other jobs here)
        sub = fns if threads == 1 else {k: v for k, v in fns.items() if k in TWO_THREADS}
        with num_threads(threads):
            t = measure(sub, warmup=warmup, repeats=repeats if threads == 1 else max(3, repeats - 2), dev=dev)
        med = {k: t.stats(k).median for k in t.times}
        load = loadavg()[:1] or [0.0]
        # several threads while other jobs keep the cores busy: OpenMP barriers wait for descheduled threads
        contended = threads > 1 and load[0] >= (os.cpu_count() or 1)
        flag = f"contended: load {load[0]:.1f} on {os.cpu_count()} CPUs; " if contended else ""
        det: dict = {"times": t.to_dict(), "ratios_vs_dense": {k: t.ratio(k, "dense").to_dict() for k in sub}}
        det["deepspeed_stats"] = {k: m.stats for k, m in ds.items()}
        det["contended"] = contended
        details["threads"][threads] = det
        r = t.ratio("dropless", "dense")
        rows.append(
            Row(
                "moe_layer",
                f"dropless(loop) / dense, {threads} thr",
                r,
                target="<= 1.15" if threads == 1 else "",
                met=(r.median <= 1.15) if threads == 1 else None,
                note=f"{flag}dense {med['dense'] * 1e3:.1f} ms",
            )
        )
        if "dropless_grouped_mm" in sub:
            r = t.ratio("dropless_grouped_mm", "dense")
            rows.append(
                Row("moe_layer", f"dropless(grouped_mm) / dense, {threads} thr", r, note="not chosen on CPU")
            )
        for name, m in ds.items():
            if name not in sub:
                continue
            r = t.ratio(name, "dense")
            st = m.stats
            target, met = "", None
            if name == "ds_nodrop":
                rr = t.ratio("dropless", name)
                target, met = "dropless faster", None if contended else rr.median < 1.0
            elif name == "ds_cf1.0":
                rr = t.ratio("dropless", name)
                target, met = "dropless <= it", None if contended else rr.median <= 1.0
            rows.append(
                Row(
                    "moe_layer",
                    f"{name} / dense, {threads} thr",
                    r,
                    target=target,
                    met=met,
                    note=f"{flag}drops {st['dropped_routes']:.1%} of routes, capacity {st['capacity']} "
                    f"(padding {st['capacity_padding']:.1%})",
                )
            )
    if not have_ds:
        details["deepspeed"] = "not importable: DeepSpeed variants skipped"
    return rows, details
