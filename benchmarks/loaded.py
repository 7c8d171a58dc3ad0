"""7. Loaded workers: how long a busy worker keeps serving a value another worker has replaced.

Every process's main thread runs pure Python in slices (a view's work: it holds the GIL) and
reads the cache between slices. The writer sets a key, then keeps computing; each receiver notes
the first read that no longer returns the old value. A thread that wakes up to carry an
invalidation must first get the GIL from the busy main thread: up to ``sys.getswitchinterval()``
(5 ms) per acquisition. Systems: ``MeshCache`` (with drain-on-read as configured, and with it
off), and, in processes without a mesh node, the baselines of :mod:`benchmarks.transports`
(Django's ``LocMemCache``; the writer publishes inline, a listener thread deletes): raw nng,
Redis Pub/Sub, NATS.

The processes share a small board in shared memory (an ``mmap``'d file in ``/dev/shm``): the
current round, when it was written, when each receiver saw it. Reading or writing it is a memory
access, no system call and no release of the GIL, so it does not change what is measured; it only
tells the receivers which key to read and the writer when every receiver has seen the round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import mmap
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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
from benchmarks.procs import Worker, WorkerError, close_all, mesh_fleet, spawn

OLD = "old"  # what every receiver holds before a round (benchmarks.transports arms it)
IDLE_KEY = "loaded-idle"  # read between slices while no round is going on (a miss)
SETTLE_US = 5000  # the writer computes at least this long after each write
JITTER_US = 2000  # and a random extra up to this, so rounds do not keep one phase
ROUND_TIMEOUT_S = 1.0  # a receiver that has not seen a round by then counts it as never seen
WARM_MS = 50  # every process busy before the first write
READY_S = 15.0  # the receivers' loops must all be running within this

# -- the board in shared memory ---------------------------------------------------------------


class Board:
    """int64 slots: the current round (1-based, 0: none), a stop flag, one ready flag per
    process, the write time of each round, then each receiver's time of first fresh read."""

    def __init__(self, buffer: Any, size: int, rounds: int) -> None:
        self.slots = memoryview(buffer).cast("q")
        self.size = size
        self.rounds = rounds
        self.ready_at = 2
        self.writes_at = 2 + size
        self.seen_at = 2 + size + rounds

    @staticmethod
    def length(size: int, rounds: int) -> int:
        return 8 * (2 + size + rounds + (size - 1) * rounds)

    def seen_slot(self, receiver: int, round_: int) -> int:
        return self.seen_at + (receiver - 1) * self.rounds + round_ - 1

    def all_ready(self) -> bool:
        return all(self.slots[self.ready_at : self.ready_at + self.size])

    def all_seen(self, round_: int) -> bool:
        slots = self.slots
        return all(slots[self.seen_slot(i, round_)] for i in range(1, self.size))


@contextlib.contextmanager
def _mapped(path: str, size: int, rounds: int) -> Iterator[Board]:
    with open(path, "r+b") as file:
        mapped = mmap.mmap(file.fileno(), Board.length(size, rounds))
    board = Board(mapped, size, rounds)
    try:
        yield board
    finally:
        board.slots.release()
        mapped.close()


# -- in the worker ----------------------------------------------------------------------------


def _compute(until_ns: int, scratch: dict[int, int]) -> int:
    """Pure Python until ``until_ns`` (CLOCK_MONOTONIC): arithmetic and dict updates, as a view
    or a serializer runs them. Holds the GIL throughout, but for the interpreter's forced
    switches. Returns the iterations done."""
    clock = time.monotonic_ns
    done = 0
    while clock() < until_ns:
        for i in range(32):
            scratch[i] = (scratch.get(i, 0) + i * done) % 1_000_003
        done += 1
    return done


