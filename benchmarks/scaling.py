"""Scaling with the work: router and MoE-layer forward+backward at 1x/2x/4x tokens and at 2x experts.

Router: EMO and standard, B=8/16/32 x S=1024 (16 documents per row), E=64 -> 128 at k=8, one thread.
MoE layer: dropless (standard router, ``loop`` experts), 2048/4096/8192 tokens, E=32 -> 64 at k=4, d=hidden=256,
one thread (a smaller base than ``moe_layer`` to keep the suite short). The token exponent is the least-squares
slope of log(time) on log(tokens) (1 = linear); the expert exponent is log2(t(2E)/t(E)) (0 = flat).
"""

from __future__ import annotations

import math

import torch

from benchmarks import moe_layer, router
from benchmarks.timing import Row, measure, num_threads


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) on log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def run(quick: bool = False, dev: torch.device | None = None) -> tuple[list[Row], dict]:
    dev = dev or torch.device("cpu")
    repeats, warmup = (3, 1) if quick else (5, 1)
    mult = (1, 2, 4)
    fns: dict = {}
    with num_threads(1):
        emo_r, std_r = router.build(dev)
        emo_2e, std_2e = router.build(dev, experts=2 * router.E)
        for m in mult:
            f = router.step_fns(emo_r, std_r, router.B * m, router.S, 16, dev, loops=False)
            fns[f"router_emo_{m}x"], fns[f"router_std_{m}x"] = f["emo"], f["standard"]
        f = router.step_fns(emo_2e, std_2e, router.B, router.S, 16, dev, loops=False)
        fns["router_emo_2E"], fns["router_std_2E"] = f["emo"], f["standard"]
        base = 2048
        for m in mult:
            fns[f"moe_{m}x"] = moe_layer.build_fns(base * m, moe_layer.E, dev, deepspeed=False)[0]["dropless"]
        fns["moe_2E"] = moe_layer.build_fns(base, 2 * moe_layer.E, dev, deepspeed=False)[0]["dropless"]
        t = measure(fns, warmup=warmup, repeats=repeats, dev=dev)
    med = {k: t.stats(k).median for k in t.times}
    rows: list[Row] = []
    details: dict = {"times": t.to_dict(), "exponents": {}}
    for name, label in (
        ("router_emo", "EMO router"),
        ("router_std", "standard router"),
        ("moe", "dropless MoE layer"),
    ):
        tok = slope([float(m) for m in mult], [med[f"{name}_{m}x"] for m in mult])
        exp = math.log2(med[f"{name}_2E"] / med[f"{name}_1x"])
        details["exponents"][name] = {"tokens": round(tok, 3), "experts": round(exp, 3)}
        times = ", ".join(f"{m}x {med[f'{name}_{m}x'] * 1e3:.0f}" for m in mult)
        rows.append(
            Row(
                "scaling",
                f"{label}: exponent in tokens",
                tok,
                unit="",
                target="~1 (linear)",
                met=abs(tok - 1) <= 0.15,
                note=f"ms: {times}",
            )
        )
        rows.append(
            Row(
                "scaling",
                f"{label}: exponent in experts (fixed k)",
                exp,
                unit="",
                target="~0 (flat)",
                met=abs(exp) <= 0.15,
                note=f"ms: 1E {med[f'{name}_1x'] * 1e3:.0f}, 2E {med[f'{name}_2E'] * 1e3:.0f}",
            )
        )
    return rows, details
