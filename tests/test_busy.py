"""Busy workers: a mesh thread that gets no turn must not hold an invalidation back.

On a web worker whose main thread runs Python, the node's threads wait for the GIL (up to
``sys.getswitchinterval()`` per hand-off). Here they are stopped outright ("starved") in real
processes: the writing thread sends its own invalidation, and a reading thread applies what has
reached its socket before it reads.
"""

from __future__ import annotations

import pytest

from harness import wait_for
from tests.cluster import cluster

pytestmark = pytest.mark.mesh

# Long enough that the starved threads' silence is not taken for a dead peer meanwhile.
SLOW_HEARTBEAT = {"HEARTBEAT": 1.0}


@pytest.mark.parametrize("drain", [True, False], ids=["drain-on-read", "receiver-only"])
def test_a_read_after_an_invalidation_arrived_never_returns_the_stale_value(
    drain: bool,
) -> None:
    with cluster(2, DRAIN_ON_READ=drain, **SLOW_HEARTBEAT) as mesh:
        mesh.wait_connected()
        writer, reader = mesh.procs
        reader.cache("set", "k", "old", None)
        assert reader.request("starve", thread="warpmesh-receiver")
        writer.cache("delete", "k")
        wait_for(lambda: reader.request("socket_ready"), 5, message="the frame at the socket")
        assert reader.stored("k")  # arrived, not applied: its receiver thread gets no turn
        if drain:
            assert reader.cache("get", "k") is None
            assert not reader.stored("k")
        else:
            # What the guarantee prevents: the read serves the value the frame invalidates.
            assert reader.cache("get", "k") == "old"
        reader.request("starve", thread="warpmesh-receiver", on=False)
        wait_for(lambda: not reader.stored("k"), 5, message="the receiver to catch up")


def test_a_writer_whose_sender_thread_is_starved_still_delivers() -> None:
    with cluster(2, **SLOW_HEARTBEAT) as mesh:
        mesh.wait_connected()
        writer, reader = mesh.procs
        reader.cache("set", "k", "old", None)
        assert writer.request("starve", thread="warpmesh-sender")
        writer.cache("delete", "k")
        # Well within a heartbeat: the writing thread sent it, nothing waited for the sender.
        wait_for(lambda: not reader.stored("k"), 0.5, message="the delete to cross")
        writer.request("starve", thread="warpmesh-sender", on=False)


def test_writes_from_many_threads_arrive_in_order_and_whole() -> None:
    with cluster(2, **SLOW_HEARTBEAT) as mesh:
        mesh.wait_connected()
        writer, reader = mesh.procs
        keys = [f"t{i}" for i in range(400)]
        reader.request("fill_local", prefix="t", count=len(keys))
        writer.request("threaded_deletes", prefix="t", count=len(keys), threads=8)
        wait_for(lambda: reader.request("count") == 0, 5, message="every delete to cross")
        stats = reader.stats()
        assert (stats["gaps_detected"], stats["flushes"]) == (0, 0)