class _Loop:
    """A busy main thread: a slice of computing, then one cache read. Counts the CPU the slices
    themselves took (this thread's CPU time around each), so the rest of the process's CPU is
    what the cache and its threads cost."""

    def __init__(self, cache: Any, slice_us: int) -> None:
        self.read = cache.get
        self.slice_ns = slice_us * 1000
        self.scratch: dict[int, int] = {}
        self.busy_ns = self.slices = self.work = 0
        self.cpu_started = time.process_time_ns()
        self.thread_started = time.thread_time_ns()
        self.started = time.monotonic_ns()

    def step(self, key: str) -> tuple[Any, int]:
        """One slice, then ``cache.get(key)``: its value, and the time just after it."""
        started = time.thread_time_ns()
        self.work += _compute(time.monotonic_ns() + self.slice_ns, self.scratch)
        self.busy_ns += time.thread_time_ns() - started
        self.slices += 1
        value = self.read(key)
        return value, time.monotonic_ns()

    def report(self) -> dict[str, Any]:
        return {
            "cpu_ns": time.process_time_ns() - self.cpu_started,
            "main_ns": time.thread_time_ns() - self.thread_started,
            "busy_ns": self.busy_ns,
            "wall_ns": time.monotonic_ns() - self.started,
            "slices": self.slices,
            "work": self.work,
            "switch_interval": sys.getswitchinterval(),
        }


def _wait_ready(loop: _Loop, board: Board) -> None:
    """Stay busy until every process runs its loop (a receiver that starts late is failed)."""
    ready_by = time.monotonic_ns() + int(READY_S * 1e9)
    while not board.all_ready():
        _, now = loop.step(IDLE_KEY)
        if now > ready_by:
            raise TimeoutError("not every receiver started its loop")
    warm_until = time.monotonic_ns() + WARM_MS * 1_000_000
    now = 0
    while now < warm_until:
        _, now = loop.step(IDLE_KEY)


def _write(
    loop: _Loop, board: Board, transport: Any, keys: Sequence[str], seconds: float, seed: int
) -> int:
    """The writer: each round, set the round's key (the write time noted just before), then
    compute at least ``SETTLE_US`` (plus jitter) and until every receiver has seen it, or
    ``ROUND_TIMEOUT_S``. With no keys, just the busy loop for ``seconds``. Rounds written."""
    slots = board.slots
    rng = random.Random(seed)
    deadline = time.monotonic_ns() + int(seconds * 1e9)
    _wait_ready(loop, board)
    if not keys:
        now = 0
        while now < deadline:
            _, now = loop.step(IDLE_KEY)
        return 0
    written = 0
    for round_, key in enumerate(keys, 1):
        if time.monotonic_ns() > deadline:
            break
        started = time.monotonic_ns()
        slots[board.writes_at + round_ - 1] = started
        slots[0] = round_  # the receivers read this round's key from their next slice on
        transport.publish(key)  # the local set, then the announcement: inline
        written += 1
        settled = started + (SETTLE_US + rng.randrange(JITTER_US)) * 1000
        give_up = started + int(ROUND_TIMEOUT_S * 1e9)
        while True:
            _, now = loop.step(key)
            if now >= settled and (now >= give_up or board.all_seen(round_)):
                break
    return written


def _receive(loop: _Loop, board: Board, index: int, keys: Sequence[str], seconds: float) -> None:
    """A receiver: between slices, read the current round's key; the first read that does not
    return the old value is noted on the board. Until the writer says stop."""
    slots = board.slots
    deadline = time.monotonic_ns() + int(seconds * 1e9)
    slots[board.ready_at + index] = 1
    seen = 0
    key = IDLE_KEY
    while not slots[1]:
        current = slots[0]
        if current != seen:
            key = keys[current - 1]
        value, now = loop.step(key)
        if current != seen and value != OLD:
            slots[board.seen_slot(index, current)] = now
            seen = current
        if now > deadline:
            break


def session(
    system: str,
    index: int,
    size: int,
    board: str,
    keys: list[str],
    rounds: int,
    slice_us: int,
    seconds: float,
    seed: int = 0,
) -> dict[str, Any]:
    """One loaded run in this process (``index`` 0 writes ``keys``, the others receive them)
    through transport ``system`` of :mod:`benchmarks.transports`, already open and armed."""
    from benchmarks import transports

    transport = transports._open[system]
    with _mapped(board, size, rounds) as mapped:
        loop = _Loop(transport.cache, slice_us)
        written = 0
        if index == 0:
            mapped.slots[mapped.ready_at] = 1
            try:
                written = _write(loop, mapped, transport, keys, seconds, seed)
            finally:
                mapped.slots[1] = 1  # stop, whatever happened
        else:
            _receive(loop, mapped, index, keys, seconds + READY_S + 2 * ROUND_TIMEOUT_S)
        return {**loop.report(), "written": written}


