"""What every benchmark shares: results (tables, targets), statistics, CPU and memory readings."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

# -- results --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(cell) for cell in cells])

    def markdown(self) -> str:
        lines = [f"**{self.title}**", ""]
        lines.append("| " + " | ".join(self.headers) + " |")
        lines.append("|" + "|".join(" --- " for _ in self.headers) + "|")
        lines.extend("| " + " | ".join(row) + " |" for row in self.rows)
        lines.extend(["", *(f"{note}  " for note in self.notes)])
        return "\n".join(lines).rstrip() + "\n"


@dataclasses.dataclass
class Target:
    """One target of the issue, marked met or missed from what was measured."""

    text: str
    result: str
    met: bool | None  # None: could not be measured in this run (or has no threshold)
    limit: str = ""  # what limits it; shown when missed
    no_threshold: bool = False  # the issue asks for the numbers, with no pass mark

    @property
    def status(self) -> str:
        if self.met is None and self.no_threshold:
            return "measured (no threshold)"
        return {True: "met", False: "**missed**", None: "not measured"}[self.met]


@dataclasses.dataclass
class Section:
    number: int
    title: str
    intro: str = ""
    tables: list[Table] = dataclasses.field(default_factory=list)
    targets: list[Target] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    # Latency samples in microseconds for the plot, by "panel title|curve label".
    samples: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def markdown(self) -> str:
        parts = [f"## {self.number}. {self.title}\n"]
        if self.intro:
            parts.append(self.intro.strip() + "\n")
        parts.extend(table.markdown() for table in self.tables)
        if self.notes:
            parts.append("\n".join(f"- {note}" for note in self.notes) + "\n")
        return "\n".join(parts)


# -- statistics -----------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclasses.dataclass(frozen=True)
class Distribution:
    count: int
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        if not values:
            return cls(0, math.nan, math.nan, math.nan)
        return cls(len(values), percentile(values, 0.5), percentile(values, 0.99), max(values))


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def ratio(numerator: float, denominator: float) -> float:
    if denominator <= 0 or math.isnan(denominator) or math.isnan(numerator):
        return math.nan
    return numerator / denominator


# -- formatting -----------------------------------------------------------------------------------


def fmt_us(value: float) -> str:
    """Microseconds with a precision that suits the magnitude."""
    if math.isnan(value):
        return "n/a"
    if value >= 1000:
        return f"{value / 1000:.2f} ms"
    if value >= 100:
        return f"{value:.0f} µs"
    if value >= 10:
        return f"{value:.1f} µs"
    return f"{value:.2f} µs"


def fmt_ns(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return fmt_us(value / 1000) if value >= 1000 else f"{value:.0f} ns"


def fmt_ratio(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.2f}x" if value < 10 else f"{value:.0f}x"


def fmt_rate(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M/s"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k/s"
    return f"{value:.0f}/s"


def fmt_mb(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value / 2**20:.1f} MB"


def fmt_pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f} %"


# -- this process's CPU and memory (read by the workers about themselves) -------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """CPU time of this process, all its threads (exited ones included), user + system.

    CLOCK_PROCESS_CPUTIME_ID: the kernel's own per-process total, the same that ``/proc/self/stat``
    shows as utime + stime, but to the nanosecond instead of in 10 ms clock ticks (an idle
    process spends well under a tick per second).
    """
    return time.process_time()


def rss_bytes() -> int:
    """Resident set size of this process, from ``/proc/self/statm``."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def process_resources(pid: int) -> dict[str, float]:
    """Another process's CPU-seconds (all its threads), read from here as a worker reads its own
    (:func:`benchmarks.worker.resources`; no RSS): a server's, say. The scheduler's own count of
    each thread's run time, in ns (``/proc/PID/task/*/schedstat``), not the clock ticks of
    ``/proc/PID/stat``: a PostgreSQL backend spends well under a tick on one notification.
    Threads that have exited are not counted."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        path = f"/proc/{pid}/task/{task}/schedstat"
        # A thread that exits meanwhile is gone from both counts.
        with contextlib.suppress(FileNotFoundError), open(path, encoding="ascii") as schedstat:
            total += int(schedstat.read().split()[0])
    return {"cpu_s": total / 1e9, "rss": math.nan, "at_s": time.monotonic()}


# -- machine description ---------------------------------------------------------------------------


def machine() -> dict[str, str]:
    from importlib import metadata

    import django

    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    import platform

    return {
        "django-warpmesh": _code_version(),
        "nproc": str(os.cpu_count()),
        "CPU model": model,
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "Django": django.get_version(),
        "pynng": version("pynng"),
        "redis-py": version("redis"),
        "django-redis": version("django-redis"),
        "nats-py": version("nats-py"),
        "psycopg": version("psycopg"),
    }


def _code_version() -> str:
    """The commit measured, and whether the package had uncommitted changes."""
    import subprocess

    def git(*args: str) -> str:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", "django_warpmesh")
    except OSError:
        return "unknown"
    if not commit:
        return "unknown (not a git checkout)"
    return f"commit {commit}" + (" + uncommitted changes in django_warpmesh/" if changed else "")


# -- timeit-style timing ---------------------------------------------------------------------------


def timed_calls(call: Callable[[Any], object], args: Sequence[Any]) -> int:
    """Nanoseconds for ``call(arg)`` over ``args``, garbage collector off (as timeit does)."""
    gc.disable()
    try:
        started = time.perf_counter_ns()
        for arg in args:
            call(arg)
        return time.perf_counter_ns() - started
    finally:
        gc.enable()


def _nothing(arg: object) -> None:
    pass


def autorange(run: Callable[[int], int], min_time: float) -> int:
    """timeit's autorange: the smallest 1, 2, 5 x 10^k count whose run lasts ``min_time``."""
    for power in itertools.count():
        for step in (1, 2, 5):
            count = step * int(10**power)
            if run(count) >= min_time * 1e9:
                return count
    raise AssertionError("unreachable")


