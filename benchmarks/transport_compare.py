"""8. Transports: the nng mesh, NATS and PostgreSQL ``LISTEN``/``NOTIFY``, from 2 to 64 processes.

For each transport and fleet size, a fleet of its own whose nodes all use that
``WARPMESH["TRANSPORT"]``, measured as section 4 measures the mesh
(:func:`benchmarks.scale.measure`: connect time, idle CPU over whole heartbeat periods, write →
gone on each receiver and on all N-1, the fleet's CPU per write) plus the CPU of the broker's own
processes that serve the fleet (each PostgreSQL backend of the fleet, the NATS server); then, at
the smaller sizes, the same fleet with busy workers as section 7 has them
(:func:`benchmarks.loaded.measure`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from benchmarks import loaded, scale
from benchmarks.common import (
    Distribution,
    Section,
    Table,
    Target,
    fmt_pct,
    fmt_us,
    median,
    percentile,
)
from benchmarks.latency import GAP_S, WAIT_S
from benchmarks.procs import Worker, call_all
from benchmarks.scale import PerBlock, Row, Size

TITLE = "Transports: nng mesh vs NATS vs PostgreSQL"

NATS_URL = "nats://127.0.0.1:4222"
POSTGRESQL_URL = "postgresql://postgres@127.0.0.1:5432/test"


@dataclasses.dataclass(frozen=True)
class Transport:
    key: str
    label: str
    setting: str  # WARPMESH["TRANSPORT"]


TRANSPORTS = (
    Transport("nng", "nng mesh", "nng"),
    Transport("nats", "NATS", NATS_URL),
    Transport("postgresql", "PostgreSQL", POSTGRESQL_URL),
)
BROKERS = TRANSPORTS[1:]
LABELS = {transport.key: transport.label for transport in TRANSPORTS}
BOOTSTRAP = 400  # resamples for the standard error of a p99
# A busy window this long or longer is not the GIL's doing (5 ms a hand-off): see _busy_table.
STALL_US = 500_000
# Connections of the PostgreSQL server left to its other clients (a test suite running on the
# same host, say): a fleet that would take them is not started.
POSTGRESQL_HEADROOM = 16


@dataclasses.dataclass(frozen=True)
class Plan:
    idle: scale.Plan  # the sizes, writes and idle windows, as section 4 plans them
    loaded: loaded.Plan  # which sizes and slice lengths also run busy, as section 7 does


# As in section 4, the writes further apart at 32 and 64 (a write costs those fleets milliseconds
# of CPU on 2 cores), and fewer, but enough that the p99 the crossover is judged on is not just
# the slowest write; three blocks where the heartbeat period is 1 s (up to 9 processes), two at 32
# and 64, whose idle window is three periods of 3.9 and 7.9 s. About 5 minutes, most of it the
# fleets of 32 and 64 starting (64 Python and Django start-ups on 2 cores take 15-30 s) and
# their idle windows. --quick stops at 8 processes: under a minute.
FULL = Plan(
    idle=scale.Plan(
        sizes=(
            Size(2, 240, GAP_S, 4.0),
            Size(8, 240, GAP_S, 4.0),
            Size(32, 160, (0.015, 0.025), 8.0),
            Size(64, 120, (0.04, 0.06), 8.0),
        ),
        idle_periods=3.0,
        warmup_writes=20,
        blocks=3,
    ),
    loaded=loaded.Plan(
        sizes=(8,),
        slices_us=(200, 1000),
        blocks=1,
        block_rounds={8: 40},
        idle_s=0.5,
        session_cap_s=6.0,
        warmup_rounds=10,
    ),
)
QUICK = Plan(
    idle=scale.Plan(
        sizes=(Size(2, 100, GAP_S, 2.0), Size(8, 100, GAP_S, 2.0)),
        idle_periods=1.5,
        warmup_writes=10,
        blocks=2,
    ),
    loaded=loaded.Plan(
        sizes=(8,),
        slices_us=(1000,),
        blocks=1,
        block_rounds={8: 20},
        idle_s=0.3,
        session_cap_s=4.0,
        warmup_rounds=5,
    ),
)


@dataclasses.dataclass
class Results:
    rows: dict[tuple[str, int], Row] = dataclasses.field(default_factory=dict)
    missing: dict[tuple[str, int], str] = dataclasses.field(default_factory=dict)  # why not
    busy: dict[tuple[str, int, int], loaded.Result] = dataclasses.field(default_factory=dict)
    busy_missing: dict[tuple[str, int], str] = dataclasses.field(default_factory=dict)


# -- can this transport be measured here ------------------------------------------------------


def unavailable(transport: Transport, size: int) -> str | None:
    """Why a fleet of ``size`` cannot use ``transport`` on this host (None: it can): its client
    library missing, no server answering, too few PostgreSQL connections left."""
    if transport.key == "nats":
        return _nats_unavailable(transport.setting)
    if transport.key == "postgresql":
        return _postgresql_unavailable(transport.setting, size)
    return None


def _nats_unavailable(url: str) -> str | None:
    try:
        import nats  # noqa: F401
    except ImportError:
        return "nats-py is not installed (`pip install 'django-warpmesh[nats]'`)"
    parts = urlsplit(url)
    where = (parts.hostname or "127.0.0.1", parts.port or 4222)
    try:
        with socket.create_connection(where, timeout=3) as connection:
            connection.settimeout(3)
            greeting = connection.recv(4096)
    except OSError as exc:
        return f"no NATS server at {where[0]}:{where[1]} ({exc})"
    if not greeting.startswith(b"INFO"):
        return f"{where[0]}:{where[1]} does not answer as a NATS server"
    return None


def _postgresql_unavailable(url: str, size: int) -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg 3 is not installed (`pip install 'django-warpmesh[postgresql]'`)"
    try:
        with psycopg.connect(url, connect_timeout=3, autocommit=True) as connection:
            limit, reserved, used, superuser = connection.execute(
                "SELECT current_setting('max_connections')::int,"
                " current_setting('superuser_reserved_connections')::int,"
                " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'),"
                " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"
            ).fetchone()
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()
        parts = urlsplit(url)
        where = f"{parts.hostname}:{parts.port or 5432}"
        return f"no PostgreSQL server at {where} ({first[0] if first else exc})"
    free = limit - used - (0 if superuser else reserved)
    needed = 2 * size
    if needed + POSTGRESQL_HEADROOM > free:
        return (
            f"a fleet of {size} needs {needed} connections (a listener and a sender per process) "
            f"and the server has max_connections {limit}, {used} in use; {POSTGRESQL_HEADROOM} "
            "are left to its other clients"
        )
    return None


# -- the broker's processes, whose CPU counts with the fleet's -------------------------------


def broker_pids(transport: Transport) -> Callable[[Sequence[Worker]], list[int]] | None:
    """How to find the broker's processes that serve a fleet, on this host: each PostgreSQL
    backend of the fleet (its nodes' listener and sender sessions), or the NATS server."""
    if transport.key == "postgresql":
        return _postgresql_backends
    if transport.key == "nats":
        return lambda workers: _processes_named("nats-server")
    return None


def _postgresql_backends(workers: Sequence[Worker]) -> list[int]:
    pids = []
    for status in call_all(workers, "worker:mesh_status"):
        link = status["transport"]
        pids += [link[name] for name in ("listen_pid", "notify_pid") if link.get(name)]
    # Only if the server runs on this host: a backend pid names a process here.
    return [pid for pid in pids if _name(pid).startswith("postgres")]


def _processes_named(name: str) -> list[int]:
    return [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _name(int(pid)) == name]


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as comm:
            return comm.read().strip()
    except OSError:
        return ""


# -- measuring --------------------------------------------------------------------------------


def _busy(
    transport: Transport, size: int, plan: Plan, results: Results
) -> Callable[[list[Worker], Row], None] | None:
    """What a fleet of ``size`` also measures once idle: the same workers busy (section 7)."""
    if size not in plan.loaded.sizes:
        return None

    def measure(workers: list[Worker], row: Row) -> None:
        fleet = loaded.Fleet(workers, "mesh")
        try:
            for slice_us in plan.loaded.slices_us:
                print(f"    busy workers, {loaded._slice(slice_us)} slices", flush=True)
                results.busy[transport.key, size, slice_us] = loaded.measure(
                    fleet, slice_us, plan.loaded
                )
        except Exception as exc:  # the idle measurements stand
            first = str(exc).splitlines()[0] if str(exc) else ""
            results.busy_missing[transport.key, size] = f"{type(exc).__name__}: {first}"

    return measure


def _measure(transport: Transport, size: Size, plan: Plan, results: Results) -> None:
    started = time.monotonic()
    where = (transport.key, size.processes)
    reason = unavailable(transport, size.processes)
    if reason is not None:
        print(f"    not measured: {reason}", flush=True)
        results.missing[where] = reason
        return
    try:
        results.rows[where] = scale.measure(
            size,
            plan.idle,
            transport=transport.setting,
            brokers=broker_pids(transport),
            then=_busy(transport, size.processes, plan, results),
        )
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        results.missing[where] = f"{type(exc).__name__}: {first}"
        print(f"    failed: {results.missing[where]}", flush=True)
    print(f"    ({time.monotonic() - started:.0f} s)", flush=True)


def run(quick: bool) -> Section:
    plan = QUICK if quick else FULL
    section = Section(8, TITLE, intro=intro(plan))
    results = Results()
    for size in plan.idle.sizes:
        for transport in TRANSPORTS:
            print(f"  {transport.label}, {size.processes} processes", flush=True)
            _measure(transport, size, plan, results)
    _report(section, plan, results)
    return section


# -- the report -------------------------------------------------------------------------------

INTRO = """
The same fleets as section 4, once per `WARPMESH["TRANSPORT"]`: the nng mesh (every process
dials every other, static `PEERS`), NATS (`{nats}`: every process publishes each frame once to
the server, which fans it out) and PostgreSQL `LISTEN`/`NOTIFY` (`{postgresql}`: a listener
session and a sender session per process; each burst is one `pg_notify` statement, one commit).
Default settings otherwise; each fleet has a `SECRET` of its own, so a channel of its own on
the broker. Fleets of {sizes} processes on 127.0.0.1, each of its own, spawned at once. For each:
the time from the spawn until every node was ready, its link to the broker up (subscribed) and
every other node heard (a broker: their heartbeats, through it); the CPU of every process over
an idle window of whole heartbeat periods (the period grows with the fleet: 1 s up to 9
processes, 3.9 s at 32, 7.9 s at 64); write rounds as in section 4 (process 0 writes, each
receiver notes when the key went), timed on each receiver and until the key is gone on all N-1;
what the writes cost the fleet's processes in CPU beyond idle, and the broker's processes that
serve the fleet (the fleet's own PostgreSQL backends; the whole NATS server, which other
clients of the host may use meanwhile). Then, in the fleets of {busy} processes, the workers
busy as in section 7 ({slices} slices of pure Python, a cache read between two): write → first
read that no longer returns the old value.
"""


def intro(plan: Plan) -> str:
    return INTRO.format(
        nats=NATS_URL,
        postgresql=POSTGRESQL_URL,
        sizes=loaded._and([size.processes for size in plan.idle.sizes]),
        busy=loaded._and(plan.loaded.sizes),
        slices=loaded._and([loaded._slice(value) for value in plan.loaded.slices_us]),
    )


def _ordered(results: Results) -> list[tuple[int, Transport]]:
    sizes = sorted({size for _, size in [*results.rows, *results.missing]})
    return [(size, transport) for size in sizes for transport in TRANSPORTS]


def _cores(percents: Sequence[float]) -> str:
    return f"{sum(percents) / 100:.2f} cores" if percents else "n/a"


def _total(row: Row) -> PerBlock:
    """Fleet and broker together, block by block (the fleet alone where no broker was read)."""
    if not row.block_broker_us:
        return PerBlock.of(row.block_cpu_us)
    return PerBlock.of([a + b for a, b in zip(row.block_cpu_us, row.block_broker_us, strict=True)])


def _report(section: Section, plan: Plan, results: Results) -> None:
    latency = Table(
        "Writes, by fleet size and transport: write → key gone on a receiver, and on all N-1",
        ["processes", "transport", *scale.WRITE_COLUMNS],
    )
    cost = Table(
        "Connecting, idle and CPU per write, by fleet size and transport",
        [
            "processes",
            "transport",
            "all connected, from the spawn (last hello → connected)",
            "idle CPU per process (median / max)",
            "idle, the whole fleet",
            "idle, the broker's processes",
            "fleet CPU / write",
            "broker CPU / write",
            "fleet + broker CPU / write",
        ],
    )
    for size, transport in _ordered(results):
        row = results.rows.get((transport.key, size))
        if row is None:
            reason = results.missing.get((transport.key, size))
            if reason is not None:
                latency.add(size, transport.label, f"not measured: {reason}", *[""] * 6)
                cost.add(size, transport.label, f"not measured: {reason}", *[""] * 6)
            continue
        latency.add(size, transport.label, *scale.write_cells(row))
        broker = PerBlock.of(row.block_broker_us)
        cost.add(
            size,
            transport.label,
            f"{scale._seconds(row.connected)} ({scale._seconds(row.connected - row.startup)})",
            f"{fmt_pct(median(row.idle_pct))} / {fmt_pct(max(row.idle_pct))}",
            _cores(row.idle_pct),
            _cores(row.broker_idle_pct) if row.broker_idle_pct else "none",
            PerBlock.of(row.block_cpu_us),
            broker if row.block_broker_us else "none",
            _total(row),
        )
        if size in (8, max(s.processes for s in plan.idle.sizes)):
            panel = f"Transports, {size} processes: write → key gone on all N-1"
            section.samples[f"{panel}|{transport.label}"] = row.all_gone
    latency.notes.append(
        "As in section 4. Gone on all N-1: per write, the moment the last receiver had it gone. "
        f"Never gone: (write, receiver) pairs whose key was still there {WAIT_S:g} s after the "
        "block's last write; in brackets, any gap, flush, lost peer or broker link, overflow, "
        "refused send or rejected frame the nodes counted from the first write to the last."
    )
    cost.notes.append(
        "Connected: from the first process spawned until every node was ready, had its link up "
        "(a broker: subscribed) and had heard every other; in brackets, from the last process's "
        "hello (Python and Django started; the nodes then start together). Idle: each process's "
        "CPU over pieces of whole heartbeat periods before, between and after the blocks of "
        "writes. Fleet CPU / write: the sum over the fleet's processes of their CPU from a "
        "block's first write to its last key gone, less their idle rate over as long, per write, "
        "± the standard error over the blocks; it includes one control call per process and "
        "block. Broker: the same of the broker's processes on this host, read from "
        "/proc/PID/task/*/schedstat (the scheduler's ns): for PostgreSQL the fleet's own "
        "backends (2 per process; not the WAL writer, which flushes the commits' WAL "
        "asynchronously), for NATS the whole nats-server process (other clients of the server "
        "count too, if any were busy meanwhile)."
    )
    section.tables += [latency, cost]
    _busy_table(section, plan, results)
    _crossover(section, results)
    _targets(section, results)


def _busy_table(section: Section, plan: Plan, results: Results) -> None:
    table = Table(
        "Busy workers: write → first read that no longer returns the old value (receivers pooled)",
        [
            "processes",
            "slices",
            "transport",
            "p50",
            "p99",
            "max",
            "key gone p50 / p99",
            "writer CPU / invalidation",
            "receiver CPU / invalidation",
            "samples",
            "not seen within 1 s",
        ],
    )
    for size in plan.loaded.sizes:
        for slice_us in plan.loaded.slices_us:
            for transport in TRANSPORTS:
                result = results.busy.get((transport.key, size, slice_us))
                if result is None:
                    why = results.busy_missing.get((transport.key, size)) or results.missing.get(
                        (transport.key, size)
                    )
                    if why:
                        table.add(size, loaded._slice(slice_us), transport.label, why, *[""] * 7)
                    continue
                window, gone = Distribution.of(result.windows), Distribution.of(result.delivered)
                table.add(
                    size,
                    loaded._slice(slice_us),
                    transport.label,
                    fmt_us(window.p50),
                    fmt_us(window.p99),
                    fmt_us(window.max),
                    f"{fmt_us(gone.p50)} / {fmt_us(gone.p99)}",
                    fmt_us(result.cpu_us(receivers=False)),
                    fmt_us(result.cpu_us(receivers=True)),
                    window.count,
                    result.never,
                )
    table.notes.append(
        "As in section 7, in the same fleets as above after their idle measurements: every "
        "process's main thread computes in slices and reads the key between two; the window "
        "ends with the first read that no longer returns the old value. CPU per invalidation: "
        "each process's CPU beyond its busy slices, less the same in a run with nobody writing "
        "(the broker's processes not included). A broker puts a Python thread of its own on "
        "each side of the path: on the writer the transport's thread that publishes (nats-py's "
        "event loop; the PostgreSQL sender), on each receiver the one that reads (the same loop; "
        "the PostgreSQL listener) before the frame waits in the node's inbox; each must get the "
        "GIL from a busy main thread. With nng the writing thread sends itself and nng's own "
        "threads (no GIL) receive, so a receiver's read drains the frame with no hand-off."
    )
    stalls = [
        f"{LABELS[transport]} at {size} processes, {loaded._slice(slice_us)} slices: "
        + ", ".join(fmt_us(value) for value in sorted(result.windows) if value >= STALL_US)
        for (transport, size, slice_us), result in results.busy.items()
        if any(value >= STALL_US for value in result.windows)
    ]
    if stalls:
        table.notes.append(
            f"Windows of {fmt_us(STALL_US)} or more ({'; '.join(stalls)}): close to the "
            "heartbeat period (1 s). Traced with timestamps in the writer's node (outside this "
            "run): in such a round the writing thread's `deliver()` found the send lock held by "
            "the sender thread, returned leaving the frame queued, and did not wake that "
            "thread, which sent the frame only when it woke for its next heartbeat, every "
            "receiver late by the same. A busy main thread widens that window: the sender "
            "thread waits for the GIL while it holds the lock."
        )
    section.tables.append(table)


@dataclasses.dataclass(frozen=True)
class Verdict:
    size: int
    wins: bool  # lower, by more than the noise
    lower: bool  # lower, maybe within the noise
    text: str


def compare(
    results: Results, broker: Transport, figure: Callable[[Row], tuple[float, float]]
) -> list[Verdict]:
    """Size by size, whether ``broker`` beats the nng mesh on ``figure`` (value, standard error:
    lower is better); a difference within twice the combined error is no win either way."""
    verdicts = []
    for (key, size), row in sorted(results.rows.items(), key=lambda item: item[0][1]):
        mesh = results.rows.get(("nng", size))
        if key != broker.key or mesh is None:
            continue
        (value, error), (base, base_error) = figure(row), figure(mesh)
        noise = 2 * math.hypot(*(e for e in (error, base_error) if not math.isnan(e)))
        wins = value < base and base - value > noise
        close = abs(base - value) <= noise
        text = f"{size}: {fmt_us(value)} vs {fmt_us(base)}" + (" (within noise)" if close else "")
        verdicts.append(Verdict(size, wins, value < base, text))
    return verdicts


def crossover(verdicts: Sequence[Verdict]) -> int | None:
    """The smallest size from which the broker wins at every larger size measured."""
    first = None
    for verdict in reversed(verdicts):
        if not verdict.wins:
            break
        first = verdict.size
    return first


def _all_gone_p99(row: Row) -> tuple[float, float]:
    """The all-gone p99 and its standard error, by bootstrap over the writes (the same
    resamples every time): with 120 writes the p99 is the second slowest, and moves a lot."""
    samples = row.all_gone
    if len(samples) < 2:
        return Distribution.of(samples).p99, math.nan
    rng = random.Random(len(samples))
    again = [percentile(rng.choices(samples, k=len(samples)), 0.99) for _ in range(BOOTSTRAP)]
    return percentile(samples, 0.99), statistics.stdev(again)


def _cpu(row: Row) -> tuple[float, float]:
    total = _total(row)
    return total.mean, total.error


FIGURES = (
    ("all-gone p99", _all_gone_p99),
    ("fleet + broker CPU per write", _cpu),
)


def _crossover(section: Section, results: Results) -> None:
    section.notes.append(
        "Crossover, size by size: a broker wins where its figure is lower than the nng mesh's "
        "by more than twice their combined standard error (CPU: over the blocks; all-gone p99: "
        f"a bootstrap over the writes, {BOOTSTRAP} resamples); the crossover is the smallest "
        "size from which it wins at every larger size measured. One host of 2 cores: the "
        "broker's server shares the cores with the fleet, and every receiver's own work "
        "(verify, decode, apply, in Python) is the same whatever the transport; what differs is "
        "the fan-out: N-1 sends by the writer's nng threads, or one publish and the server's "
        "fan-out."
    )
    for broker in BROKERS:
        for name, figure in FIGURES:
            verdicts = compare(results, broker, figure)
            if not verdicts:
                text = "no size measured with both"
                section.notes.append(f"{broker.label} vs the nng mesh, {name}: {text}.")
                section.targets.append(
                    Target(f"crossover: {broker.label} vs the nng mesh, {name}", text, None)
                )
                continue
            at = crossover(verdicts)
            wins = [verdict.size for verdict in verdicts if verdict.wins]
            if at is not None:
                summary = f"{broker.label} wins from {at} processes on"
            elif wins:
                summary = f"{broker.label} wins at {loaded._and(wins)} only, not beyond"
            else:
                summary = f"{broker.label} wins at no size measured"
                lower = [verdict.size for verdict in verdicts if verdict.lower]
                if lower:
                    summary += f" (lower at {loaded._and(lower)}, within the noise)"
            detail = "; ".join(verdict.text for verdict in verdicts)
            missing = sorted(size for key, size in results.missing if key == broker.key)
            if missing:
                summary += f" (not measured at {loaded._and(missing)})"
            section.notes.append(
                f"**{broker.label} vs the nng mesh, {name}**: {summary} ({detail}; "
                f"{broker.label} first)."
            )
            section.targets.append(
                Target(
                    f"crossover: where {broker.label} beats the nng mesh on {name}",
                    f"{summary}: {detail}",
                    None,
                    no_threshold=True,
                )
            )


def _targets(section: Section, results: Results) -> None:
    lost = {
        key: row.lost + sum(row.incidents.values()) for key, row in sorted(results.rows.items())
    }
    bad = [f"{LABELS[key]} at {size}: {count}" for (key, size), count in lost.items() if count]
    section.targets.append(
        Target(
            "every transport, every size: nothing lost",
            "; ".join(bad) if bad else f"nothing lost in {len(lost)} fleets",
            not bad if lost else None,
            "see the never gone column",
        )
    )
    for (key, size), reason in sorted(results.missing.items()):
        section.notes.append(f"{LABELS[key]} at {size} processes: not measured: {reason}.")
