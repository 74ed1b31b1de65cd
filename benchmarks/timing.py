"""Shared timing: thread pinning, interleaved warm-up + repeats, median/IQR, paired ratios, peak memory.

Variants of one comparison are timed side by side in one process, round-robin (the starting variant rotates
every round), so that load from other jobs on the machine hits all of them alike. Ratios are reported as the
median of the per-round ratios (paired), with their interquartile range as the spread. On CUDA the times come
from CUDA events around each call.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch


@dataclass
class Stats:
    """Seconds per call over the repeats."""

    median: float
    q1: float
    q3: float
    min: float
    repeats: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3) with linear interpolation (one sample: all equal)."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def stats(xs: list[float]) -> Stats:
    q1, med, q3 = quartiles(xs)
    return Stats(med, q1, q3, min(xs), len(xs))


@dataclass
class Ratio:
    """Paired ratio a/b: median and IQR of the per-round ratios."""

    median: float
    q1: float
    q3: float

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}

    def __str__(self) -> str:
        return f"{self.median:.2f}x [{self.q1:.2f}-{self.q3:.2f}]"


@dataclass
class Timings:
    """Raw per-round times of every variant of one comparison."""

    times: dict[str, list[float]]

    def stats(self, name: str) -> Stats:
        return stats(self.times[name])

    def ratio(self, a: str, b: str) -> Ratio:
        r = [x / y for x, y in zip(self.times[a], self.times[b], strict=True)]
        q1, med, q3 = quartiles(r)
        return Ratio(med, q1, q3)

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {k: self.stats(k).to_dict() for k in self.times}


@contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Pin torch's intra-op thread count for the block (restored afterwards)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# CPU clock: "wall" (perf_counter) or "cpu" (the process's CPU time: on a machine shared with other jobs it counts
# only this process's work, so paired ratios stay meaningful under load; ``benchmarks.run --clock cpu``)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def set_clock(name: str) -> None:
    """Time CPU benchmarks by wall time or by process CPU time (GPU timings always use CUDA events)."""
    global _clock
    _clock = CLOCKS[name]


def _time_once(fn: Callable[[], object], dev: torch.device) -> float:
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = _clock()
    fn()
    return _clock() - t0


def measure(
    fns: dict[str, Callable[[], object]],
    *,
    warmup: int = 2,
    repeats: int = 7,
    dev: torch.device | None = None,
) -> Timings:
    """Time every variant ``repeats`` times, interleaved round-robin after ``warmup`` untimed rounds."""
    dev = dev or device()
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            times[name].append(_time_once(fns[name], dev))
    return Timings(times)


def peak_memory(fn: Callable[[], object], dev: torch.device | None = None) -> int:
    """Peak bytes of tensor memory allocated during one call, above what was live before it.

    CUDA: the caching allocator's peak. CPU: replay of the profiler's allocation events in time order.
    """
    dev = dev or device()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.autograd.profiler import profile

    with profile(profile_memory=True) as prof:
        fn()
    # allocations are attributed to the op that made them (self = without its children), frees outside any
    # op appear as "[memory]" events: replay them in start-time order
    events = sorted(prof.function_events, key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def package_versions(names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """({importable package: version}, [missing packages]) without importing them."""
    found, missing = {}, []
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # a None entry in sys.modules (a blocked import) raises ValueError
            spec = None
        if spec is None:
            missing.append(name)
            continue
        try:
            found[name] = importlib.metadata.version({"yaml": "PyYAML"}.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            found[name] = "?"
    return found, missing


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, object] = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "default_threads": torch.get_num_threads(),
    }
    return info


def loadavg() -> list[float]:
    """1/5/15-minute load averages (``uptime``)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


@dataclass
class Row:
    """One line of the summary table: a ratio (or a plain value) with its target."""

    benchmark: str
    comparison: str
    value: Ratio | float | None
    unit: str = "x"  # "x" for ratios; anything else is printed after a plain value
    target: str = ""
    met: bool | None = None  # None: no target, or not measurable here
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        v = self.value.to_dict() if isinstance(self.value, Ratio) else self.value
        return {**asdict(self), "value": v}

    def cells(self) -> list[str]:
        if isinstance(self.value, Ratio):
            v = str(self.value)
        elif self.value is None:
            v = "-"
        else:
            v = (
                f"{self.value:,.3g} {self.unit}"
                if abs(self.value) < 1000
                else f"{self.value:,.0f} {self.unit}"
            )
        met = {True: "met", False: "MISSED", None: ""}[self.met]
        return [self.benchmark, self.comparison, v, self.target, met, self.note]


def profile_ops(fn: Callable[[], object], steps: int = 3, top: int = 8) -> list[dict[str, object]]:
    """torch.profiler breakdown of ``fn``: the ``top`` ops by self time (host time; CPU ops on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    fn()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
    avg = prof.key_averages()
    on_gpu = torch.cuda.is_available()

    def self_us(e: object) -> float:
        return float(getattr(e, "self_device_time_total" if on_gpu else "self_cpu_time_total", 0.0))

    total = sum(self_us(e) for e in avg) or 1.0
    ranked = sorted(avg, key=self_us, reverse=True)[:top]
    return [
        {
            "op": e.key,
            "share": round(self_us(e) / total, 3),
            "ms_per_step": round(self_us(e) / 1e3 / steps, 2),
            "calls_per_step": round(e.count / steps, 1),
        }
        for e in ranked
    ]
