"""6. Churn: a fleet whose workers are replaced keeps its hit rate; a short-lived writer's exit.

Two measurements on 127.0.0.1, real OS processes:

- readers that read a working set through ``get_or_set`` while one worker of the fleet is
  replaced every second (it leaves through its normal exit path, a new one joins and writes on its
  first request), against the same readers with no churn;
- ``manage.py shell -c`` deleting one key and exiting, mesh off, against a running peer, against
  an address where nothing listens, and against both: what the acknowledged goodbye adds to exit.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.common import Section, Table, Target, fmt_pct, fmt_ratio, median, ratio
from benchmarks.procs import Worker, WorkerError, close_all, environ, mesh_fleet
from harness import free_ports
from harness.process import run_django

# -- in the worker ----------------------------------------------------------------------------

WORKING_SET = "ws:"  # the readers' keys
GONE = "gone:"  # one per join, held by every reader, deleted by that join's first request


def value_of(key: str) -> dict[str, Any]:
    """What a miss computes for ``key``: the same in every process, so fills of the same key by
    two processes do not evict each other."""
    return {"key": key, "title": "A product page fragment", "body": "x" * 200, "price": 42}


def _cache() -> Any:
    from django.core.cache import caches

    return caches["mesh"]


def warm(keys: int, most: int = 5) -> int:
    """Read the working set until a pass misses nothing (at most ``most`` passes: a fill that
    another reader's fill of the same key overlapped is not stored, and is filled again);
    the number of passes."""
    for passes in range(1, most + 1):
        if not read(keys, seconds=0.0, pass_s=0.0, passes=1)["misses"]:
            return passes
    return most


def read(keys: int, seconds: float, pass_s: float, passes: int = 0) -> dict[str, Any]:
    """Read the whole working set (a new random order each pass) through ``get_or_set``, one
    pass every ``pass_s``, for ``seconds`` (or ``passes`` passes); count the misses, and the
    reads made while the node was degraded (a fill then would be stored capped)."""
    from django_warpmesh import node as mesh_node

    cache = _cache()
    names = [f"{WORKING_SET}{i}" for i in range(keys)]
    misses = 0

    def fill(key: str) -> dict[str, Any]:
        nonlocal misses
        misses += 1
        return value_of(key)

    node = mesh_node.get_node()
    reads = done = degraded = 0
    started = time.monotonic()
    end, next_pass = started + seconds, started
    while (done < passes) if passes else (time.monotonic() < end):
        now = time.monotonic()
        if now < next_pass:
            time.sleep(min(next_pass, end) - now)  # pacing: one pass every pass_s
            continue
        next_pass += pass_s
        random.shuffle(names)
        for name in names:
            cache.get_or_set(name, functools.partial(fill, name), None)
            degraded += getattr(node, "degraded", False)  # a NullNode has none
        reads += len(names)
        done += 1
    return {
        "reads": reads,
        "misses": misses,
        "degraded_reads": degraded,
        "seconds": time.monotonic() - started,
    }


def _store_and_key(key: str) -> tuple[Any, str]:
    from django_warpmesh.cache import get_store

    cache = _cache()
    return get_store(cache._location), cache.make_key(key)


def hold(keys: list[str]) -> int:
    """Store ``keys`` in this process only (nothing is broadcast), as a fill from the database
    would have stored them here alone."""
    import pickle

    for key in keys:
        store, full_key = _store_and_key(key)
        with store.lock:
            store.put(full_key, pickle.dumps(value_of(key)), None, 10**9, 3)
    return len(keys)


def held(keys: list[str]) -> int:
    """How many of ``keys`` this process still holds (without touching LRU order or expiry)."""
    count = 0
    for key in keys:
        store, full_key = _store_and_key(key)
        count += full_key in store.cache
    return count


def first_request(working: list[str], own: list[str], gone: list[str]) -> float:
    """A new worker's first request: it reads (and so fills) a few keys of the working set,
    writes a few keys of its own and deletes what it changed (the first write starts the node).
    Returns the seconds it took."""
    cache = _cache()
    started = time.perf_counter()
    for key in working:
        cache.get_or_set(key, functools.partial(value_of, key), None)
    for key in own:
        cache.set(key, {"pid": os.getpid()}, None)
    cache.delete_many(gone)
    return time.perf_counter() - started


# -- in the parent: the churning fleet --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    readers: int
    workers: int
    keys: int  # the working set
    pass_s: float  # every reader reads the whole working set once per pass_s
    seconds: float  # each run, with and without churn
    exit_runs: int  # short-lived writer runs per case
    period: float = 1.0  # one worker replaced every period
    first_reads: int = 20  # working-set keys a new worker's first request reads
    first_writes: int = 5  # keys of its own it writes


FULL = Plan(readers=4, workers=4, keys=1000, pass_s=0.5, seconds=15.0, exit_runs=10)
QUICK = Plan(readers=4, workers=4, keys=1000, pass_s=0.5, seconds=6.0, exit_runs=3)


@dataclasses.dataclass
class Join:
    stop_s: float  # exit request sent -> stop_node() returned in the old worker
    exit_s: float  # exit request sent -> the old worker's process gone
    clean: bool  # it exited by itself, status 0
    spawn_s: float  # new process spawned -> its first request answered
    first_request_s: float  # the first request itself, in the new worker


@dataclasses.dataclass
class Phase:
    reads: int = 0
    misses: int = 0
    degraded_reads: int = 0
    seconds: float = 0.0
    counters: dict[str, int] = dataclasses.field(default_factory=dict)  # readers' deltas
    joins: list[Join] = dataclasses.field(default_factory=list)
    gone_still_held: int = 0  # joins' deletes a reader still held after the run

    @property
    def hit_rate(self) -> float:
        return 1 - self.misses / self.reads if self.reads else math.nan


READER_COUNTERS = ("flushes", "peers_lost", "gaps_detected", "frames_rejected")


def _counters(readers: Sequence[Worker]) -> list[dict[str, int]]:
    return [reader.call("worker:mesh_status")["counters"] for reader in readers]


def _replace(slots: list[Worker], slot: int, index: int, plan: Plan) -> Join:
    """Retire the worker in ``slots[slot]`` through its normal exit path and start its
    replacement on the same address, which then serves its first request."""
    old = slots[slot]
    try:
        stop_s, exit_s = old.leave()
    finally:
        old.close()
    clean = old.proc.returncode == 0
    started = time.monotonic()
    new = Worker(f"churn-{index}", old.warpmesh, old.env)
    slots[slot] = new
    first = new.call(
        "churn:first_request",
        working=[f"{WORKING_SET}{(index * 37 + i) % plan.keys}" for i in range(plan.first_reads)],
        own=[f"session:{index}:{i}" for i in range(plan.first_writes)],
        gone=[f"{GONE}{index}"],
    )
    return Join(stop_s, exit_s, clean, time.monotonic() - started, float(first))


def _phase(readers: Sequence[Worker], slots: list[Worker], plan: Plan, churn: bool) -> Phase:
    before = _counters(readers)
    for reader in readers:
        reader.submit("churn:read", keys=plan.keys, seconds=plan.seconds, pass_s=plan.pass_s)
    phase = Phase()
    started = time.monotonic()
    # The last replacement starts early enough to be done (about half a period) within the run.
    last_start = started + plan.seconds - plan.period
    next_join = started + plan.period / 2
    while churn and next_join <= last_start:
        time.sleep(max(0.0, next_join - time.monotonic()))  # pacing: one join per period
        index = len(phase.joins)
        phase.joins.append(_replace(slots, index % len(slots), index, plan))
        next_join += plan.period
    for reader in readers:
        result = reader.result(timeout=plan.seconds + 60)
        phase.reads += result["reads"]
        phase.misses += result["misses"]
        phase.degraded_reads += result["degraded_reads"]
        phase.seconds = max(phase.seconds, result["seconds"])
    after = _counters(readers)
    phase.counters = {
        name: sum(a.get(name, 0) - b.get(name, 0) for a, b in zip(after, before, strict=True))
        for name in READER_COUNTERS
    }
    if phase.joins:
        gone = [f"{GONE}{index}" for index in range(len(phase.joins))]
        phase.gone_still_held = sum(reader.call("churn:held", keys=gone) for reader in readers)
    return phase


def measure_churn(plan: Plan) -> tuple[Phase, Phase]:
    """The same fleet (default settings, static ``PEERS``), without then with churn."""
    size = plan.readers + plan.workers
    with mesh_fleet(size) as fleet:
        readers, slots = list(fleet[: plan.readers]), list(fleet[plan.readers :])
        try:
            for reader in readers:
                reader.submit("churn:warm", keys=plan.keys)
            for reader in readers:
                reader.result(timeout=60)
            steady = _phase(readers, slots, plan, churn=False)
            # Every reader holds one key per join to come; each join deletes its own.
            gone = [f"{GONE}{index}" for index in range(int(plan.seconds / plan.period) + 1)]
            for reader in readers:
                reader.call("churn:hold", keys=gone)
            churned = _phase(readers, slots, plan, churn=True)
        finally:
            close_all([worker for worker in slots if worker not in fleet])
    return steady, churned


# -- in the parent: a short-lived writer's exit -----------------------------------------------

# `manage.py shell -c`: delete one key, then leave. The node's own atexit handler (stop_node) is
# wrapped to time it; the line printed last before the interpreter starts to exit is the moment
# the parent's clock (the same CLOCK_MONOTONIC) counts the exit delay from.
WRITER_CODE = """
import atexit, json, time
from django.core.cache import cache
from django_warpmesh import node
cache.delete("k")
def timed_stop_node():
    started = time.monotonic()
    node.stop_node()
    print(json.dumps({"stop_s": time.monotonic() - started}), flush=True)
atexit.unregister(node.stop_node)
atexit.register(timed_stop_node)
print(json.dumps({"end": time.monotonic()}), flush=True)
"""

HEARTBEAT = 1.0  # the default, on every process of this measurement
BOUND_S = max(2.0, 2 * HEARTBEAT)  # how long exit may wait for the goodbye's acknowledgements
CLOSING_S = 0.05  # then closing the socket and joining the threads, allowed on top


@dataclasses.dataclass
class Case:
    label: str
    enabled: bool
    peer: bool  # a running peer is listed
    nowhere: bool  # an address where nothing listens is listed


CASES = (
    Case("mesh off (`WARPMESH_ENABLED=false`)", enabled=False, peer=False, nowhere=False),
    Case("one running peer", enabled=True, peer=True, nowhere=False),
    Case("nothing listening (a closed port)", enabled=True, peer=False, nowhere=True),
    Case("a running peer + a closed port", enabled=True, peer=True, nowhere=True),
)


@dataclasses.dataclass
class Exits:
    total_s: list[float] = dataclasses.field(default_factory=list)  # spawn -> reaped
    exit_s: list[float] = dataclasses.field(default_factory=list)  # script's end -> reaped
    stop_s: list[float] = dataclasses.field(default_factory=list)  # stop_node() at exit
    outcomes: list[str] = dataclasses.field(default_factory=list)  # the peer's copy
    failures: list[str] = dataclasses.field(default_factory=list)  # nonzero exit statuses
    peer_flushes: int = 0
    peer_lost: int = 0  # writers the peer declared lost (silent without a goodbye)


def _poll(predicate: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _holds(peer: Worker, key: str) -> bool:
    return bool(peer.call("churn:held", keys=[key]))


def _outcome(peer: Worker) -> str:
    """What became of the peer's copy of "k" once the writer had exited."""
    if not _holds(peer, "kept"):
        return "flushed"  # the peer had dropped everything: whether "k" was delivered is moot
    if not _holds(peer, "k"):
        return "evicted"
    return "late" if _poll(lambda: not _holds(peer, "k"), 1.0) else "kept"


def _writer_env(case: Case, peer: Worker | None, nowhere: str) -> dict[str, str]:
    """The writer's environment: this process's, less our ``WARPMESH_*`` variables (the
    parent's cannot change the writer's settings), then its own."""
    peers = ([f"127.0.0.1:{peer.warpmesh['PORT']}"] if peer else []) + (
        [nowhere] if case.nowhere else []
    )
    (port,) = free_ports(1)
    return {
        **environ(),
        # The benchmark settings, with django_warpmesh installed as a deployment has it; its
        # default cache is the peer's "mesh" (the same LOCATION): the frames name the LOCATION.
        "DJANGO_SETTINGS_MODULE": "benchmarks.settings_app",
        "WARPMESH_ENABLED": "true" if case.enabled else "false",
        "WARPMESH_PEERS": ",".join(peers) or nowhere,
        "WARPMESH_BIND": "127.0.0.1",
        "WARPMESH_PORT": str(port),
        "WARPMESH_PORT_RANGE": "1",
        "WARPMESH_HEARTBEAT": str(HEARTBEAT),
    }


def _write_once(case: Case, peer: Worker | None, nowhere: str, exits: Exits) -> None:
    """One short-lived writer of ``case``, and what became of the peer's copy."""
    if peer is not None:
        # The previous writer's fate settled first (gone, or declared lost and flushed), so
        # that a flush it causes cannot hide whether this writer's delete arrived.
        _poll(functools.partial(_settled, peer), 3 * HEARTBEAT + 2)
        peer.call("churn:hold", keys=["k", "kept"])
    env = _writer_env(case, peer, nowhere)
    started = time.monotonic()
    done = run_django("shell", "-c", WRITER_CODE, env=env)
    reaped = time.monotonic()
    marks: dict[str, float] = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            marks.update(json.loads(line))
    if "end" not in marks:
        raise RuntimeError(f"the writer did not run ({done.returncode}): {done.stderr[-2000:]}")
    exits.total_s.append(reaped - started)
    exits.exit_s.append(reaped - marks["end"])
    if "stop_s" in marks:
        exits.stop_s.append(marks["stop_s"])
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if "panic" in line.lower()]
        exits.failures.append(f"status {done.returncode}: {(lines or ['?'])[0].strip()}")
    if peer is not None:
        exits.outcomes.append(_outcome(peer))


