"""2. End-to-end invalidation latency: one fleet of N processes per size, N up to 8.

Per fleet: the mesh side by side with raw nng, Redis Pub/Sub and NATS, with the CPU each costs.
Section 4 (:mod:`benchmarks.scale`) has fleets of its own, up to 64 processes, the mesh alone.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from benchmarks import latency_stages
from benchmarks.common import (
    Distribution,
    Section,
    Table,
    Target,
    fmt_ratio,
    fmt_us,
    median,
    percentile,
    ratio,
)
from benchmarks.procs import Worker, mesh_fleet
from harness import free_ports

T = TypeVar("T")
SYSTEMS = ("mesh", "nng", "redis", "nats")
LABELS = {
    "mesh": "django-warpmesh",
    "nng": "raw nng Bus0 (floor)",
    "redis": "Redis Pub/Sub",
    "nats": "NATS",
}
REDIS_URL = "redis://127.0.0.1:6379/15"
NATS_URL = "nats://127.0.0.1:4222"
GAP_S = (0.002, 0.004)
WAIT_S = 5.0


LATENCY_INTRO = """
For each N, N worker processes form a mesh on 127.0.0.1 (static `PEERS`, default settings).
Process 0 writes, the N-1 others receive. A round: every receiver stores a key locally (nothing
is broadcast); the writer reads `time.monotonic_ns()` just before `cache.set(key, new value)`;
each receiver's store, wrapped by the benchmark, notes the moment the key is gone. Rounds are
2-4 ms apart (random), so each invalidation travels alone. Every sample is one (round,
receiver) pair. Beside it, the same job through raw nng `Bus0` (the floor: same sockets, no
protocol), Redis Pub/Sub (redis-py, a subscriber thread) and NATS (nats-py, asyncio on its own
thread), each keeping Django's `LocMemCache` coherent as one would with it: the writer's
`LocMemCache.set`, then the key published; a receiving thread's `LocMemCache.delete`. So all four
do the same cache work at both ends and differ in the message path. The four run in interleaved
blocks of rounds on the same processes, so a slow moment of the host is shared by all.
The last table follows the mesh's messages stage by stage (write, sender, nng, checks, apply);
`python -m benchmarks.latency_stages` runs it alone.
"""

# What a message costs on the mesh's path beyond the socket, named in the limits of the targets.
MESH_WORK = (
    "the mesh's Python work per message (building the op, msgpack and HMAC-SHA256 on both ends, "
    "sequence checks)"
)


@dataclasses.dataclass
class Plan:
    sizes: tuple[int, ...]
    compare_blocks: int
    block_rounds: int
    warmup_rounds: int = 20
    stage_rounds: int = 300


FULL = Plan(sizes=(2, 4, 8), compare_blocks=5, block_rounds=100)
QUICK = Plan(sizes=(2, 4, 8), compare_blocks=2, block_rounds=40, warmup_rounds=10, stage_rounds=100)


@dataclasses.dataclass
class Rounds:
    """Latency samples (µs) of one system on one fleet, keys that never went, and the CPU
    each process spent on them beyond its idle rate (seconds, writer first)."""

    samples: list[float] = dataclasses.field(default_factory=list)
    lost: int = 0
    rounds: int = 0
    cpu_s: list[float] = dataclasses.field(default_factory=list)

    def add(self, other: Rounds, cpu_s: Sequence[float]) -> None:
        self.samples += other.samples
        self.lost += other.lost
        self.rounds += other.rounds
        self.cpu_s = [a + b for a, b in itertools.zip_longest(self.cpu_s, cpu_s, fillvalue=0.0)]

    def cpu_us(self, receivers: bool) -> float:
        """CPU per message: the writer's, or the median receiver's (µs)."""
        if not self.rounds or not self.cpu_s:
            return math.nan
        spent = median(self.cpu_s[1:]) if receivers else self.cpu_s[0]
        return spent / self.rounds * 1e6


def _system_config(system: str, index: int, addresses: Sequence[str], tag: str) -> dict[str, Any]:
    if system == "nng":
        return {"address": addresses[index], "peers": list(addresses)}
    if system == "redis":
        return {"channel": f"warpmesh-bench-{tag}", "url": REDIS_URL}
    if system == "nats":
        return {"subject": f"warpmesh-bench.{tag}", "url": NATS_URL}
    return {}


def _rounds(
    system: str, workers: Sequence[Worker], keys: list[str], within: float = WAIT_S
) -> Rounds:
    """Arm ``keys`` on the receivers, write them on the writer, collect when each went."""
    writer, *receivers = workers
    for receiver in receivers:
        receiver.call("transports:arm", system=system, keys=keys)
    gaps = [random.uniform(*GAP_S) for _ in keys] if len(keys) > 1 else [0.0]
    sent = writer.call(
        "transports:write", timeout=60 + 2 * sum(gaps), system=system, keys=keys, gaps=gaps
    )
    result = Rounds(rounds=len(keys))
    for receiver in receivers:
        gone = receiver.call(
            "transports:wait", timeout=within + 30, system=system, keys=keys, within=within
        )
        for key, started in zip(keys, sent, strict=True):
            went = gone[key]
            if went is None:
                result.lost += 1
            else:
                result.samples.append((went - started) / 1000)
    return result


def open_system(system: str, workers: Sequence[Worker], warmup: int) -> None:
    """Open ``system`` in every worker; publish until every receiver hears; warm it up."""
    tag = uuid.uuid4().hex[:12]
    addresses = [f"127.0.0.1:{port}" for port in free_ports(len(workers))]
    for index, worker in enumerate(workers):
        config = _system_config(system, index, addresses, tag)
        worker.call("transports:open_transport", system=system, **config)
    deadline = time.monotonic() + 30
    for attempt in itertools.count():
        if not _rounds(system, workers, [f"ready-{tag}-{attempt}"], within=0.5).lost:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{system}: the receivers never heard the writer")
    _rounds(system, workers, [f"warm-{tag}-{i}" for i in range(warmup)])


def _close(system: str, workers: Sequence[Worker]) -> None:
    for worker in workers:
        if worker.proc.poll() is None:
            try:
                worker.call("transports:close_transport", timeout=10, system=system)
            except Exception as exc:
                print(f"  ({worker.name}: closing {system} failed: {exc})")


def _cpu(workers: Sequence[Worker]) -> list[float]:
    return [worker.call("worker:resources")["cpu_s"] for worker in workers]


def _cpu_between(
    workers: Sequence[Worker], action: Callable[[], T]
) -> tuple[T, list[float], float]:
    """Run ``action``: its result, the CPU-seconds each worker spent meanwhile, the seconds."""
    before, started = _cpu(workers), time.monotonic()
    result = action()
    elapsed = time.monotonic() - started
    return result, [a - b for a, b in zip(_cpu(workers), before, strict=True)], elapsed


def _beyond_idle(
    spent: Sequence[float], spent_s: float, idle: Sequence[float], idle_s: float
) -> list[float]:
    """CPU-seconds spent beyond what the same process burns idle over as long."""
    return [max(0.0, cpu - rest / idle_s * spent_s) for cpu, rest in zip(spent, idle, strict=True)]


def _compare(workers: Sequence[Worker], plan: Plan, errors: list[str]) -> dict[str, Rounds]:
    """The four systems side by side, in interleaved blocks of rounds, with their CPU."""
    open_system("mesh", workers, plan.warmup_rounds)
    systems = ["mesh"]
    for system in SYSTEMS[1:]:
        try:
            open_system(system, workers, plan.warmup_rounds)
            systems.append(system)
        except Exception as exc:
            errors.append(f"{LABELS[system]}, {len(workers)} processes: {exc}")
            _close(system, workers)
    try:
        # What each process burns with every system open and nothing happening, per second.
        _, idle, idle_s = _cpu_between(workers, functools.partial(time.sleep, 1.0))
        results = {system: Rounds() for system in systems}
        for block in range(plan.compare_blocks):
            for system in systems:
                keys = [f"cmp-{block}-{i}" for i in range(plan.block_rounds)]
                measured, spent, spent_s = _cpu_between(
                    workers, functools.partial(_rounds, system, workers, keys)
                )
                results[system].add(measured, _beyond_idle(spent, spent_s, idle, idle_s))
        return results
    finally:
        for system in systems[1:]:
            _close(system, workers)


def run(quick: bool) -> Section:
    plan = QUICK if quick else FULL
    latency = Section(2, "End-to-end invalidation latency", intro=LATENCY_INTRO)
    errors: list[str] = []
    compared: dict[int, dict[str, Rounds]] = {}
    for size in plan.sizes:
        print(f"  fleet of {size} processes")
        try:
            with mesh_fleet(size) as workers:
                compared[size] = _compare(workers, plan, errors)
        except Exception as exc:
            errors.append(f"fleet of {size}: {type(exc).__name__}: {exc}")
    stages: list[tuple[str, list[float]]] = []
    print("  where the mesh's time goes: 2 processes, stage by stage")
    try:
        stages = latency_stages.measure(2, plan.stage_rounds)
    except Exception as exc:
        errors.append(f"stage by stage: {type(exc).__name__}: {exc}")
    _report_latency(latency, compared)
    _report_stages(latency, stages)
    latency.notes += errors
    return latency


def _report_latency(section: Section, compared: dict[int, dict[str, Rounds]]) -> None:
    table = Table(
        "Write on the writer → key gone on a receiver (all receivers pooled)",
        [
            "processes",
            "system",
            "p50",
            "p99",
            "max",
            "p50 ÷ raw nng",
            "writer CPU / message",
            "receiver CPU / message",
            "samples",
            "never arrived",
        ],
    )
    floor_ratio: dict[int, float] = {}
    for size, results in compared.items():
        floor = Distribution.of(results["nng"].samples).p50 if "nng" in results else math.nan
        for system, rounds in results.items():
            dist = Distribution.of(rounds.samples)
            table.add(
                size,
                LABELS[system],
                fmt_us(dist.p50),
                fmt_us(dist.p99),
                fmt_us(dist.max),
                fmt_ratio(ratio(dist.p50, floor)),
                fmt_us(rounds.cpu_us(receivers=False)),
                fmt_us(rounds.cpu_us(receivers=True)),
                dist.count,
                rounds.lost,
            )
            section.samples[f"{size} processes, side by side|{LABELS[system]}"] = rounds.samples
        floor_ratio[size] = ratio(Distribution.of(results["mesh"].samples).p50, floor)
    table.notes.append(
        "Clock: CLOCK_MONOTONIC read by the writer just before the write and by the receiver "
        "just after the key left its store (one clock for all processes of a host). CPU per "
        "message: the process's CPU time during the blocks of that system, less its idle rate "
        "(measured with every system open) over as long, per message; the receiver column is "
        "the median receiver. It includes the benchmark's own control calls, alike for all."
    )
    section.tables.append(table)

    def per_size(values: dict[int, str]) -> str:
        return ", ".join(f"{size} processes: {text}" for size, text in values.items())

    mesh = {size: Distribution.of(r["mesh"].samples) for size, r in compared.items()}
    section.targets.append(
        Target(
            "latency p50 within 1.3x of raw nng",
            per_size({size: fmt_ratio(value) for size, value in floor_ratio.items()}),
            all(value <= 1.3 for value in floor_ratio.values()) if floor_ratio else None,
            MESH_WORK + ": raw nng has none of it",
        )
    )
    beats: dict[int, str] = {}
    below: dict[int, bool] = {}
    for size, results in compared.items():
        others = {
            s: Distribution.of(results[s].samples).p50 for s in ("redis", "nats") if s in results
        }
        below[size] = len(others) == 2 and all(mesh[size].p50 <= 0.7 * v for v in others.values())
        beats[size] = f"{fmt_us(mesh[size].p50)} vs " + " / ".join(
            f"{LABELS[s]} {fmt_us(v)} ({fmt_ratio(ratio(mesh[size].p50, v))})"
            for s, v in others.items()
        )
    where = ", ".join(f"{size}" for size, ok in below.items() if ok)
    largest = max(compared, default=0)
    cpu = ", ".join(
        f"{LABELS[s]} {fmt_us(compared[largest][s].cpu_us(receivers=True))}"
        for s in ("mesh", "redis", "nats")
        if s in compared.get(largest, {})
    )
    section.targets.append(
        Target(
            "latency p50 within 0.7x of Redis Pub/Sub and of NATS",
            per_size(beats),
            all(below.values()) if compared else None,
            (f"within 0.7x of both at {where} processes; elsewhere " if where else "")
            + f"the receivers' CPU: per message, at {largest} processes, a receiver spends "
            f"{cpu} (the mesh verifies the HMAC, decodes and checks sequence numbers in "
            "Python; a broker's extra hop is native code), and with N processes on 2 cores "
            "the CPU of N-1 receivers is time a message waits",
        )
    )
    section.targets.append(
        Target(
            "latency p99 under 1 ms on loopback",
            per_size({size: fmt_us(dist.p99) for size, dist in mesh.items()}),
            all(dist.p99 < 1000 for dist in mesh.values()) if mesh else None,
            "the scheduler: N processes' threads share 2 cores (and the host's other load), "
            "each message wakes several threads, each of which may wait for a core; raw nng's "
            "p99 in the same run: "
            + per_size(
                {
                    size: fmt_us(Distribution.of(r["nng"].samples).p99)
                    for size, r in compared.items()
                    if "nng" in r
                }
            ),
        )
    )


STAGE_WORK = {
    "write → send": "`cache.set` on the writing thread (pickle, local store, queueing), then "
    "the same thread taking the queue and building the op: no other thread on this side",
    "send → receiver has the frame": "msgpack and HMAC, nng and TCP on loopback, the receiving "
    "thread's wake-up: the part raw nng also has",
    "receiver has the frame → checked": "verifying the HMAC, decoding, sequence and liveness "
    "checks",
    "checked → key gone": "applying to the local store",
    "total": "",
}


def _report_stages(section: Section, stages: list[tuple[str, list[float]]]) -> None:
    """Where the mesh's p50 goes, and the limit of the "within 1.5x of raw nng" target."""
    if not stages:
        return
    table = Table(
        "Where the mesh's time goes: 2 processes, the writer → one receiver, stage by stage",
        ["stage", "p50", "p99", "what happens"],
    )
    for label, spans in stages:
        table.add(label, fmt_us(median(spans)), fmt_us(percentile(spans, 0.99)), STAGE_WORK[label])
    table.notes.append(
        f"{len(stages[0][1])} rounds in a fleet of its own, 2-4 ms apart, timestamps taken by "
        "wrapping four methods of the node (`python -m benchmarks.latency_stages` runs it alone). "
        "The stages' medians need not add up to the total's."
    )
    section.tables.append(table)
    target = next((t for t in section.targets if t.text.startswith("latency p50 within")), None)
    if target is None:
        return
    p50 = {label: median(spans) for label, spans in stages}
    transport = p50.pop("send → receiver has the frame")
    total = p50.pop("total")
    own = ", ".join(f"{label} {fmt_us(value)}" for label, value in p50.items())
    target.limit = (
        f"stage by stage at 2 processes (a fleet of its own, medians): of {fmt_us(total)}, "
        f"{fmt_us(transport)} is encoding, nng and the receiving thread's wake-up, the part "
        f"raw nng also has (but for msgpack and HMAC); the rest is the mesh's own Python work: "
        f"{own}. Within 1.5x of raw nng would leave that work a third of the total. Each "
        "stage runs with cold CPU caches, several times slower than in a loop (the host "
        "calibration); sending from the writing thread, as raw nng does, would put that work "
        "on the request path"
    )
