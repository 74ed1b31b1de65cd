"""Scaling with the work: router and MoE-layer forward+backward at 1x/2x/4x tokens and at 2x experts.

Router: EMO and standard, B=8/16/32 x S=1024 (16 documents per row), E=64 -> 128 at k=8, one thread.
MoE layer: dropless (standard router, ``loop`` experts), 2048/4096/8192 tokens, E=32 -> 64 at k=4, d=hidden=256,
and its expert path alone (dispatch + experts + combine, fixed random routing); one thread (a smaller base than ``moe_layer`` to keep the suite short). The token exponent is the least-squares
slope of log(time) on log(tokens) (1 = linear); the expert exponent is log2(t(2E)/t(E)) (0 = flat).
"""

from __future__ import annotations

import math

import torch

from benchmarks import moe_layer, router
from benchmarks.timing import Row, measure, num_threads
from emo_lightning.model.moe import RoutedExperts, combine, dispatch


def experts_fn(tokens: int, experts: int, dev: torch.device):
    """Forward+backward of the expert path alone (dispatch, ``loop`` experts, combine) for a fixed uniform
    random top-k routing: the part that should not depend on the number of experts at fixed k."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, moe_layer.D, generator=g).to(dev).requires_grad_()
    ids = torch.rand(tokens, experts, generator=g).topk(moe_layer.K, dim=-1).indices.to(dev)
    w = torch.rand(tokens, moe_layer.K, generator=g).to(dev)
    cot = torch.randn(tokens, moe_layer.D, generator=g).to(dev)
    mod = RoutedExperts(experts, moe_layer.D, moe_layer.H, impl="loop").to(dev)
    mod.reset_parameters(0.02, 0, 0)

    def f() -> None:
        x.grad = None
        mod.zero_grad(set_to_none=True)
        plan = dispatch(x, ids, experts)
        (combine(mod(plan.x_sorted, plan.counts), w, plan) * cot).sum().backward()

    return f


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) on log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def run(quick: bool = False, dev: torch.device | None = None) -> tuple[list[Row], dict]:
    dev = dev or torch.device("cpu")
    repeats, warmup = (2, 1) if quick else (7, 1)
    mult = (1, 2, 4)
    # quick: a smoke run at tiny sizes (the exponents are then meaningless)
    rows_b, seq, n_exp, base = (1, 64, 16, 128) if quick else (router.B, router.S, router.E, 2048)
    fns: dict = {}
    with num_threads(1):
        emo_r, std_r = router.build(dev, n_exp)
        emo_2e, std_2e = router.build(dev, experts=2 * n_exp)
        for m in mult:
            f = router.step_fns(emo_r, std_r, rows_b * m, seq, 16, dev, loops=False)
            fns[f"router_emo_{m}x"], fns[f"router_std_{m}x"] = f["emo"], f["standard"]
        f = router.step_fns(emo_2e, std_2e, rows_b, seq, 16, dev, loops=False)
        fns["router_emo_2E"], fns["router_std_2E"] = f["emo"], f["standard"]
        for m in mult:
            fns[f"moe_{m}x"] = moe_layer.build_fns(base * m, moe_layer.E, dev, deepspeed=False)[0]["dropless"]
        fns["moe_2E"] = moe_layer.build_fns(base, 2 * moe_layer.E, dev, deepspeed=False)[0]["dropless"]
        for m in mult:
            fns[f"experts_{m}x"] = experts_fn(base * m, moe_layer.E, dev)
        fns["experts_2E"] = experts_fn(base, 2 * moe_layer.E, dev)
        t = measure(fns, warmup=warmup, repeats=repeats, dev=dev)
    med = {k: t.stats(k).median for k in t.times}
    low = {k: t.stats(k).min for k in t.times}  # least disturbed by other jobs: a second estimate
    rows: list[Row] = []
    details: dict = {"times": t.to_dict(), "exponents": {}}
    for name, label in (
        ("router_emo", "EMO router"),
        ("router_std", "standard router"),
        ("moe", "dropless MoE layer"),
        ("experts", "MoE expert path (no router)"),
    ):
        flat_target = not name.startswith("router")  # a router's logits GEMM (N x d x E') grows with E
        tok = slope([float(m) for m in mult], [med[f"{name}_{m}x"] for m in mult])
        exp = math.log2(med[f"{name}_2E"] / med[f"{name}_1x"])
        tok_min = slope([float(m) for m in mult], [low[f"{name}_{m}x"] for m in mult])
        exp_min = math.log2(low[f"{name}_2E"] / low[f"{name}_1x"])
        details["exponents"][name] = {
            "tokens": round(tok, 3),
            "experts": round(exp, 3),
            "tokens_from_min": round(tok_min, 3),
            "experts_from_min": round(exp_min, 3),
        }
        times = ", ".join(f"{m}x {med[f'{name}_{m}x'] * 1e3:.0f}" for m in mult)
        rows.append(
            Row(
                "scaling",
                f"{label}: exponent in tokens",
                tok,
                unit="",
                target="~1 (linear)",
                met=abs(tok - 1) <= 0.15,
                note=f"ms: {times}; from min times {tok_min:.2f}",
            )
        )
        rows.append(
            Row(
                "scaling",
                f"{label}: exponent in experts (fixed k)",
                exp,
                unit="",
                target="~0 (flat)" if flat_target else "n/a (logits GEMM ~ E')",
                met=abs(exp) <= 0.15 if flat_target else None,
                note=f"ms: 1E {med[f'{name}_1x'] * 1e3:.0f}, 2E {med[f'{name}_2E'] * 1e3:.0f}; from min times {exp_min:.2f}",
            )
        )
    return rows, details
