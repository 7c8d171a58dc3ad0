"""The fill race's bookkeeping stays small: in a threaded worker whose fills always overlap, with
a fill that never ends, and in a child forked while a fill was open."""

from __future__ import annotations

import itertools
import json
import os
import threading
from typing import Any

import pytest

from django_warpmesh import cache as mesh_cache
from django_warpmesh.cache import MeshCache
from django_warpmesh.protocol import Op, OpCode

WAIT = 10.0
_names = itertools.count()


def fresh_cache() -> MeshCache:
    return MeshCache(f"test-fills-{next(_names)}", {"OPTIONS": {"MAX_ENTRIES": 100_000}})


def bookkeeping(cache: MeshCache) -> int:
    store = cache._store
    with store.lock:
        return len(store._invalidated_at) + len(store._marked_at)


def test_overlapping_fills_in_a_threaded_worker_keep_the_bookkeeping_small() -> None:
    """Two threads fill in turn, each starting its fill before the other's ends, so one is
    always open; peers' invalidations of other keys and tags land during every fill."""
    cache = fresh_cache()
    rounds = 2000
    begun = [threading.Event() for _ in range(rounds + 1)]
    turns = [threading.Semaphore(0), threading.Semaphore(0)]
    largest = 0
    stored: list[Any] = []
    errors: list[BaseException] = []

    def fill(index: int) -> int:
        nonlocal largest
        begun[index].set()
        cache._store.apply(
            [
                Op(cache._location, OpCode.DELETE, [f":1:gone-{index}"]),
                Op(cache._location, OpCode.TAGS, [f"s:gone-{index}", f"r:table:{index}"]),
            ]
        )
        largest = max(largest, bookkeeping(cache))
        if index + 1 < rounds:
            turns[(index + 1) % 2].release()  # the other thread begins the next fill...
            assert begun[index + 1].wait(WAIT)  # ...before this one ends
        return index

    def worker(parity: int) -> None:
        try:
            for index in range(parity, rounds, 2):
                assert turns[parity].acquire(timeout=WAIT)
                stored.append(cache.get_or_set(f"k{index}", lambda i=index: fill(i), tags=["t"]))
        except BaseException as exc:
            errors.append(exc)
            raise

    threads = [threading.Thread(target=worker, args=(parity,)) for parity in (0, 1)]
    for thread in threads:
        thread.start()
    turns[0].release()
    for thread in threads:
        thread.join(WAIT * 3)
    assert not errors
    assert sorted(stored) == list(range(rounds))
    # Each fill sees only what landed since the oldest open fill began: two fills' worth.
    assert largest <= 10, largest
    assert bookkeeping(cache) == 0
    # Nothing here invalidated the filled keys or the tag "t": every value was stored.
    assert all(cache.get(f"k{index}") == index for index in range(rounds))


def test_a_fill_that_never_ends_cannot_grow_the_bookkeeping_without_bound() -> None:
    cache = fresh_cache()
    store = cache._store
    started_at = store.begin_fill()
    for index in range(3 * mesh_cache.MAX_FILL_NOTES):
        store.apply([Op(cache._location, OpCode.DELETE, [f":1:gone-{index}"])])
        store.apply([Op(cache._location, OpCode.TAGS, [f"s:gone-{index}"])])
    assert bookkeeping(cache) <= 2 * mesh_cache.MAX_FILL_NOTES
    # Having forgotten what it saw, it cannot know the fill is fresh: the value is not stored.
    assert store.end_fill(started_at, ":1:k") is False
    # A fill begun afterwards is not affected.
    later = store.begin_fill()
    assert store.end_fill(later, ":1:k") is True
    assert bookkeeping(cache) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_while_a_fill_was_open_keeps_the_bookkeeping_small() -> None:
    cache = fresh_cache()
    computing = threading.Event()
    release = threading.Event()

    def slow() -> str:
        computing.set()
        assert release.wait(WAIT)
        return "parent"

    # Another thread of the parent is mid-fill when the process forks: in the child, that
    # thread does not exist, and its fill never ends.
    other = threading.Thread(target=lambda: cache.get_or_set("slow", slow))
    other.start()
    assert computing.wait(WAIT)

    def spanning() -> str:
        # This thread's own fill spans the fork: the child returns from here and finishes it.
        read, write = os.pipe()
        pid = os.fork()
        if pid != 0:
            os.close(write)
            with os.fdopen(read) as pipe:
                report.update(json.loads(pipe.read() or "{}"))
            _, status = os.waitpid(pid, 0)
            report["status"] = status
            return "parent"
        os.close(read)
        child_pipe.append(write)
        return "child"

    report: dict[str, Any] = {}
    child_pipe: list[int] = []
    try:
        value = cache.get_or_set("spanning", spanning)
        if child_pipe:  # the child, after its fill ended
            store = cache._store
            for index in range(2000):
                store.apply([Op(cache._location, OpCode.DELETE, [f":1:gone-{index}"])])
                store.apply([Op(cache._location, OpCode.TAGS, [f"s:gone-{index}"])])
            child_report = {
                "value": value,
                "stored": cache.has_key("spanning"),
                "open_fills": store._open_fills,
                "bookkeeping": bookkeeping(cache),
            }
            os.write(child_pipe[0], json.dumps(child_report).encode())
    finally:
        if child_pipe:
            os._exit(0)
        release.set()
        other.join(WAIT)
    assert report.pop("status") == 0
    assert report == {"value": "child", "stored": False, "open_fills": 0, "bookkeeping": 0}
    # The parent goes on as before.
    assert cache.get("slow") == "parent"
    assert cache.get("spanning") == "parent"
