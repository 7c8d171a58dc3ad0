"""The sender's coalescing: fewer ops on the wire, never a weaker invalidation."""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import pickle
import queue
import threading
from collections.abc import Callable
from typing import Any

from django.core.cache.backends import locmem
from hypothesis import example, given, settings
from hypothesis import strategies as st

from django_warpmesh import cache as mesh_cache
from django_warpmesh import store as mesh_store
from django_warpmesh.cache import MeshCache
from django_warpmesh.node import SINGLE_OP_MAX_ITEMS, coalesce, process
from django_warpmesh.node.ops import single_op
from django_warpmesh.protocol import Op, OpCode, digest


def test_a_key_is_sent_once_with_its_last_operation() -> None:
    ops = coalesce(
        [
            ("c", OpCode.DELETE_UNLESS, (":1:a", b"v1")),
            ("c", OpCode.DELETE, [":1:a", ":1:b"]),
            ("c", OpCode.DELETE_UNLESS, (":1:b", b"v2")),
            ("c", OpCode.DELETE, [":1:a"]),
        ],
        set(),
    )
    assert ops == [
        Op("c", OpCode.DELETE, [":1:a"]),
        Op("c", OpCode.DELETE_UNLESS, [[":1:b", digest(b"v2")]]),
    ]


def test_a_clear_swallows_earlier_and_later_ops_of_its_cache_only() -> None:
    ops = coalesce(
        [
            ("c", OpCode.DELETE, [":1:a"]),
            ("c", OpCode.TAGS, ["t:x"]),
            ("c", OpCode.PATTERN, ":1:u*"),
            ("c", OpCode.CLEAR, None),
            ("c", OpCode.DELETE, [":1:b"]),
            ("other", OpCode.DELETE, [":1:a"]),
        ],
        set(),
    )
    assert ops == [Op("c", OpCode.CLEAR, None), Op("other", OpCode.DELETE, [":1:a"])]


def test_an_overflowed_cache_is_cleared() -> None:
    assert coalesce([("c", OpCode.DELETE, [":1:a"])], {"c"}) == [Op("c", OpCode.CLEAR, None)]


def test_tags_and_patterns_are_merged_per_cache() -> None:
    ops = coalesce(
        [
            ("c", OpCode.TAGS, ["t:x", "s:y"]),
            ("c", OpCode.TAGS, ["s:y", "r:x:1"]),
            ("c", OpCode.PATTERN, ":1:a*"),
            ("c", OpCode.PATTERN, ":1:a*"),
        ],
        set(),
    )
    assert ops == [Op("c", OpCode.TAGS, ["t:x", "s:y", "r:x:1"]), Op("c", OpCode.PATTERN, ":1:a*")]


# -- property: coalescing never leaves a peer with a value a write made stale -----------------

ALIASES = ("c", "d")
KEYS = (":1:a", ":1:b", ":1:ab")
VALUES = (b"v1", b"v2")
TAG_OF = {":1:a": "t:x", ":1:b": "t:y", ":1:ab": "t:x"}

queued_ops = st.one_of(
    st.tuples(
        st.sampled_from(ALIASES),
        st.just(OpCode.DELETE),
        st.lists(st.sampled_from(KEYS), max_size=2),
    ),
    st.tuples(
        st.sampled_from(ALIASES),
        st.just(OpCode.DELETE_UNLESS),
        st.tuples(st.sampled_from(KEYS), st.sampled_from(VALUES)),
    ),
    st.tuples(st.sampled_from(ALIASES), st.just(OpCode.CLEAR), st.none()),
    st.tuples(
        st.sampled_from(ALIASES), st.just(OpCode.PATTERN), st.sampled_from((":1:a*", ":1:b"))
    ),
    st.tuples(st.sampled_from(ALIASES), st.just(OpCode.TAGS), st.lists(st.just("t:x"), max_size=1)),
)


def _apply(
    held: dict[tuple[str, str], bytes], alias: str, code: OpCode, args: Any, dig: bool
) -> None:
    """What a peer does with one op (``dig``: DELETE_UNLESS carries digests, as on the wire)."""
    for entry in [entry for entry in held if entry[0] == alias]:
        key = entry[1]
        if code is OpCode.DELETE:
            dropped = key in args
        elif code is OpCode.DELETE_UNLESS:
            pairs = args if dig else [[args[0], digest(args[1])]]
            dropped = any(k == key and d != digest(held[entry]) for k, d in pairs)
        elif code is OpCode.CLEAR:
            dropped = True
        elif code is OpCode.PATTERN:
            dropped = fnmatch.fnmatchcase(key, args)
        else:
            dropped = TAG_OF[key] in args
        if dropped:
            del held[entry]