# Where the mesh's time goes: timestamps taken inside the node (three of its methods wrapped,
# a clock read each), so the window can be cut into the writer's part and the receiver's.
_marks: dict[str, list[int]] = {"sent": [], "taken": []}
_batch_taken = [0]


def mark_stages() -> bool:
    """Wrap the node's methods that send an invalidation frame and take frames in; False if
    this version of the node has no such methods (then the window is not cut)."""
    from django_warpmesh.node import MeshNode

    if getattr(MeshNode, "_loaded_marks", False):
        return True
    try:
        send = MeshNode._send_invalidate
        handle = MeshNode._handle_batch
        track = MeshNode._track_invalidate
    except AttributeError:
        return False

    def marked_send(self: Any, *args: Any, **kwargs: Any) -> Any:
        _marks["sent"].append(time.monotonic_ns())  # before encoding, signing and sending
        return send(self, *args, **kwargs)

    def marked_handle(self: Any, *args: Any, **kwargs: Any) -> Any:
        _batch_taken[0] = time.monotonic_ns()  # frames off the socket, in a thread's hands
        return handle(self, *args, **kwargs)

    def marked_track(self: Any, *args: Any, **kwargs: Any) -> Any:
        _marks["taken"].append(_batch_taken[0])  # once per invalidation frame
        return track(self, *args, **kwargs)

    MeshNode._send_invalidate = marked_send  # type: ignore[method-assign]
    MeshNode._handle_batch = marked_handle  # type: ignore[method-assign]
    MeshNode._track_invalidate = marked_track  # type: ignore[method-assign]
    MeshNode._loaded_marks = True  # type: ignore[attr-defined]
    return True


def take_marks() -> dict[str, list[int]]:
    """The timestamps since the last call (and forget them)."""
    taken = {name: list(values) for name, values in _marks.items()}
    for values in _marks.values():
        values.clear()
    return taken


# -- in the parent ----------------------------------------------------------------------------

SYSTEMS = ("mesh", "mesh-nodrain", "nng", "redis", "nats")
LABELS = {
    "mesh": "django-warpmesh",
    "mesh-nodrain": "django-warpmesh, `DRAIN_ON_READ` off",
    "nng": "raw nng Bus0",
    "redis": "Redis Pub/Sub",
    "nats": "NATS",
}
BASELINES = ("nng", "redis", "nats")
STAGES = (
    "write → frame sent",
    "frame sent → taken in by the receiver",
    "taken in → key gone",
    "key gone → first fresh read",
)


@dataclasses.dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]
    slices_us: tuple[int, ...]
    blocks: int  # each system's rounds come in this many blocks, the systems interleaved
    block_rounds: dict[int, int]  # by fleet size: a larger fleet has more samples per round
    idle_s: float  # the busy loop alone, nobody writing: what each process spends without writes
    session_cap_s: float  # a loaded block starts no new round after this
    warmup_rounds: int = 10


FULL = Plan(
    sizes=(2, 4, 8),
    slices_us=(200, 1000),
    blocks=2,
    block_rounds={2: 75, 4: 50, 8: 30},
    idle_s=0.5,
    session_cap_s=8.0,
)
QUICK = Plan(
    sizes=(2, 4),
    slices_us=(200, 1000),
    blocks=1,
    block_rounds={2: 30, 4: 15},
    idle_s=0.3,
    session_cap_s=4.0,
    warmup_rounds=5,
)


@dataclasses.dataclass
class Result:
    """One system at one fleet size and slice length, over every block."""

    windows: list[float] = dataclasses.field(default_factory=list)  # µs, write → fresh read
    delivered: list[float] = dataclasses.field(default_factory=list)  # µs, write → key gone
    never: int = 0  # (round, receiver) pairs not seen within ROUND_TIMEOUT_S
    written: int = 0
    extra_cpu_ns: list[float] = dataclasses.field(default_factory=list)  # per process
    switch_interval: float = math.nan
    # The mesh's window cut in stages (µs, per round and receiver), when the node was marked.
    stages: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    unaligned: int = 0  # blocks whose marks did not come one per round (not cut)

    def cpu_us(self, receivers: bool) -> float:
        """CPU per invalidation: the writer's, or the median receiver's (µs)."""
        if not self.written or not self.extra_cpu_ns:
            return math.nan
        spent = median(self.extra_cpu_ns[1:]) if receivers else self.extra_cpu_ns[0]
        return spent / self.written / 1000


