"""``make bench``: run the benchmark suite, print the ratio table, write ``benchmarks/results/*.json``.

    python -m benchmarks.run [--only router,moe_layer,...] [--quick]

Benchmarks (one module each): router, moe_layer, train_step, data_loader, scaling, expert_usage, data_build
(``expert_usage_overhead``). Every comparison is timed
side by side in one process with fixed thread counts (see ``benchmarks.timing``); on a GPU everything runs
on CUDA with CUDA events. Targets are reported as met/MISSED but never fail the run: the exit status is
non-zero only when a benchmark crashes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks import data_build, data_loader, expert_usage_overhead, moe_layer, router, scaling, train_step
from benchmarks.timing import CLOCKS, Row, device, loadavg, machine, set_clock

RESULTS = Path(__file__).resolve().parent / "results"
BENCHMARKS = {
    "router": router.run,
    "moe_layer": moe_layer.run,
    "train_step": train_step.run,
    "data_loader": data_loader.run,
    "scaling": scaling.run,
    "expert_usage": expert_usage_overhead.run,
    "data_build": data_build.run,
}


def table(rows: list[Row]) -> str:
    """Markdown table of the rows."""
    head = ["benchmark", "comparison", "value [IQR]", "target", "", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes, 1-2 repeats: a smoke run of every benchmark (CI)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="CPU timings by wall time or by process CPU time (cpu: steadier on a machine shared with other jobs)",
    )
    args = ap.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in only if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    names = [n for n in BENCHMARKS if not only or n in only]  # suite order: data_loader after train_step

    dev = device()
    set_clock(args.clock)
    torch.manual_seed(0)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result: dict = {
        "timestamp": stamp,
        "quick": args.quick,
        "clock": args.clock,
        "device": str(dev),
        "machine": machine(),
        "load_at_start": loadavg(),
        "benchmarks": {},
    }
    rows: list[Row] = []
    failed: list[str] = []
    t_all = time.perf_counter()
    for name in names:
        print(f"== {name} (load {loadavg()})", flush=True)
        t0 = time.perf_counter()
        entry: dict = {"load_before": loadavg()}
        try:
            kwargs = {}
            if name == "data_loader" and "train_step" in result["benchmarks"]:
                tps = result["benchmarks"]["train_step"].get("details", {}).get("threads", {}).get(1, {})
                kwargs["consumption"] = tps.get("tokens_per_s", {}).get("emo")
            bench_rows, details = BENCHMARKS[name](quick=args.quick, dev=dev, **kwargs)
            if args.quick:  # tiny sizes: a smoke run of the code, its numbers say nothing about the targets
                for r in bench_rows:
                    r.met = None
            rows += bench_rows
            entry.update(rows=[r.to_dict() for r in bench_rows], details=details)
            for r in bench_rows:
                print("   " + " | ".join(c for c in r.cells() if c), flush=True)
        except Exception:
            failed.append(name)
            entry["error"] = traceback.format_exc()
            print(entry["error"], file=sys.stderr, flush=True)
        entry["load_after"] = loadavg()
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        result["benchmarks"][name] = entry
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    result["load_at_end"] = loadavg()
    result["failed"] = failed
    md = table(rows)
    result["table_markdown"] = md
    m = result["machine"]
    print(
        f"\nBenchmarks on {m['cpu']} ({m['logical_cpus']} logical CPUs), torch {m['torch']}, device {dev}; "
        f"load {result['load_at_start']} -> {result['load_at_end']}; {result['seconds']:.0f} s\n"
    )
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1, default=str) + "\n"
    (args.out / f"{stamp}.json").write_text(text)
    (args.out / "latest.json").write_text(text)
    print(f"\nwrote {args.out / (stamp + '.json')} and latest.json")
    if failed:
        print(f"crashed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