@given(
    queue=st.lists(queued_ops, max_size=12),
    overflowed=st.sets(st.sampled_from(ALIASES)),
    peer=st.dictionaries(
        st.tuples(st.sampled_from(ALIASES), st.sampled_from(KEYS)), st.sampled_from(VALUES)
    ),
)
def test_coalescing_is_never_weaker_than_the_queue_in_order(
    queue: list[tuple[str, OpCode, Any]], overflowed: set[str], peer: dict[tuple[str, str], bytes]
) -> None:
    in_order = dict(peer)
    for alias in overflowed:
        _apply(in_order, alias, OpCode.CLEAR, None, dig=False)
    for alias, code, args in queue:
        _apply(in_order, alias, code, args, dig=False)
    coalesced = dict(peer)
    for op in coalesce(queue, overflowed):
        _apply(coalesced, op.location, op.code, op.args, dig=True)
    # Where the writer's last op on a key stored a value, a peer holding exactly it is not stale.
    last_written: dict[tuple[str, str], bytes] = {}
    for alias, code, args in queue:
        if code is OpCode.DELETE_UNLESS:
            last_written[(alias, args[0])] = args[1]
        else:
            _apply(last_written, alias, code, args, dig=False)
    for entry, value in coalesced.items():
        assert entry in in_order or last_written.get(entry) == value, (entry, value)


# -- property: what the writer applied, in the order it applied it, is what peers get ----------
#
# Worker threads drive one real MeshCache, run one at a time by a scheduler that switches
# between them only where they publish (inside or outside the store's lock, wherever the cache
# publishes) or find the store's lock taken. Hypothesis picks the switches, so every order in
# which two writers can interleave is reachable, and each run is reproducible.

WORKER_KEYS = ("a", "b", "ab")
WORKER_TAG = {"a": "x", "b": "y", "ab": "x"}
STEP_TIMEOUT = 10.0


class Scheduler:
    """Lets one worker thread run at a time, until it reaches its next switch point."""

    def __init__(self) -> None:
        self.running = False
        self.reports: queue.Queue[str] = queue.Queue()
        self.turns: dict[int, threading.Semaphore] = {}

    def switch(self, why: str) -> None:
        """Called by the running worker: hand control back and wait for its next turn."""
        if not self.running:
            return
        turn = self.turns[threading.get_ident()]
        self.reports.put(why)
        assert turn.acquire(timeout=STEP_TIMEOUT), "the scheduler never gave this worker a turn"

    def run(self, workers: list[Callable[[], None]], schedule: list[int], lock: ProbeLock) -> None:
        states: dict[int, str] = {}
        turns: list[threading.Semaphore] = []
        errors: list[BaseException] = []
        started = threading.Barrier(len(workers) + 1, timeout=STEP_TIMEOUT)

        def body(work: Callable[[], None], turn: threading.Semaphore) -> None:
            self.turns[threading.get_ident()] = turn
            started.wait()
            assert turn.acquire(timeout=STEP_TIMEOUT)
            try:
                work()
            except BaseException as exc:  # reported to the test's thread below
                errors.append(exc)
            finally:
                self.reports.put("done")

        threads = []
        for work in workers:
            turn = threading.Semaphore(0)
            turns.append(turn)
            threads.append(threading.Thread(target=body, args=(work, turn), daemon=True))
        for index, thread in enumerate(threads):
            states[index] = "ready"
            thread.start()
        started.wait()
        self.running = True
        choices = iter(schedule)
        try:
            while any(state != "done" for state in states.values()):
                runnable = [
                    index
                    for index, state in states.items()
                    if state == "ready" or (state == "blocked" and not lock.locked())
                ]
                assert runnable, f"every worker waits: {states}"
                chosen = runnable[next(choices, 0) % len(runnable)]
                turns[chosen].release()
                states[chosen] = self.reports.get(timeout=STEP_TIMEOUT)
        finally:
            self.running = False
            for thread in threads:
                thread.join(STEP_TIMEOUT)
        if errors:
            raise errors[0]


class ProbeLock:
    """The store's lock, as a switch point for the scheduler when another worker holds it."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._lock = threading.Lock()
        self._scheduler = scheduler

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not self._scheduler.running:
            return self._lock.acquire(blocking, timeout)
        while not self._lock.acquire(blocking=False):
            if not blocking:
                return False
            self._scheduler.switch("blocked")
        return True

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _at_fork_reinit(self) -> None:
        self._lock = threading.Lock()


class InterleavingNode:
    """The process's node for the workers: records what is queued, a switch point before it."""

    enabled = True
    ready = True
    max_timeout: float | None = None

    def __init__(self, alias: str, scheduler: Scheduler) -> None:
        self.alias = alias
        self.scheduler = scheduler
        self.queued: list[tuple[str, OpCode, Any]] = []
        # Where each inline send cut the queue: it takes everything queued so far, by any thread.
        self.delivered_at: set[int] = set()

    def register_store(self, name: str, store: Any) -> None:
        pass

    def publish(self, alias: str, code: OpCode, arg: Any) -> None:
        if alias == self.alias:
            self.scheduler.switch("ready")
            self.queued.append((alias, code, arg))

    def deliver(self) -> None:
        """The writing thread's own send: another thread may run first (a switch point)."""
        self.scheduler.switch("ready")
        self.delivered_at.add(len(self.queued))