def measure_exits(runs: int) -> dict[str, Exits]:
    """``runs`` short-lived writers per case, in rounds: the cases in a random order each
    round, the two that wait for the bound (a closed port listed) side by side, each in a
    thread of its own. Each case with a running peer has a peer process of its own (default
    heartbeat), so a flush is counted where it belongs."""
    nowhere = f"127.0.0.1:{free_ports(1)[0]}"  # closed again at once: nothing listens there
    results = {case.label: Exits() for case in CASES}
    with contextlib.ExitStack() as stack:
        peers: dict[str, Worker] = {}
        for case in CASES:
            if case.peer:
                (peers[case.label],) = stack.enter_context(mesh_fleet(1, HEARTBEAT=HEARTBEAT))
        alone = [[case] for case in CASES if not case.nowhere]
        groups = [*alone, [case for case in CASES if case.nowhere]]
        pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(2))
        for _ in range(runs):
            for group in random.sample(groups, len(groups)):
                jobs = [
                    pool.submit(
                        _write_once, case, peers.get(case.label), nowhere, results[case.label]
                    )
                    for case in group
                ]
                for job in jobs:
                    job.result()
        # A writer the peer still counts as connected (it said goodbye, then was heard again)
        # is declared lost after 3 heartbeats, and the peer flushes: wait for that to settle.
        for label, peer in peers.items():
            _poll(functools.partial(_settled, peer), 3 * HEARTBEAT + 2)
            counters = peer.call("worker:mesh_status")["counters"]
            results[label].peer_flushes = int(counters["flushes"])
            results[label].peer_lost = int(counters["peers_lost"])
    return results