@dataclasses.dataclass
class Fleet:
    """One fleet's processes and the transport (of :mod:`benchmarks.transports`) they use."""

    workers: list[Worker]
    transport: str  # "mesh", "nng", "redis", "nats"
    marked: bool = False  # the mesh's nodes leave timestamps (see mark_stages)


def _overhead_ns(report: dict[str, Any], idle: tuple[float, float] = (0.0, 0.0)) -> float:
    """A process's CPU beyond its busy slices, less ``idle``: the CPU of its other threads
    (nng's, a listener, the mesh's) less ``idle[0]`` per ns of wall time, plus its main
    thread's outside the slices (the reads, the writes) less ``idle[1]`` per slice."""
    others = report["cpu_ns"] - report["main_ns"] - idle[0] * report["wall_ns"]
    main = report["main_ns"] - report["busy_ns"] - idle[1] * report["slices"]
    return float(others + main)


def _board_file(size: int, rounds: int) -> str:
    where = "/dev/shm" if os.path.isdir("/dev/shm") else None
    handle, path = tempfile.mkstemp(prefix="warpmesh-loaded-", dir=where)
    with os.fdopen(handle, "wb") as file:
        file.write(bytes(Board.length(size, rounds)))
    return path


def _session(
    fleet: Fleet, keys: list[str], slice_us: int, seconds: float
) -> tuple[list[dict[str, Any]], Board]:
    """A session in every worker at once: their reports, and the board as it ended."""
    rounds = max(1, len(keys))
    path = _board_file(len(fleet.workers), rounds)
    try:
        for index, worker in enumerate(fleet.workers):
            worker.submit(
                "loaded:session",
                system=fleet.transport,
                index=index,
                size=len(fleet.workers),
                board=path,
                keys=keys,
                rounds=rounds,
                slice_us=slice_us,
                seconds=seconds,
                seed=random.randrange(2**32),
            )
        limit = time.monotonic() + seconds + READY_S + 2 * ROUND_TIMEOUT_S + 30
        # Every reply is read, even after a failure, so that none is left in a pipe to be
        # taken for the answer to a later call.
        reports, failures = [], []
        for worker in fleet.workers:
            try:
                reports.append(worker.result(timeout=max(1.0, limit - time.monotonic())))
            except WorkerError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]
        board = Board(Path(path).read_bytes(), len(fleet.workers), rounds)
    finally:
        os.unlink(path)
    return reports, board


def _idle_rates(fleet: Fleet, slice_us: int, plan: Plan) -> list[tuple[float, float]]:
    """The busy loop alone, nobody writing: per process, its other threads' CPU per ns of
    wall time, and its main thread's CPU outside the slices per slice (mostly the read)."""
    reports, _ = _session(fleet, [], slice_us, plan.idle_s)
    return [
        (
            (report["cpu_ns"] - report["main_ns"]) / report["wall_ns"],
            (report["main_ns"] - report["busy_ns"]) / report["slices"],
        )
        for report in reports
    ]