def compare_timings(
    runs: dict[str, Callable[[int], int]],
    *,
    min_time: float,
    rounds: int,
    loops: int,
    settle: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Nanoseconds per call of each run: the best of ``rounds`` medians of ``loops`` loops.

    ``runs[name](count)`` makes ``count`` calls and returns the nanoseconds they took. Each loop
    is calibrated to last at least ``min_time``; the cost of an empty loop of the same length is
    subtracted; the runs are interleaved loop by loop, in a random order, so a slow moment of the
    host hits them all alike;
    ``settle()`` runs after each loop, untimed (to let background threads finish their part).
    """
    counts = {name: autorange(run, min_time) for name, run in runs.items()}
    empty = {
        count: min(timed_calls(_nothing, [None] * count) for _ in range(5))
        for count in set(counts.values())
    }
    medians: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        per_loop: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(loops):
            # A new order every loop: no run always follows the same one, or sits at the same
            # phase of some periodic disturbance of the host.
            for name in random.sample(list(runs), len(runs)):
                count = counts[name]
                per_loop[name].append((runs[name](count) - empty[count]) / count)
                if settle is not None:
                    settle()
        for name in runs:
            medians[name].append(median(per_loop[name]))
    return {name: min(values) for name, values in medians.items()}


SERVERS = ("redis-server", "nats-server", "postgres")


class LoadMeter:
    """How busy the whole host was during the run, and who made it busy.

    Another job on a shared machine skews every number: the report says how much there was.
    """

    def __init__(self) -> None:
        self._start = (self._host(), self._own(), self._servers(), time.monotonic())

    @staticmethod
    def _host() -> float:
        """Busy CPU-seconds of the whole host so far (from ``/proc/stat``)."""
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
        return (sum(fields) - fields[3] - fields[4]) / _CLOCK_TICKS  # less idle and iowait

    @staticmethod
    def _own() -> float:
        times = os.times()  # this process and its reaped children (the workers)
        return times.user + times.system + times.children_user + times.children_system

    @staticmethod
    def _servers() -> dict[str, float]:
        """CPU-seconds so far of each process of the local servers the benchmarks drive."""
        seconds = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
                    text = stat.read()
            except OSError:
                continue
            name = text[text.find("(") + 1 : text.rfind(")")]
            if name.startswith(SERVERS):
                fields = text.rpartition(")")[2].split()
                seconds[pid] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
        return seconds

    def report(self) -> str:
        host0, own0, servers0, wall0 = self._start
        wall = max(1e-9, time.monotonic() - wall0)
        host = (self._host() - host0) / wall
        own = (self._own() - own0) / wall
        # Per process: a PostgreSQL backend that came and went in between is left out.
        servers = sum(now - servers0.get(pid, 0.0) for pid, now in self._servers().items()) / wall
        return (
            f"{host:.2f} cores busy on average: this benchmark's processes {own:.2f}, the "
            f"servers it drives {servers:.2f}, anything else {max(0.0, host - own - servers):.2f}"
        )