def _settled(peer: Worker) -> bool:
    """No writer is still counted as connected by ``peer``."""
    return not peer.call("worker:mesh_status")["connected"]


# -- report -----------------------------------------------------------------------------------

INTRO = """
**Churn.** {readers} reader processes and {workers} other workers form one mesh on 127.0.0.1
(static `PEERS`, default settings: `HEARTBEAT` 1 s). Each reader reads a working set of {keys}
keys through `get_or_set` (a miss computes the value and fills), the whole set once every
{pass_s:g} s in a new random order. With churn, every {period:g} s one of the {workers} workers
is replaced, oldest first: it leaves through its normal exit path (a request that calls
`stop_node()`, which is what `atexit` runs when a gunicorn worker exits after SIGTERM or
`max_requests`), and a new process starts on the same address, as a pre-fork server's
replacement takes the freed port of the `PORT_RANGE`; its first request reads
{first_reads} keys of the working set (filling them: same values, which evicts nobody), writes
{first_writes} keys of its own and deletes one key that every reader holds. The same fleet is
measured for {seconds:g} s without churn, then {seconds:g} s with it; the caches are warm
before either.

**A short-lived writer's exit.** `manage.py shell -c` (the benchmark settings with the app
installed, SQLite) deletes one key a running peer holds, then exits; {runs} runs per case, in
rounds: the cases in a random order each round, the two with a closed port listed (which wait
for the bound) side by side. Each case with a running peer has a peer process of its own
(default heartbeat), and each run waits until that peer counts no earlier writer as connected.
Exit delay: from the script's last statement to the process reaped by the parent (the same
monotonic clock), so it includes the interpreter's own teardown; `stop_node()` is the node's
`atexit` handler, timed inside the process. The wait for the goodbye's acknowledgements is
bounded by `max(2 s, 2 x HEARTBEAT)` = {bound:g} s here.
"""