def _block(
    fleet: Fleet, slice_us: int, plan: Plan, idle: Sequence[tuple[float, float]], result: Result
) -> None:
    """One block of loaded rounds into ``result``: the staleness windows, when the key left each
    receiver's store, and each process's CPU beyond its slices less its ``idle`` rate."""
    workers, system = fleet.workers, fleet.transport
    rounds = plan.block_rounds[len(workers)]
    keys = [f"loaded-{uuid.uuid4().hex[:8]}-{i}" for i in range(rounds)]
    for receiver in workers[1:]:
        receiver.call("transports:arm", system=system, keys=keys)
    if fleet.marked:
        for worker in workers:
            worker.call("loaded:take_marks")
    reports, board = _session(fleet, keys, slice_us, plan.session_cap_s)
    written = int(reports[0]["written"])
    slots = board.slots
    writes = slots[board.writes_at : board.writes_at + rounds]
    marks = [worker.call("loaded:take_marks") for worker in workers] if fleet.marked else []
    # One invalidation frame per round (rounds travel alone): marks that do not come one per
    # round on every process cannot be matched to the rounds, and are left out.
    aligned = bool(marks) and all(
        len(mark) == written for mark in [marks[0]["sent"], *(m["taken"] for m in marks[1:])]
    )
    result.unaligned += bool(marks) and not aligned
    for index, receiver in enumerate(workers[1:], 1):
        gone = receiver.call("transports:wait", system=system, keys=keys[:written], within=0)
        for round_ in range(1, written + 1):
            wrote = writes[round_ - 1]
            seen = slots[board.seen_slot(index, round_)]
            if seen:
                result.windows.append((seen - wrote) / 1000)
            else:
                result.never += 1
            went = gone[keys[round_ - 1]]
            if went:
                result.delivered.append((went - wrote) / 1000)
            if aligned and seen and went:
                points = [
                    wrote,
                    marks[0]["sent"][round_ - 1],
                    marks[index]["taken"][round_ - 1],
                    went,
                    seen,
                ]
                for stage, (start, end) in zip(STAGES, itertools.pairwise(points), strict=True):
                    result.stages.setdefault(stage, []).append((end - start) / 1000)
    result.written += written
    extra = [_overhead_ns(report, rates) for report, rates in zip(reports, idle, strict=True)]
    previous = result.extra_cpu_ns or [0.0] * len(extra)
    result.extra_cpu_ns = [a + b for a, b in zip(previous, extra, strict=True)]
    result.switch_interval = float(reports[0]["switch_interval"])


def measure(fleet: Fleet, slice_us: int, plan: Plan) -> Result:
    """``fleet``'s system alone at one slice length (its transport open and warmed up): what
    its processes spend with nobody writing, then ``plan.blocks`` blocks of rounds."""
    result = Result()
    idle = _idle_rates(fleet, slice_us, plan)
    for _ in range(plan.blocks):
        _block(fleet, slice_us, plan, idle, result)
    return result


def drain_setting_known() -> bool:
    """Whether this version of django-warpmesh has ``WARPMESH['DRAIN_ON_READ']``."""
    from django.core.exceptions import ImproperlyConfigured

    from django_warpmesh import conf

    try:
        conf.parse({"DRAIN_ON_READ": False}, environ={})
    except ImproperlyConfigured:
        return False
    return True


def _close(fleet: Fleet) -> None:
    for worker in fleet.workers:
        if worker.proc.poll() is None:
            try:
                worker.call("transports:close_transport", timeout=10, system=fleet.transport)
            except Exception as exc:
                print(f"  ({worker.name}: closing {fleet.transport} failed: {exc})")


def _fleet_size(
    size: int,
    plan: Plan,
    drain_known: bool,
    results: dict[tuple[int, int, str], Result],
    errors: list[str],
) -> None:
    """Every system at one fleet size, blocks interleaved. The mesh in fleets of its own (one
    with each drain setting); the baselines in processes with the mesh off, one baseline open
    at a time (an idle listener thread of another would also want the GIL)."""
    from benchmarks import latency

    with contextlib.ExitStack() as stack:
        fleets = {"mesh": Fleet(stack.enter_context(mesh_fleet(size)), "mesh")}
        if drain_known:
            nodrain = stack.enter_context(mesh_fleet(size, DRAIN_ON_READ=False))
            fleets["mesh-nodrain"] = Fleet(nodrain, "mesh")
        plain = spawn([(f"plain{i}", {"ENABLED": False}, None) for i in range(size)])
        stack.callback(close_all, plain)
        for system in BASELINES:
            fleets[system] = Fleet(plain, system)
        for system in ("mesh", "mesh-nodrain"):
            if system in fleets:
                fleet = fleets[system]
                latency.open_system("mesh", fleet.workers, plan.warmup_rounds)
                fleet.marked = all(w.call("loaded:mark_stages") for w in fleet.workers)
        idle: dict[tuple[str, int], list[tuple[float, float]]] = {}
        failed: set[str] = set()
        for _ in range(plan.blocks):
            for system, fleet in fleets.items():
                if system in failed:
                    continue
                if system in BASELINES:
                    try:
                        latency.open_system(system, fleet.workers, plan.warmup_rounds)
                    except Exception as exc:
                        errors.append(f"{LABELS[system]}, {size} processes: {exc}")
                        failed.add(system)
                        _close(fleet)
                        continue
                try:
                    for slice_us in plan.slices_us:
                        print(f"  {size} processes, {slice_us} µs slices: {LABELS[system]}")
                        if (system, slice_us) not in idle:
                            idle[system, slice_us] = _idle_rates(fleet, slice_us, plan)
                        result = results.setdefault((size, slice_us, system), Result())
                        _block(fleet, slice_us, plan, idle[system, slice_us], result)
                except Exception as exc:  # the other systems go on
                    first = str(exc).splitlines()[0] if str(exc) else ""
                    errors.append(
                        f"{LABELS[system]}, {size} processes: {type(exc).__name__}: {first}"
                    )
                    failed.add(system)
                finally:
                    if system in BASELINES:
                        _close(fleet)


