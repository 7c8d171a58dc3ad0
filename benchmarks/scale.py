"""4. Scale: the mesh alone on fleets of 2 to 64 processes, one fleet of its own per size.

Per fleet, in this order: how long from the spawn until every node has every other as a live
peer (and how much of it was Python and Django starting); then blocks of writes, timed on every
receiver and until the last one, with the CPU they cost the whole fleet, between the pieces of a
window in which nothing is written (every process's CPU at rest); memory.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence

from benchmarks.common import (
    Distribution,
    Section,
    Table,
    Target,
    fmt_mb,
    fmt_pct,
    fmt_us,
    median,
    process_resources,
)
from benchmarks.latency import GAP_S, WAIT_S
from benchmarks.procs import Worker, call_all, mesh_fleet, spawn

TITLE = "Scale: 2 to 64 processes"

INTRO = """
The mesh alone on fleets of 2 to 64 worker processes on 127.0.0.1 (static `PEERS`, default
settings), on 2 cores: each size is a fleet of its own, its processes spawned all at once. For
each: the time from the spawn until every node has every other as a live peer, split into the
processes' start-up (Python and Django, until the last one said hello; then every node starts at
once, as a fleet deployed together starts serving) and the mesh's connection; then write rounds
as in section 2 (process 0 writes, each receiver stores the key locally first and notes when it
went), timed on every receiver and until the key is gone on all N-1 of them; the CPU the rounds
cost each process and the whole fleet; each process's RSS against a worker with `ENABLED` false
that did the same; and the CPU of every process over a window in which nothing is written, cut
in pieces before, between and after the blocks of writes. Fleets of 32 and 64 get fewer writes,
further apart, so that each write still travels alone: one write there costs the fleet
milliseconds of CPU, on 2 cores.
"""

# The node's counters that move when something was lost on the way: any of them moving during
# the writes means a frame or a peer went missing, even if every key went (a flush also removes
# the keys).
INCIDENTS = (
    "gaps_detected",
    "flushes",
    "peers_lost",
    "queue_overflows",
    "send_errors",
    "frames_rejected",
    "pipes_dropped",
    "transport_losses",
)
START_TIMEOUT = 180.0  # spawn → every process said hello (64 took ~30 s here)
CONNECT_TIMEOUT = 180.0  # every node started → every node has every peer
HEARTBEAT_S = 1.0  # the nodes' heartbeat period when they do not report it: HEARTBEAT's default
SETTLE_S = 0.5  # after writes: the last frames and acknowledgements pass before an idle piece


@dataclasses.dataclass(frozen=True)
class Size:
    processes: int
    writes: int
    gap_s: tuple[float, float]  # between writes, random: each travels alone, the fleet not busy
    idle_s: float  # the idle window at least (longer if the heartbeat period asks for it)


@dataclasses.dataclass(frozen=True)
class Plan:
    sizes: tuple[Size, ...]
    idle_periods: float  # the idle window covers at least this many heartbeat periods
    warmup_writes: int
    blocks: int = 4  # the writes in this many blocks, each between two pieces of the idle window


# Up to 16 the writes are as close as in section 2 (2-4 ms; a write costs the fleet ~3 ms of CPU
# at 16). At 32 and 64 a write costs the fleet ~8 and ~15 ms of CPU, on a host the idle fleet
# already keeps up to a core busy: 15-25 and 40-60 ms apart, the last receiver has it before the
# next write, most of the time.
FULL = Plan(
    sizes=(
        Size(2, 400, GAP_S, 5.0),
        Size(4, 400, GAP_S, 5.0),
        Size(8, 400, GAP_S, 5.0),
        Size(16, 400, GAP_S, 5.0),
        Size(32, 100, (0.015, 0.025), 10.0),
        Size(64, 100, (0.04, 0.06), 10.0),
    ),
    idle_periods=3.0,
    warmup_writes=20,
)
QUICK = Plan(
    sizes=(
        Size(2, 100, GAP_S, 2.0),
        Size(4, 100, GAP_S, 2.0),
        Size(8, 100, GAP_S, 2.0),
        Size(16, 100, GAP_S, 2.0),
        Size(32, 40, (0.015, 0.025), 5.0),
        Size(64, 40, (0.04, 0.06), 5.0),
    ),
    idle_periods=1.5,
    warmup_writes=10,
)


@dataclasses.dataclass
class Row:
    size: int
    startup_s: list[float]  # from the fleet's first spawn to each process's hello
    connected_s: list[float]  # from the fleet's first spawn to each node having every peer
    writes: int = 0
    gap_s: tuple[float, float] = (0.0, 0.0)
    blocks: int = 0
    samples: list[float] = dataclasses.field(default_factory=list)  # µs, (write, receiver)
    all_gone: list[float] = dataclasses.field(default_factory=list)  # µs, per write: the last
    lost: int = 0  # (write, receiver) pairs whose key never went
    incidents: dict[str, int] = dataclasses.field(default_factory=dict)
    cpu_s: list[float] = dataclasses.field(default_factory=list)  # beyond idle, writer first
    # The whole fleet's CPU per write beyond idle (µs), block by block; and the same of the
    # broker's processes that serve the fleet (none with nng).
    block_cpu_us: list[float] = dataclasses.field(default_factory=list)
    block_broker_us: list[float] = dataclasses.field(default_factory=list)
    rss: float = math.nan  # median over the fleet
    idle_pct: list[float] = dataclasses.field(default_factory=list)  # % of one core, each
    broker_idle_pct: list[float] = dataclasses.field(default_factory=list)  # each broker process
    idle_s: float = math.nan
    heartbeat_s: float | None = None  # the period the nodes reported (None: not reported)

    def cpu_us(self, receivers: bool) -> float:
        """CPU per write beyond idle: the writer's, or the median receiver's (µs)."""
        if not self.writes or not self.cpu_s:
            return math.nan
        spent = median(self.cpu_s[1:]) if receivers else self.cpu_s[0]
        return spent / self.writes * 1e6

    @property
    def fleet_cpu_us(self) -> float:
        """The whole fleet's CPU per write beyond idle (µs): the mean over the blocks."""
        return PerBlock.of(self.block_cpu_us).mean

    @property
    def fleet_cpu_error_us(self) -> float:
        return PerBlock.of(self.block_cpu_us).error

    @property
    def startup(self) -> float:
        """Until the last process said hello (the nodes start after it)."""
        return max(self.startup_s, default=math.nan)

    @property
    def connected(self) -> float:
        return max(self.connected_s, default=math.nan)


