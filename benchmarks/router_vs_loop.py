"""CPU forward+backward time: vectorised EMO router vs a per-document Python loop vs the standard router.

The loop reference builds the document pools the way the paper's public code does: document boundaries are
copied to the host (``.cpu().tolist()``), then a Python loop over the rows and the documents of each row takes
the softmax of the document's logits, sums it, draws the pool size with ``.item()``, finds the experts to
discard with a top-k and writes them into a mask. Logits, masked softmax and top-k' stay batched.

    .venv/bin/python benchmarks/router_vs_loop.py [--batch 8 --seq 1024 --docs 16 --experts 64 --k 8 --d 256]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from emo_lightning.model import Router, RouterConfig


class LoopPoolRouter(torch.nn.Module):
    """Reference: same maths as the EMO router, pools built by a Python loop over rows and documents."""

    def __init__(self, router: Router) -> None:
        super().__init__()
        self.weight = router.weight
        self.k, self.pool_min, self.pool_max = router.k, router.pool_min, router.pool_max

    def forward(
        self, h: torch.Tensor, doc_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s, _ = h.shape
        z = F.linear(h.float(), self.weight.float())  # (B,S,E')
        e = z.shape[-1]
        mask = torch.zeros_like(z, dtype=torch.bool)  # True = outside the document's pool
        change = (doc_ids[:, 1:] != doc_ids[:, :-1]).nonzero()
        for row in range(b):
            ends = [*(change[change[:, 0] == row, 1] + 1).cpu().tolist(), s]  # host sync
            start = 0
            for end in ends:
                probs = F.softmax(z[row, start:end], dim=-1)  # (T,E')
                pref = probs.sum(0)
                p = int(torch.randint(self.pool_min, self.pool_max + 1, (1,)).item())  # host sync
                if p < e:
                    discard = torch.topk(-pref, e - p).indices
                    mask[row, start:end, discard] = True
                start = end
        zm = z.masked_fill(mask, float("-inf"))
        lse = torch.logsumexp(zm, dim=-1)
        scores = torch.exp(zm - lse.unsqueeze(-1))
        w, idx = scores.topk(self.k, dim=-1)
        self.counts = torch.bincount(idx.flatten(), minlength=e)  # usage statistics, as the router
        return w, scores, lse.square().mean()


def time_fwd_bwd(fns: dict[str, Callable[[], torch.Tensor]], warmup: int, repeats: int) -> dict[str, float]:
    """Median forward+backward seconds per variant, variants interleaved (robust to load from other jobs)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn().backward()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn().backward()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--docs", type=int, default=16, help="documents per row")
    ap.add_argument("--experts", type=int, default=64, help="E, including one shared expert")
    ap.add_argument("--k", type=int, default=8, help="k, including one shared expert")
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    b, s, e, k = args.batch, args.seq, args.experts, args.k
    kr, er = k - 1, e - 1
    cfg = dict(num_experts=e, num_shared=1, top_k=k, pool_min=kr + 1, pool_max=er, pool_eval=kr + 1)
    emo = Router(RouterConfig(kind="emo", **cfg), args.d).train()
    std = Router(RouterConfig(kind="standard", **cfg), args.d).train()
    torch.nn.init.normal_(emo.weight, std=0.02)
    std.weight.data.copy_(emo.weight.data)
    loop = LoopPoolRouter(emo)

    doc_ids = torch.arange(s).mul(args.docs).div(s, rounding_mode="floor").expand(b, s).contiguous()
    h = torch.randn(b, s, args.d, requires_grad=True)
    cot = torch.randn(b * s, kr)

    def run_router(r: Router) -> Callable[[], torch.Tensor]:
        def f() -> torch.Tensor:
            out = r(h, doc_ids)
            return (out.weights * cot).sum() + out.z_loss + out.scores.mean(0).square().sum()

        return f

    def run_loop() -> torch.Tensor:
        w, scores, zl = loop(h, doc_ids)
        return (w.reshape(-1, kr) * cot).sum() + zl + scores.reshape(-1, er).mean(0).square().sum()

    t = time_fwd_bwd(
        {"std": run_router(std), "emo": run_router(emo), "loop": run_loop}, args.warmup, args.repeats
    )
    t_std, t_emo, t_loop = t["std"], t["emo"], t["loop"]
    print(
        f"router fwd+bwd, B={b} S={s} docs/row={args.docs} E={e} (1 shared) k={k} d={args.d}, "
        f"threads={args.threads}, median of {args.repeats}"
    )
    print(f"  standard top-k          {t_std * 1e3:8.2f} ms")
    print(f"  EMO vectorised          {t_emo * 1e3:8.2f} ms")
    print(f"  EMO per-document loop   {t_loop * 1e3:8.2f} ms")
    print(f"  loop / vectorised       {t_loop / t_emo:8.2f}x")
    print(f"  vectorised / standard   {t_emo / t_std:8.2f}x")


if __name__ == "__main__":
    main()