# -- the report -------------------------------------------------------------------------------

INTRO = """
A web worker's main thread is mostly busy running Python (views, templates, serializers) and
holds the GIL meanwhile; a background thread that wakes up to carry an invalidation must wait for
it, up to `sys.getswitchinterval()` (5 ms) at each acquisition. Sections 2 and 4 measure idle
processes; here every process's main thread computes pure Python (arithmetic and dict updates,
no I/O) in slices of {slices} and reads the cache between two slices, as a view would. For each
fleet of {sizes} processes on 127.0.0.1, process 0 writes, the others receive. A round: the
writer reads `time.monotonic_ns()` (CLOCK_MONOTONIC: one clock for every process of a Linux
host) and sets the round's key (a new value, and the invalidation), then keeps computing in
slices, at least {settle:g} ms plus a random 0-{jitter:g} ms, and until every receiver has seen
the new value (or {timeout:g} s). Each receiver had the key with the old value; it notes the
first read that no longer returns it: the **staleness window** is that read's end minus the
write. Which key to read and when every receiver has seen it travel through a shared-memory
board (memory reads and writes, no system call, so no thread gives up the GIL for it).

Systems: `MeshCache` with default settings, and with `DRAIN_ON_READ` off (reads then leave
every invalidation to the node's receiver thread; measured where the version has that setting),
each in a fleet of its own; and, in processes with the mesh off, the baselines of section 2
built as a team would: Django's `LocMemCache`, the writer's set then the key published inline
(raw nng `Bus0`; Redis Pub/Sub with redis-py; NATS with nats-py, the publish handed to its
loop's thread and waited for), and one listener thread that deletes the key. One baseline is
open at a time, so no idle listener of another wants the GIL meanwhile. The fleets of one size
are up together (those not measured idle), and each system's rounds come in {blocks}, the
systems taking turns. The mesh's windows are also cut in stages, by
timestamps taken in its nodes: how long the frame took to leave the writer, and to be taken in
on the receiver.

**CPU per invalidation**, on both sides: each process's CPU time (all threads, native ones
included) less what its main thread spent inside the busy slices (its own CPU time around each
slice), less what the same processes spend beyond their slices in a run with nobody writing
(their other threads per second, their main thread's reads per slice), divided by the rounds
written. The writer's includes its inline set and publish; the receivers' column is the median
receiver.
"""


def _and(items: Sequence[object]) -> str:
    words = [str(item) for item in items]
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else "".join(words)


def intro(plan: Plan) -> str:
    """The section's introduction, for ``plan`` (docs/benchmarks.md quotes the full one)."""
    return INTRO.format(
        slices=_and([_slice(value) for value in plan.slices_us]),
        sizes=_and(plan.sizes),
        settle=SETTLE_US / 1000,
        jitter=JITTER_US / 1000,
        timeout=ROUND_TIMEOUT_S,
        blocks="one block" if plan.blocks == 1 else f"{plan.blocks} blocks",
    )


COLUMNS = [
    "processes",
    "slices",
    "system",
    "p50",
    "p99",
    "max",
    "p50 ÷ Redis Pub/Sub",
    "key gone p50 / p99",
    "writer CPU / invalidation",
    "receiver CPU / invalidation",
    "samples",
    "not seen within 1 s",
]


def _slice(slice_us: int) -> str:
    return f"{slice_us} µs" if slice_us < 1000 else f"{slice_us / 1000:g} ms"