@dataclasses.dataclass(frozen=True)
class PerBlock:
    """A per-write figure measured block by block: its mean (never below zero: what idle
    costs is subtracted, and a small cost may come out negative) and the mean's standard error
    (NaN with one block)."""

    mean: float
    error: float

    @classmethod
    def of(cls, values: Sequence[float]) -> PerBlock:
        if not values:
            return cls(math.nan, math.nan)
        error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
        return cls(max(0.0, statistics.fmean(values)), error)

    def __str__(self) -> str:
        return fmt_us(self.mean) + ("" if math.isnan(self.error) else f" ± {fmt_us(self.error)}")


class Meter:
    """CPU readings of a fleet's workers (each reads its own) and of the broker's processes that
    serve it (``pids``, read from here), in that order, as :func:`benchmarks.worker.resources`
    gives them."""

    def __init__(self, workers: Sequence[Worker], pids: Sequence[int] = ()) -> None:
        self.workers = workers
        self.pids = tuple(pids)

    def read(self) -> list[dict[str, float]]:
        # Every call to the whole fleet goes to all its processes at once: one by one, each
        # answer would wait for a core behind the others.
        return call_all(self.workers, "worker:resources") + [
            process_resources(pid) for pid in self.pids
        ]


def _counters(workers: Sequence[Worker]) -> list[dict[str, int]]:
    return [status["counters"] for status in call_all(workers, "worker:mesh_status")]


def _write(
    meter: Meter, keys: list[str], gap_s: tuple[float, float]
) -> tuple[list[int], list[dict[str, int | None]], list[dict[str, float]], list[dict[str, float]]]:
    """Arm ``keys`` on the receivers, write them on the writer, ``gap_s`` apart, and wait for them
    to go: when each was written, when it went on each receiver, and every process's resources
    just before the first write and once the last key went (or was given up on)."""
    writer, *receivers = meter.workers
    call_all(receivers, "transports:arm", system="mesh", keys=keys)
    gaps = [random.uniform(*gap_s) for _ in keys]
    before = meter.read()
    sent = writer.call(
        "transports:write", timeout=60 + 2 * sum(gaps), system="mesh", keys=keys, gaps=gaps
    )
    gone = call_all(
        receivers, "transports:wait", timeout=WAIT_S + 60, system="mesh", keys=keys, within=WAIT_S
    )
    after = meter.read()
    return sent, gone, before, after