def _s(value: float) -> str:
    """Seconds, to the precision that matters: 1.4 ms, 57 ms, 2.001 s."""
    if math.isnan(value):
        return "n/a"
    if abs(value) < 0.01:
        return f"{value * 1000:.1f} ms"
    return f"{value * 1000:.0f} ms" if abs(value) < 1 else f"{value:.3f} s"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _added(value: float) -> str:
    return ("+" if value >= 0 else "") + _s(value)


def _p50_max(values: Sequence[float]) -> str:
    return f"{_s(median(values))} / {_s(max(values))}" if values else "n/a"


def _churn_tables(section: Section, plan: Plan, steady: Phase, churned: Phase) -> None:
    joins = len(churned.joins)
    # Had every join flushed every reader, each reader would have refilled its whole working
    # set after each join: it reads all of it at least twice between two joins.
    would_miss = churned.misses + joins * plan.readers * plan.keys
    would_rate = 1 - would_miss / churned.reads if churned.reads else math.nan
    table = Table(
        "Readers' hit rate, with and without churn",
        [
            "run",
            "joins",
            "reads",
            "misses",
            "hit rate",
            "÷ no churn",
            "readers' flushes",
            "readers' peers lost / gaps",
            "reads while degraded",
        ],
    )
    for label, phase in (("no churn", steady), ("one worker replaced every second", churned)):
        table.add(
            label,
            len(phase.joins),
            f"{phase.reads:,}",
            f"{phase.misses:,}",
            fmt_pct(100 * phase.hit_rate),
            fmt_ratio(ratio(phase.hit_rate, steady.hit_rate)),
            phase.counters.get("flushes", 0),
            f"{phase.counters.get('peers_lost', 0)} / {phase.counters.get('gaps_detected', 0)}",
            fmt_pct(100 * phase.degraded_reads / phase.reads) if phase.reads else "n/a",
        )
    table.add(
        "the same churn, had every join flushed every reader (computed)",
        joins,
        f"{churned.reads:,}",
        f"{would_miss:,}",
        fmt_pct(100 * would_rate),
        fmt_ratio(ratio(would_rate, steady.hit_rate)),
        joins * plan.readers,
        "",
        "",
    )
    stops = [join.stop_s for join in churned.joins]
    firsts = [join.first_request_s for join in churned.joins]
    exits = [join.exit_s for join in churned.joins]
    spawns = [join.spawn_s for join in churned.joins]
    clean = sum(join.clean for join in churned.joins)
    table.notes += [
        f"{plan.readers} readers x {plan.keys} keys, one pass every {plan.pass_s:g} s: "
        f"{churned.reads / max(churned.seconds, 1e-9) / plan.readers:,.0f} reads/s per reader "
        f"with churn. {joins} joins in {churned.seconds:.1f} s.",
        "The computed row: each join flushing every reader costs each reader one miss per key "
        f"of the working set ({plan.keys}), since it reads the whole set twice between two "
        f"joins: {joins} joins x {plan.readers} readers x {plan.keys} keys more misses.",
        f"Replaced workers: {clean}/{joins} exited by themselves with status 0; exit request → "
        f"`stop_node()` returned {_p50_max(stops)} (p50 / max: the goodbye and its "
        f"acknowledgements), → process gone {_p50_max(exits)}. New worker: process spawned → "
        f"first request answered {_p50_max(spawns)} (Python and Django start-up; the "
        f"request itself, its node's start included, {_p50_max(firsts)}). Each first "
        f"request's delete reached every reader: {joins * plan.readers - churned.gone_still_held}"
        f"/{joins * plan.readers} copies evicted.",
        "Reads while degraded: made while the reader's node was degraded (a listed peer "
        "unreachable, so a fill is stored capped at `DEGRADED_TIMEOUT`, 5 s): between an old "
        "worker's goodbye and its replacement's first heartbeat, its address is listed but "
        "nobody answers there. The caches were warm: no fill happened then.",
    ]
    section.tables.append(table)
    hit_ratio = ratio(churned.hit_rate, steady.hit_rate)
    section.targets.append(
        Target(
            "churn (one worker replaced every second): hit rate >= 0.9x the hit rate without",
            f"{fmt_pct(100 * churned.hit_rate)} vs {fmt_pct(100 * steady.hit_rate)}: "
            f"{fmt_ratio(hit_ratio)}",
            hit_ratio >= 0.9,
            "flushes: each one costs every reader its whole working set",
        )
    )
    flushes = churned.counters.get("flushes", 0)
    section.targets.append(
        Target(
            "churn: 0 flushes from joins",
            f"{flushes} reader flushes in {joins} joins ({plan.readers} readers)",
            flushes == 0,
            f"peers lost {churned.counters.get('peers_lost', 0)}, gaps "
            f"{churned.counters.get('gaps_detected', 0)}: a worker heard again after its "
            "goodbye is declared lost 3 heartbeats later",
        )
    )