def _table(section: Section, results: dict[tuple[int, int, str], Result]) -> None:
    table = Table(
        "Write → first read that no longer returns the old value, busy workers (receivers pooled)",
        COLUMNS,
    )
    for (size, slice_us, system), result in sorted(
        results.items(), key=lambda item: (item[0][0], item[0][1], SYSTEMS.index(item[0][2]))
    ):
        window = Distribution.of(result.windows)
        gone = Distribution.of(result.delivered)
        redis = results.get((size, slice_us, "redis"))
        redis_p50 = Distribution.of(redis.windows).p50 if redis else math.nan
        table.add(
            size,
            _slice(slice_us),
            LABELS[system],
            fmt_us(window.p50),
            fmt_us(window.p99),
            fmt_us(window.max),
            fmt_ratio(ratio(window.p50, redis_p50)),
            f"{fmt_us(gone.p50)} / {fmt_us(gone.p99)}",
            fmt_us(result.cpu_us(receivers=False)),
            fmt_us(result.cpu_us(receivers=True)),
            window.count,
            result.never,
        )
        if size == TARGET_SIZE and slice_us == TARGET_SLICE_US:
            section.samples[
                f"Loaded workers, {size} processes, {_slice(slice_us)} slices: write → first "
                f"fresh read|{LABELS[system]}"
            ] = result.windows
    switch = {result.switch_interval for result in results.values()}
    table.notes += [
        "Staleness window: from just before the write to the end of the first read on that "
        "receiver that no longer returned the old value; a read comes once per slice, so it "
        "adds up to one slice to the moment the invalidation was applied. Key gone: when the "
        "key left the receiver's store (applied by the receiving thread, or by a read that "
        "drained it). The GIL switch interval in the workers: "
        + ", ".join(f"{value * 1000:g} ms" for value in sorted(switch))
        + ".",
        "CPU per invalidation: a difference of two CPU totals of busy processes; a few tens "
        "of µs either way is within its noise.",
    ]
    section.tables.append(table)


TARGET_SIZE = 2
TARGET_SLICE_US = 200


def _stage_table(section: Section, results: dict[tuple[int, int, str], Result]) -> None:
    mesh = [(key, result) for key, result in sorted(results.items()) if key[2].startswith("mesh")]
    rows = [(key, result) for key, result in mesh if result.stages]
    if not rows:
        return
    table = Table(
        "Where django-warpmesh's window goes (p50 / p99 of each stage)",
        ["processes", "slices", "system", *STAGES, "window"],
    )
    for (size, slice_us, system), result in rows:
        spans = [result.stages[stage] for stage in STAGES]
        table.add(
            size,
            _slice(slice_us),
            LABELS[system],
            *(f"{fmt_us(median(s))} / {fmt_us(percentile(s, 0.99))}" for s in spans),
            f"{fmt_us(median(result.windows))} / {fmt_us(percentile(result.windows, 0.99))}",
        )
    table.notes.append(
        "Timestamps taken in the same rounds by wrapping three methods of the node (a clock "
        "read each): on the writer, just before an invalidation frame is encoded and sent (by "
        "the sender thread, or by the writing thread itself where it sends); on each receiver, "
        "when the thread that took the frame off the socket (the receiver thread, or a read "
        "that drains) starts handling it. Each stage's percentiles are its own: they need not "
        "add up to the window's."
    )
    unaligned = [
        f"{LABELS[system]}, {size} processes, {_slice(slice_us)} slices: {result.unaligned}"
        for (size, slice_us, system), result in mesh
        if result.unaligned
    ]
    if unaligned:
        table.notes.append(
            "Blocks not cut in stages, their timestamps not one per round on every process "
            "(a round not seen within its second, say): " + "; ".join(unaligned) + "."
        )
    section.tables.append(table)


STAGE_CAUSES = {
    "write → frame sent": "the frame waits on the writer for a thread to send it, the sender "
    "thread getting the GIL from the busy main thread (up to a switch interval per acquisition)",
    "frame sent → taken in by the receiver": "nng and TCP, then a thread of the receiver taking "
    "the frame in, either the receiver thread once it gets the GIL from the busy main thread (up "
    "to a switch interval per acquisition) or a read that drains the socket, with nng's own "
    "threads sharing the cores with the busy main threads",
    "taken in → key gone": "verifying, decoding and applying the frame",
    "key gone → first fresh read": "the next read, at the end of the slice under way",
}