def _idle(meter: Meter, seconds: float) -> list[tuple[float, float]]:
    """Each process's CPU-seconds over ``seconds`` of nothing written, and the seconds, as
    the process read both (each its own clock: the readings do not happen all at once)."""
    before = meter.read()
    time.sleep(seconds)
    after = meter.read()
    return [
        (a["cpu_s"] - b["cpu_s"], a["at_s"] - b["at_s"]) for b, a in zip(before, after, strict=True)
    ]


def _rates(*pieces: list[tuple[float, float]]) -> list[float]:
    """Each process's idle CPU-seconds per second over ``pieces`` of the idle window."""
    return [
        sum(cpu for cpu, _ in spans) / sum(seconds for _, seconds in spans)
        for spans in zip(*pieces, strict=True)
    ]


def _pieces(size: Size, plan: Plan, period: float) -> tuple[int, float]:
    """How many blocks of writes, and how long each piece of the idle window around them.

    Each piece lasts whole heartbeat periods: nodes started together beat together, so the
    fleet's idle CPU comes in one burst per period, and a shorter window would catch it or
    not (0.1 % or 0.9 % per process, at 16 processes). Fewer blocks when the period is long.
    """
    total = max(size.idle_s, plan.idle_periods * period)
    blocks = max(1, min(plan.blocks, round(total / period) - 1))
    return blocks, period * max(1, round(total / (blocks + 1) / period))


def _heartbeat_period(workers: Sequence[Worker]) -> float | None:
    """The longest heartbeat period the nodes report, if they report one."""
    periods = [s["heartbeat_period"] for s in call_all(workers, "worker:mesh_status")]
    known = [float(period) for period in periods if period is not None]
    return max(known) if known else None


def _connected(workers: Sequence[Worker]) -> Row:
    """A fleet's row, with when each process said hello and had every peer."""
    spawned = min(worker.spawned_ns for worker in workers)
    row = Row(
        len(workers),
        startup_s=[(worker.hello_ns - spawned) / 1e9 for worker in workers],
        connected_s=[(worker.connected_ns - spawned) / 1e9 for worker in workers],
    )
    print(
        f"    {row.size} processes: connected {row.connected:.1f} s after the spawn "
        f"(the last hello after {row.startup:.1f} s)",
        flush=True,
    )
    return row


def _latencies(
    row: Row, keys: list[str], sent: list[int], gone: list[dict[str, int | None]]
) -> None:
    """Add one block's writes to ``row``: per receiver, and until the last receiver."""
    row.writes += len(keys)
    for key, started in zip(keys, sent, strict=True):
        spans = []
        for went in (receiver[key] for receiver in gone):
            if went is None:
                row.lost += 1
            else:
                spans.append((went - started) / 1000)
        row.samples += spans
        if len(spans) == len(gone):  # gone everywhere: when the last receiver had it
            row.all_gone.append(max(spans))


