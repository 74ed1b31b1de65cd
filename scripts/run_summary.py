"""One Markdown row per training run, read from its TensorBoard log: the numbers the study tables quote.

    python scripts/run_summary.py runs/emo_a runs/stdmoe_a ... [--ref runs/stdmoe_a]

Columns: last optimizer step, final validation loss (``val/ce``: the whole val split in the study configs), its
gap to the ``--ref`` run, validation load-balance loss, expert imbalance (max/mean load) and dead-expert fraction
averaged over the last 4 usage windows, and the routing bias's spread (``router.balance: bias | both``).
"""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_tools.errors import ArgumentParser, UserError, run_cli


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of ``run``'s event files (resumed runs write several), as (step, value) in step order."""
    files = sorted(run.glob("events.out.tfevents.*"))
    if not files:
        raise UserError(f"{run}: no TensorBoard events here", "pass a run folder, runs/<experiment>")
    out: dict[str, list[tuple[int, float]]] = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0}).Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(v) for tag, v in out.items()}


def summary(run: Path) -> dict[str, float | None]:
    s = scalars(run)

    def mean_last(tag: str, n: int = 1) -> float | None:
        v = [x for _, x in s.get(tag, [])[-n:]]
        return sum(v) / len(v) if v else None

    return {
        "step": float(s["train/loss"][-1][0] + 1) if "train/loss" in s else None,
        "val": mean_last("val/ce"),
        "val_lb": mean_last("val/lb"),
        "imbalance": mean_last("usage/imbalance", 4),
        "dead": mean_last("usage/dead_fraction", 4),
        "bias_spread": mean_last("usage/bias_spread"),
    }


def main(argv: list[str]) -> None:
    ap = ArgumentParser(prog="run_summary", description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (runs/<experiment>)")
    ap.add_argument("--ref", type=Path, help="the run the gap is measured against (default: the first)")
    args = ap.parse_args(argv)
    rows = {run: summary(run) for run in args.runs}
    ref_run = args.ref or args.runs[0]
    ref = rows[ref_run] if ref_run in rows else summary(ref_run)

    def fmt(x: float | None, spec: str) -> str:
        return "" if x is None else format(x, spec)

    print("| run | steps | val loss | vs ref | val lb | imbalance | dead | bias spread |")
    print("|---|---|---|---|---|---|---|---|")
    for run, r in rows.items():
        gap = r["val"] / ref["val"] - 1 if r["val"] is not None and ref["val"] else None
        print(
            f"| {run.name} | {fmt(r['step'], '.0f')} | {fmt(r['val'], '.4f')} | {fmt(gap, '+.2%')} "
            f"| {fmt(r['val_lb'], '.3f')} | {fmt(r['imbalance'], '.2f')} | {fmt(r['dead'], '.2f')} "
            f"| {fmt(r['bias_spread'], '.2f')} |"
        )


if __name__ == "__main__":
    run_cli("emo", main)