def _limit(results: dict[tuple[int, int, str], Result], p99: bool) -> str:
    """What the measurements say limits the mesh's window at the target's fleet and slice."""
    at = {
        system: results[TARGET_SIZE, TARGET_SLICE_US, system]
        for system in SYSTEMS
        if (TARGET_SIZE, TARGET_SLICE_US, system) in results
    }
    mesh = at["mesh"]
    point = 0.99 if p99 else 0.5
    name = "p99" if p99 else "p50"
    window = percentile(mesh.windows, point)
    switch = mesh.switch_interval * 1e6
    others = ", ".join(
        f"{LABELS[system]} {fmt_us(percentile(result.windows, point))}"
        for system, result in at.items()
        if system != "mesh"
    )
    text = (
        f"the window's {name} is {fmt_us(window)} ({ratio(window, switch):.1f} GIL switch "
        f"intervals of {fmt_us(switch)}); "
    )
    if mesh.stages:
        spans = {stage: percentile(mesh.stages[stage], point) for stage in STAGES}
        # The stages that make the window: a quarter of the stages' sum or more each.
        total = sum(spans.values())
        large = sorted((s for s in spans if spans[s] >= total / 4), key=lambda s: -spans[s])
        path = "; ".join(f"{stage} {fmt_us(span)}" for stage, span in spans.items())
        causes = "; ".join(f"{stage}, {STAGE_CAUSES[stage]}" for stage in large)
        text += f"stage by stage ({name} of each): {path}. Where it goes: {causes}"
    else:
        gone = percentile(mesh.delivered, point)
        text += (
            f"the key left the receiver's store {name} {fmt_us(gone)} after the write: the "
            "threads that carry the invalidation (the writer's sender thread, the receiver's "
            "thread) must get the GIL the busy main thread holds, up to a switch interval at "
            "each acquisition"
        )
    return f"{text}. In the same run, {name}: {others}"


def _targets(section: Section, results: dict[tuple[int, int, str], Result]) -> None:
    where = f"{TARGET_SIZE} processes ({_slice(TARGET_SLICE_US)} slices)"
    mesh = results.get((TARGET_SIZE, TARGET_SLICE_US, "mesh"))
    redis = results.get((TARGET_SIZE, TARGET_SLICE_US, "redis"))
    window = Distribution.of(mesh.windows) if mesh else None
    redis_p50 = Distribution.of(redis.windows).p50 if redis else math.nan
    versus = ratio(window.p50, redis_p50) if window else math.nan
    measured = window is not None and window.count > 0
    section.targets += [
        Target(
            f"loaded p50 <= 0.2x Redis Pub/Sub at {where}",
            f"{fmt_us(window.p50)} vs {fmt_us(redis_p50)}: {fmt_ratio(versus)}"
            if window
            else "not measured",
            None if not measured or math.isnan(versus) else versus <= 0.2,
            _limit(results, p99=False) if measured else "",
        ),
        Target(
            f"loaded p50 <= 1 ms at {where}",
            fmt_us(window.p50) if window else "not measured",
            window.p50 <= 1000 if measured and window else None,
            _limit(results, p99=False) if measured else "",
        ),
        Target(
            f"loaded p99 <= 3 ms ({TARGET_SIZE} processes, {_slice(TARGET_SLICE_US)})",
            fmt_us(window.p99) if window else "not measured",
            window.p99 <= 3000 if measured and window else None,
            _limit(results, p99=True) if measured else "",
        ),
    ]


def run(quick: bool) -> Section:
    plan = QUICK if quick else FULL
    section = Section(
        7,
        "Loaded workers",
        intro=intro(plan),
    )
    drain_known = drain_setting_known()
    results: dict[tuple[int, int, str], Result] = {}
    errors: list[str] = []
    for size in plan.sizes:
        print(f"  fleet of {size} processes", flush=True)
        try:
            _fleet_size(size, plan, drain_known, results, errors)
        except Exception as exc:
            errors.append(f"fleet of {size}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    _table(section, results)
    _stage_table(section, results)
    _targets(section, results)
    rounds = ", ".join(
        f"{size} processes: {plan.blocks * plan.block_rounds[size]}" for size in plan.sizes
    )
    section.notes.append(f"Rounds per system and slice length: {rounds}.")
    if not drain_known:
        section.notes.append(
            "`DRAIN_ON_READ` off: not measured, this version of django-warpmesh has no such "
            "setting (its reads never apply invalidations themselves: the django-warpmesh rows "
            "are what that setting's off would be)."
        )
    section.notes += errors
    return section