worker_ops = st.one_of(
    st.tuples(st.sampled_from(("set", "add", "get_or_set")), st.sampled_from(WORKER_KEYS)),
    st.tuples(st.sampled_from(("delete", "incr")), st.sampled_from(WORKER_KEYS)),
    st.tuples(st.just("delete_many"), st.sampled_from(WORKER_KEYS)),
    st.tuples(st.just("clear"), st.none()),
    st.tuples(st.just("delete_pattern"), st.sampled_from(("a*", "b"))),
    st.tuples(st.just("invalidate"), st.sampled_from(("x", "y"))),
)


def _worker(cache: MeshCache, ops: list[tuple[str, Any]], value: int) -> Callable[[], None]:
    def work() -> None:
        for name, arg in ops:
            if name in ("set", "add", "get_or_set"):
                getattr(cache, name)(arg, value, tags=[WORKER_TAG[arg]])
            elif name == "delete":
                cache.delete(arg)
            elif name == "incr":
                with contextlib.suppress(ValueError):
                    cache.incr(arg)
            elif name == "delete_many":
                cache.delete_many([arg, "b"])
            elif name == "clear":
                cache.clear()
            elif name == "delete_pattern":
                cache.delete_pattern(arg)
            else:
                mesh_cache.invalidate(arg)

    return work


def _concerns(entry: tuple[str, OpCode, Any], key: str) -> bool:
    _, code, arg = entry
    if code is OpCode.DELETE:
        return key in arg
    if code is OpCode.DELETE_UNLESS:
        return bool(arg[0] == key)
    if code is OpCode.PATTERN:
        return fnmatch.fnmatchcase(key, arg)
    if code is OpCode.TAGS:
        return "s:" + WORKER_TAG[key.rsplit(":", 1)[1]] in arg
    return True  # CLEAR


_interleaved = itertools.count()


@given(
    workloads=st.lists(st.lists(worker_ops, min_size=1, max_size=3), min_size=2, max_size=3),
    schedule=st.lists(st.integers(0, 2), max_size=24),
    cuts=st.sets(st.integers(1, 12), max_size=3),
    # The peer holds every key, each with one of the values the workers write.
    peer=st.fixed_dictionaries({key: st.integers(1, 3) for key in WORKER_KEYS}),
)
@example(
    # A refill racing a delete: the set is applied first, the delete's op is queued first.
    workloads=[[("set", "a")], [("delete", "a")]],
    schedule=[0, 1, 1, 0],
    cuts=set(),
    peer={"a": 1, "b": 1, "ab": 1},
)
@settings(deadline=None, max_examples=300)
def test_peers_end_with_what_the_writer_holds_whatever_the_interleaving(
    workloads: list[list[tuple[str, Any]]],
    schedule: list[int],
    cuts: set[int],
    peer: dict[str, int],
) -> None:
    scheduler = Scheduler()
    name = f"test-coalesce-interleaved-{next(_interleaved)}"
    lock = ProbeLock(scheduler)
    locmem._locks[name] = lock  # type: ignore[attr-defined]
    node = InterleavingNode(name, scheduler)
    saved_node, process._current = process._current, node  # type: ignore[assignment]
    peer_store = mesh_cache.LocMemStore(f"{name}-peer")
    try:
        cache = MeshCache(name, {"OPTIONS": {"MAX_ENTRIES": 1000}})
        workers = [_worker(cache, ops, value) for value, ops in enumerate(workloads, 1)]
        scheduler.run(workers, schedule, lock)
        for key, value in peer.items():
            tags = ("s:" + WORKER_TAG[key],)
            peer_store.put(
                f":1:{key}", pickle.dumps(value, cache.pickle_protocol), None, 1000, 3, tags=tags
            )
        # The queue goes out in batches, each coalesced: cut where a writing thread sent it
        # inline, and where the sender thread woke up (anywhere: hypothesis picks).
        queued = node.queued
        inner = {cut for cut in cuts | node.delivered_at if 0 < cut < len(queued)}
        bounds = [0, *sorted(inner), len(queued)]
        for start, end in itertools.pairwise(bounds):
            peer_store.apply(coalesce(queued[start:end], set()))
        writer = dict(cache._store.cache)
        for key, stored in peer_store.cache.items():
            assert writer.get(key) == stored or not any(_concerns(e, key) for e in queued), (
                key,
                pickle.loads(stored),
                queued,
            )
    finally:
        process._current = saved_node
        for store_name in (name, f"{name}-peer"):
            mesh_store._stores.pop(store_name, None)
            for shared in ("_caches", "_expire_info", "_locks"):
                vars(locmem)[shared].pop(store_name, None)


@given(
    code=st.sampled_from(list(OpCode)),
    keys=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=80),
    value=st.binary(max_size=64),
)
def test_a_single_op_is_sent_as_coalescing_would_send_it(
    code: OpCode, keys: list[str], value: bytes
) -> None:
    arg: Any = {
        OpCode.DELETE: keys,
        OpCode.TAGS: keys,
        OpCode.DELETE_UNLESS: (keys[0], value),
        OpCode.PATTERN: keys[0],
        OpCode.CLEAR: None,
    }[code]
    single = single_op("c", code, arg)
    if single is None:  # a long list: split like any batch
        assert len(set(keys)) > SINGLE_OP_MAX_ITEMS
        return
    assert [single] == coalesce([("c", code, arg)], set())