def measure(
    size: Size,
    plan: Plan,
    transport: str = "nng",
    brokers: Callable[[Sequence[Worker]], Sequence[int]] | None = None,
    then: Callable[[list[Worker], Row], None] | None = None,
) -> Row:
    """One fleet of ``size.processes`` whose nodes use ``transport`` (see :func:`mesh_fleet`),
    measured as this module says. ``brokers(workers)``: the pids of the broker's processes that
    serve the fleet, whose CPU is measured along with the fleet's (and reported apart).
    ``then(workers, row)``: more measurements in the same fleet, after these."""
    with mesh_fleet(
        size.processes,
        connect_timeout=CONNECT_TIMEOUT,
        start_timeout=START_TIMEOUT,
        transport=transport,
    ) as workers:
        row = _connected(workers)
        row.gap_s = size.gap_s
        meter = Meter(workers, brokers(workers) if brokers else ())
        fleet = len(workers)  # the readings of the fleet's processes; the broker's after them
        call_all(workers, "transports:open_transport", system="mesh")
        _write(meter, [f"warm-{i}" for i in range(plan.warmup_writes)], size.gap_s)
        time.sleep(SETTLE_S)
        row.heartbeat_s = _heartbeat_period(workers)
        # The writes in blocks between pieces of the idle window: at 64 processes the idle
        # fleet burns a core, a write a few ms of CPU, and the idle rate wanders by several %
        # from one few-second window to the next. Each block is measured against the idle
        # pieces on either side of it, and the blocks' spread says how far the result may be off.
        blocks, piece = _pieces(size, plan, row.heartbeat_s or HEARTBEAT_S)
        row.idle_s, row.blocks = piece * (blocks + 1), blocks
        rests = [_idle(meter, piece)]
        counted = _counters(workers)
        row.cpu_s = [0.0] * fleet
        for block in range(blocks):
            keys = [f"scale-{block}-{i}" for i in range(size.writes // blocks)]
            sent, gone, before, after = _write(meter, keys, size.gap_s)
            _latencies(row, keys, sent, gone)
            row.rss = median([reading["rss"] for reading in after[:fleet]])
            time.sleep(SETTLE_S)
            rests.append(_idle(meter, piece))
            idle = _rates(rests[-2], rests[-1])
            # Beyond idle: what each process spent over the block less what it burns at rest
            # over as long. The fleet's total is summed before any rounding to zero.
            beyond = [
                (a["cpu_s"] - b["cpu_s"]) - rate * (a["at_s"] - b["at_s"])
                for b, a, rate in zip(before, after, idle, strict=True)
            ]
            spent = beyond[:fleet]
            row.cpu_s = [total + cpu for total, cpu in zip(row.cpu_s, spent, strict=True)]
            row.block_cpu_us.append(sum(spent) / len(keys) * 1e6)
            if meter.pids:
                row.block_broker_us.append(sum(beyond[fleet:]) / len(keys) * 1e6)
        counts = _counters(workers)
        row.incidents = {
            name: sum(b.get(name, 0) - a.get(name, 0) for a, b in zip(counted, counts, strict=True))
            for name in INCIDENTS
        }
        row.cpu_s = [max(0.0, spent) for spent in row.cpu_s]
        rates = _rates(*rests)
        row.idle_pct = [rate * 100 for rate in rates[:fleet]]
        row.broker_idle_pct = [rate * 100 for rate in rates[fleet:]]
        if then is not None:
            then(workers, row)
        return row


def control_rss(writes: int) -> float:
    """RSS of a worker with the mesh off that did what a fleet worker did, minus the mesh."""
    (control,) = spawn([("mesh-off", {"ENABLED": False}, None)])
    try:
        control.call("transports:open_transport", system="mesh")
        control.call("transports:arm", system="mesh", keys=[f"k{i}" for i in range(writes)])
        return float(control.call("worker:resources")["rss"])
    finally:
        control.close()


def run(quick: bool) -> Section:
    plan = QUICK if quick else FULL
    section = Section(4, TITLE, intro=INTRO)
    errors: list[str] = []
    baseline_rss = control_rss(max(size.writes for size in plan.sizes))
    rows: list[Row] = []
    for size in plan.sizes:
        print(f"  fleet of {size.processes} processes", flush=True)
        try:
            rows.append(measure(size, plan))
        except Exception as exc:
            errors.append(f"fleet of {size.processes}: {type(exc).__name__}: {exc}")
    _report(section, rows, baseline_rss, plan.sizes[-1].processes)
    section.notes += errors
    return section


def _seconds(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f} s"


def _apart(gap_s: tuple[float, float]) -> str:
    return f"{gap_s[0] * 1000:g}-{gap_s[1] * 1000:g} ms"


def _lost(row: Row) -> str:
    """Keys never gone, and what the counters say went missing on the way."""
    moved = [f"{name.replace('_', ' ')} {count}" for name, count in row.incidents.items() if count]
    return str(row.lost) + (f" ({', '.join(moved)})" if moved else "")


# The columns of a fleet's writes (see write_cells).
WRITE_COLUMNS = [
    "writes (blocks x writes, apart)",
    "on a receiver: p50",
    "p99",
    "gone on all N-1: p50",
    "p99",
    "max",
    "never gone",
]


def write_cells(row: Row) -> list[str]:
    """A fleet's writes: how many, latency on each receiver and until the last, keys lost."""
    each, last = Distribution.of(row.samples), Distribution.of(row.all_gone)
    return [
        f"{row.blocks} x {row.writes // max(1, row.blocks)}, {_apart(row.gap_s)}",
        fmt_us(each.p50),
        fmt_us(each.p99),
        fmt_us(last.p50),
        fmt_us(last.p99),
        fmt_us(last.max),
        _lost(row),
    ]


def _report(section: Section, rows: list[Row], baseline_rss: float, largest: int) -> None:
    writes = Table(
        "Writes, by fleet size: write → key gone on a receiver, and on all N-1 of them",
        [
            "processes",
            *WRITE_COLUMNS,
            "writer CPU / write",
            "receiver CPU / write (median)",
            "fleet CPU / write",
        ],
    )
    for row in rows:
        writes.add(
            row.size,
            *write_cells(row),
            fmt_us(row.cpu_us(receivers=False)),
            fmt_us(row.cpu_us(receivers=True)),
            PerBlock.of(row.block_cpu_us),
        )
        section.samples[f"django-warpmesh alone, on a receiver|{row.size} processes"] = row.samples
        section.samples[f"django-warpmesh alone, gone on all N-1|{row.size} processes"] = (
            row.all_gone
        )
    writes.notes.append(
        "Gone on all N-1: per write, the moment the last receiver had it gone (a write some "
        "receiver never saw counts in never gone, not here). Never gone: (write, receiver) pairs "
        f"whose key was still there {WAIT_S:g} s after the block's last write; in brackets, any "
        "gap, flush, lost peer, overflow or rejected frame the nodes counted from the first "
        f"write to the last. The writes go in blocks (up to {FULL.blocks}, fewer when the "
        "heartbeat period is long), each between two pieces of the idle window (next table). "
        "CPU: each process's CPU time, all threads, read by the "
        "process itself (CLOCK_PROCESS_CPUTIME_ID), from just before a block's first write to "
        "just after its last key went, less what the same process burned idle in the pieces "
        "on either side over as long, per write. Fleet: the sum over every process of the "
        "fleet, writer included: what one write costs the host. It still includes one control "
        "call per process and block (the wait for the keys). ±: the standard error over the "
        "blocks: in a big fleet a write's cost is a small difference of large numbers (at 64 "
        "processes the idle fleet alone may burn a core, and its rate wanders by several % "
        "from one few-second window to the next)."
    )
    section.tables.append(writes)

    rest = Table(
        "Connecting, memory and rest, by fleet size",
        [
            "processes",
            "all connected, from the spawn",
            "start-up: last hello (median)",
            "mesh: last hello → all connected",
            "RSS (median)",
            "RSS the mesh adds",
            "idle CPU per process (median / max)",
            "idle, the whole fleet",
            "idle window (heartbeat period)",
        ],
    )
    for row in rows:
        period = "not reported" if row.heartbeat_s is None else f"{row.heartbeat_s:g} s"
        rest.add(
            row.size,
            _seconds(row.connected),
            f"{_seconds(row.startup)} ({_seconds(median(row.startup_s))})",
            _seconds(row.connected - row.startup),
            fmt_mb(row.rss),
            fmt_mb(row.rss - baseline_rss),
            f"{fmt_pct(median(row.idle_pct))} / {fmt_pct(max(row.idle_pct))}",
            f"{sum(row.idle_pct) / 100:.2f} cores",
            f"{row.idle_s:.0f} s ({period})",
        )
    rest.notes.append(
        "Connected: from the first process spawned until every node had every other as a live "
        "peer and was ready, as each node saw it (polled in the process, every 0.1 s). "
        "Start-up: Python, Django and the caches, until the process said hello; every node "
        "starts once the last one has, so the mesh's part is from there. RSS the mesh adds: "
        "median RSS of the fleet after the writes minus a process with ENABLED false that did "
        f"the same ({fmt_mb(baseline_rss)}). Idle: nothing written, each process's CPU time over "
        "its own clock, over a window of at least "
        f"{FULL.idle_periods:g} heartbeat periods ({QUICK.idle_periods:g} with `--quick`; the "
        "period the nodes report, when they report one, else HEARTBEAT, 1 s by default), in "
        "pieces of whole periods before, between and after the blocks of writes: nodes started "
        "together beat together, so a fleet's idle CPU comes in one burst per period."
    )
    section.tables.append(rest)
    _targets(section, rows, baseline_rss, largest)


def _targets(section: Section, rows: list[Row], baseline_rss: float, largest: int) -> None:
    if not rows:
        section.targets += [
            Target("memory the mesh adds under 10 MB per process", "no fleet ran", None),
            Target("idle CPU under 1% of a core", "no fleet ran", None),
        ]
    else:
        worst_rss = max(row.rss - baseline_rss for row in rows)
        worst_idle = max(max(row.idle_pct) for row in rows)
        sizes = f"{rows[0].size}-{rows[-1].size} processes"
        section.targets.append(
            Target(
                f"memory the mesh adds under 10 MB per process ({sizes})",
                f"at most {fmt_mb(worst_rss)}",
                worst_rss < 10 * 2**20,
                "nng's own threads and buffers, sized by BUFFER_SIZE",
            )
        )
        section.targets.append(
            Target(
                f"idle CPU under 1% of a core ({sizes})",
                f"at most {fmt_pct(worst_idle)}",
                worst_idle < 1.0,
                "what an idle node does: its receiver thread's tick (4 a second) and the "
                "heartbeats of every peer, each verified and answered in Python: with a fixed "
                "period it grows with the fleet",
            )
        )
    section.targets.append(
        Target(
            f"the fleet's CPU per write ({rows[0].size}-{rows[-1].size} processes)"
            if rows
            else "the fleet's CPU per write",
            ", ".join(f"{row.size}: {PerBlock.of(row.block_cpu_us)}" for row in rows)
            or "no fleet ran",
            None,
            no_threshold=True,
        )
    )
    row = next((row for row in rows if row.size == largest), None)
    others = largest - 1
    if row is None:
        missing = f"the fleet of {largest} did not run"
        section.targets += [
            Target(f"{largest} processes: {text}", missing, None)
            for text in (
                "idle CPU per process at most 0.5% of a core (median)",
                f"a write gone on all {others} others, p99 at most 50 ms",
                "all connected within 60 s of the processes starting",
                "nothing lost",
            )
        ]
        return
    idle = median(row.idle_pct)
    period = f"{row.heartbeat_s:g} s" if row.heartbeat_s is not None else "1 s (HEARTBEAT)"
    section.targets.append(
        Target(
            f"{largest} processes: idle CPU per process at most 0.5% of a core (median)",
            f"{fmt_pct(idle)} (max {fmt_pct(max(row.idle_pct))})",
            idle <= 0.5,
            f"heartbeats: each node hears every one of its {others} peers every {period} and "
            "verifies (HMAC), decodes and answers each in Python, on top of its receiver "
            "thread's tick (4 a second)",
        )
    )
    last = Distribution.of(row.all_gone)
    idle_cores = sum(row.idle_pct) / 100
    section.targets.append(
        Target(
            f"{largest} processes: a write gone on all {others} others, p99 at most 50 ms",
            f"p99 {fmt_us(last.p99)} (p50 {fmt_us(last.p50)}, {last.count} writes)",
            last.p99 <= 50_000 if last.count else None,
            f"the CPU of {others} receivers on 2 cores: a write costs the fleet "
            f"{fmt_us(row.fleet_cpu_us)} of CPU (each receiver verifies, decodes and applies in "
            f"Python), so the last receiver waits for the others' turns, on a host the idle "
            f"fleet already keeps {idle_cores:.2f} cores busy, its heartbeats in one burst per "
            "period (nodes started together beat together) that a write may land behind",
        )
    )
    section.targets.append(
        Target(
            f"{largest} processes: all connected within 60 s of the processes starting",
            f"{_seconds(row.connected)} (start-up {_seconds(row.startup)}, then the mesh "
            f"{_seconds(row.connected - row.startup)})",
            row.connected <= 60.0,
            f"{largest} Python and Django start-ups sharing 2 cores "
            f"({_seconds(row.startup)} until the last said hello), then {largest} nodes "
            f"dialling {others} peers each ({_seconds(row.connected - row.startup)})",
        )
    )
    incidents = sum(row.incidents.values())
    section.targets.append(
        Target(
            f"{largest} processes: nothing lost",
            f"{row.lost} of {row.writes * others} (write, receiver) pairs never gone, "
            f"{incidents} gaps, flushes, lost peers or rejected frames",
            row.lost == 0 and incidents == 0,
            "see the never gone column",
        )
    )