def _outcomes(exits: Exits) -> str:
    if not exits.outcomes:
        return "n/a (no peer)"
    evicted = exits.outcomes.count("evicted")
    others = [
        f"{exits.outcomes.count(name)} {name}"
        for name in ("late", "kept", "flushed")
        if name in exits.outcomes
    ]
    return f"{evicted}/{len(exits.outcomes)}" + (f" ({', '.join(others)})" if others else "")


def _exit_tables(section: Section, runs: dict[str, Exits]) -> None:
    off, peer, nowhere, both = (runs[case.label] for case in CASES)
    baseline = median(off.exit_s)
    table = Table(
        "A short-lived writer: `manage.py shell -c` deletes one key and exits",
        [
            "the writer's `PEERS`",
            "whole process, p50",
            "exit delay p50 / max",
            "added by the mesh, p50",
            "`stop_node()` p50 / max",
            "peer's copy evicted",
            "peer's flushes",
            "exit status 0",
        ],
    )
    for case in CASES:
        exits = runs[case.label]
        table.add(
            case.label,
            _s(median(exits.total_s)),
            _p50_max(exits.exit_s),
            _added(median(exits.exit_s) - baseline) if case.enabled else "",
            _p50_max(exits.stop_s),
            _outcomes(exits) if case.enabled else "n/a (nothing sent)",
            f"{exits.peer_flushes} ({_count(exits.peer_lost, 'writer')} lost)"
            if case.peer
            else "n/a",
            f"{len(exits.exit_s) - len(exits.failures)}/{len(exits.exit_s)}",
        )
    table.notes += [
        'Peer\'s copy: "evicted", gone when the writer had exited (the peer still holding '
        'its other key); "late", gone within a second after; "kept", still there; "flushed", '
        "the peer had dropped its whole cache before the check, so delivery cannot be told.",
        "Peer's flushes: over all the runs of that case; a writer counted as lost (silent "
        "without a goodbye) is declared so 3 heartbeats after it was last heard.",
    ]
    if peer.peer_lost or both.peer_lost:
        table.notes.append(
            "Writers lost: a writer the peer heard again after its goodbye (any frame marks "
            "its sender alive) is declared lost once it is gone, and the peer flushes. The "
            "writer's sender thread sends a heartbeat in the same pass as the goodbye when "
            "one is asked for, and the peer's first heartbeat, which ends a short-lived "
            "writer's start-up window, asks for one."
        )
    if "kept" in both.outcomes or "late" in both.outcomes:
        table.notes.append(
            "A closed port listed too: that peer never answers, so the writer's start-up window "
            "never ends before exit, and its delete is held until the exit's wait runs out. "
            "It goes out at the bound, with the goodbye, while `stop()` closes the socket "
            "without waiting for an acknowledgement; nng drops what is still queued then."
        )
    failures = sorted({failure for exits in runs.values() for failure in exits.failures})
    if failures:
        table.notes.append("Exit statuses other than 0: " + "; ".join(failures) + ".")
    section.tables.append(table)

    section.targets.append(
        Target(
            "exit delay of a short-lived writer",
            f"against a running peer {_added(median(peer.exit_s) - baseline)} p50 over the "
            f"mesh-off exit ({_s(baseline)}), `stop_node()` p50 {_s(median(peer.stop_s))}; "
            f"a closed port listed: {_s(median(nowhere.exit_s))}",
            None,
            no_threshold=True,
        )
    )
    longest = max(nowhere.stop_s + both.stop_s, default=math.nan)
    section.targets.append(
        Target(
            f"exit with a peer not answering: the wait within max(2 s, 2 x HEARTBEAT) = "
            f"{BOUND_S:g} s (`stop_node()` <= {_s(BOUND_S + CLOSING_S)}, closing included)",
            f"`stop_node()` max {_s(longest)} "
            f"({len(nowhere.stop_s) + len(both.stop_s)} runs with a closed port listed)",
            None if math.isnan(longest) else longest <= BOUND_S + CLOSING_S,
            "the wait ends at the bound; closing the socket and joining the threads follow",
        )
    )
    section.targets.append(
        Target(
            "a short-lived writer's delete evicts the running peer's copy every time",
            _outcomes(peer),
            None if not peer.outcomes else peer.outcomes.count("evicted") == len(peer.outcomes),
            "a copy gone only because the peer flushed does not count",
        )
    )


def run(quick: bool) -> Section:
    plan = QUICK if quick else FULL
    section = Section(
        6,
        "Churn: workers replaced, short-lived writers",
        intro=INTRO.format(**dataclasses.asdict(plan), runs=plan.exit_runs, bound=BOUND_S),
    )
    print("  churn", flush=True)
    try:
        steady, churned = measure_churn(plan)
    except (WorkerError, AssertionError) as exc:
        section.notes.append(f"Churn not measured: {str(exc).splitlines()[0]}")
    else:
        _churn_tables(section, plan, steady, churned)
    print("  short-lived writers", flush=True)
    _exit_tables(section, measure_exits(plan.exit_runs))
    return section
