"""The mesh end to end: real OS processes, real sockets on loopback, static peers."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from harness import free_ports, wait_for
from tests.cluster import Cluster, MeshProcess, cluster

pytestmark = pytest.mark.mesh


@pytest.fixture(scope="module")
def trio() -> Iterator[Cluster]:
    with cluster(3) as mesh:
        mesh.wait_connected()
        yield mesh


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> None:
    if "trio" in request.fixturenames:
        mesh = request.getfixturevalue("trio")
        for proc in mesh.procs:
            proc.request("clear_local")
            proc.request("clear_local", alias="other")


def fill_everywhere(mesh: Cluster, key: str, value: object, alias: str = "default") -> None:
    for proc in mesh.procs:
        proc.cache("set", key, value, None, alias=alias)
    assert all(proc.stored(key, alias) for proc in mesh.procs)


def gone_from_others(mesh: Cluster, writer: MeshProcess, key: str, alias: str = "default") -> None:
    others = [proc for proc in mesh.procs if proc is not writer]
    wait_for(
        lambda: not any(proc.stored(key, alias) for proc in others),
        timeout=5,
        message=f"{key!r} to leave the other processes",
    )


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("set", ["k", "new", None]),
        ("delete", ["k"]),
        ("delete_many", [["k", "unrelated"]]),
        ("set_many", [{"k": "new"}, None]),
        ("incr", ["k", 5]),
        ("decr", ["k", 5]),
        ("incr_version", ["k"]),
    ],
)
def test_each_mutation_evicts_the_key_from_peers(
    trio: Cluster, method: str, args: list[object]
) -> None:
    fill_everywhere(trio, "k", 10)
    writer = trio.procs[0]
    writer.cache(method, *args)
    gone_from_others(trio, writer, "k")


def test_add_get_or_set_and_clear_reach_peers(trio: Cluster) -> None:
    writer, *others = trio.procs
    for proc in others:
        proc.cache("set", "added", "old", None)
    assert writer.cache("add", "added", "new", None) is True
    gone_from_others(trio, writer, "added")

    for proc in others:
        proc.cache("set", "filled", "old", None)
    assert writer.cache("get_or_set", "filled", "new", None) == "new"
    gone_from_others(trio, writer, "filled")

    fill_everywhere(trio, "a", 1)
    fill_everywhere(trio, "b", 2)
    writer.cache("clear")
    wait_for(lambda: all(proc.request("count") == 0 for proc in others), 5, message="clear")


def test_delete_pattern_reaches_peers(trio: Cluster) -> None:
    fill_everywhere(trio, "user:1:name", "a")
    fill_everywhere(trio, "user:2:name", "b")
    fill_everywhere(trio, "group:1", "c")
    writer = trio.procs[1]
    assert writer.cache("delete_pattern", "user:*") == 2
    gone_from_others(trio, writer, "user:1:name")
    gone_from_others(trio, writer, "user:2:name")
    assert all(proc.stored("group:1") for proc in trio.procs)


def test_touch_is_local_only(trio: Cluster) -> None:
    fill_everywhere(trio, "t", 1)
    fill_everywhere(trio, "other-key", 1)
    writer = trio.procs[0]
    assert writer.cache("touch", "t", 300) is True
    # Frames from one origin arrive in order: once the later delete has landed, anything the
    # touch had sent would have too.
    writer.cache("delete", "other-key")
    gone_from_others(trio, writer, "other-key")
    assert all(proc.stored("t") for proc in trio.procs)


def barrier(mesh: Cluster) -> None:
    """Wait until every frame each process sent so far has been applied by every other.

    Frames from one origin travel in order on each pipe, so once a marker deletion sent after
    them has arrived, they have too.
    """
    for index, writer in enumerate(mesh.procs):
        marker = f"barrier-{index}"
        fill_everywhere(mesh, marker, 1)
        writer.cache("delete", marker)
        gone_from_others(mesh, writer, marker)


def test_equal_values_do_not_evict_each_other(trio: Cluster) -> None:
    # Every process fills the key from the same data, in turn and again: nobody evicts anybody.
    fill_everywhere(trio, "same", {"price": 10})
    fill_everywhere(trio, "same", {"price": 10})
    barrier(trio)
    assert all(proc.stored("same") for proc in trio.procs)

    # A genuinely new value evicts every old copy.
    writer = trio.procs[0]
    writer.cache("set", "same", {"price": 11}, None)
    gone_from_others(trio, writer, "same")


def test_invalidation_only_touches_its_alias(trio: Cluster) -> None:
    fill_everywhere(trio, "shared-name", 1, alias="default")
    fill_everywhere(trio, "shared-name", 1, alias="other")
    writer = trio.procs[2]
    writer.cache("delete", "shared-name", alias="other")
    gone_from_others(trio, writer, "shared-name", alias="other")
    assert all(proc.stored("shared-name", "default") for proc in trio.procs)


def test_stats_show_connected_peers_with_latency(trio: Cluster) -> None:
    stats = trio.procs[0].stats()
    assert stats["enabled"] is True
    assert stats["address"] == trio.addresses[0]
    peers = {peer["address"]: peer for peer in stats["peers"]}
    assert set(peers) == set(trio.addresses[1:])
    assert all(peer["connected"] for peer in peers.values())
    wait_for(
        lambda: all(p["latency_ms"] is not None for p in trio.procs[0].stats()["peers"]),
        5,
        message="latency measured",
    )
    for key in (
        "invalidations_sent",
        "invalidations_received",
        "gaps_detected",
        "frames_rejected",
        "queue_overflows",
    ):
        assert isinstance(stats[key], int)


def test_flood_is_applied_or_flushed_never_stale() -> None:
    """50,000 invalidations from one node: each receiver applied all, or saw a gap and flushed."""
    count = 50_000
    with cluster(3, BUFFER_SIZE=64) as mesh:
        mesh.wait_connected()
        writer, *receivers = mesh.procs
        for proc in receivers:
            proc.request("fill_local", prefix="f", count=count, alias="bulk")
            assert proc.request("count", alias="bulk") == count
        writer.request("flood", prefix="f", count=count, alias="bulk")
        sent = writer.stats()["invalidations_sent"]
        for proc in receivers:
            wait_for(
                lambda p=proc: p.request("count", alias="bulk") == 0,
                30,
                message="no stale key left",
            )
        assert sent > 0
        # Every key is gone; say how (applied in full, or gap detected and flushed).
        for proc in receivers:
            stats = proc.stats()
            assert stats["keys_received"] >= count or stats["gaps_detected"] >= 1, stats


def test_killed_peer_restarts_and_rejoins() -> None:
    with cluster(3) as mesh:
        mesh.wait_connected()
        old_id = mesh.procs[2].stats()["node_id"]
        mesh.procs[2].kill(signal.SIGKILL)
        wait_for(
            lambda: (
                not any(
                    p["connected"]
                    for p in mesh.procs[0].stats()["peers"]
                    if p["address"] == mesh.addresses[2]
                )
            ),
            10,
            message="the killed peer to be seen as lost",
        )
        restarted = mesh.restart(2)
        mesh.wait_connected()
        assert restarted.stats()["node_id"] != old_id
        fill_everywhere(mesh, "after-restart", 1)
        mesh.procs[0].cache("set", "after-restart", 2, None)
        gone_from_others(mesh, mesh.procs[0], "after-restart")
        restarted.cache("set", "from-new", 1, None)
        mesh.procs[0].cache("set", "from-new", 0, None)
        restarted.cache("delete", "from-new")
        wait_for(lambda: not mesh.procs[0].stored("from-new"), 5, message="new node's delete")


def test_forged_frames_are_rejected_and_counted() -> None:
    with cluster(2) as mesh:
        mesh.wait_connected()
        victim = mesh.procs[0]
        victim.cache("set", "precious", 1, None)
        forger = MeshProcess(
            {
                "BIND": "127.0.0.1",
                "PORT": 0,
                "PEERS": mesh.addresses,
                "SECRET": "not-the-mesh-secret",
                "HEARTBEAT": 0.2,
            }
        )
        try:
            forger.request("start")
            forger.cache("delete", "precious")
            forger.cache("clear")
            wait_for(
                lambda: victim.stats()["rejected_by_reason"].get("bad_mac", 0) >= 2,
                10,
                message="forged frames to be rejected",
            )
            assert victim.stored("precious")
            assert victim.stats()["frames_rejected"] >= 2
        finally:
            forger.close()


def test_alone_node_caches_from_the_first_call() -> None:
    proc = MeshProcess(
        {"BIND": "127.0.0.1", "PORT": 0, "PEERS": ["127.0.0.1:1"], "STARTUP_WAIT": 30}
    )
    try:
        # A peer that never answers: values are not stored during the start-up window.
        proc.cache("set", "k", 1, None)
        assert not proc.stored("k")
        assert proc.request("ready") is False
    finally:
        proc.close()
    (port,) = free_ports(1)
    own = f"127.0.0.1:{port}"
    lonely = MeshProcess({"BIND": "127.0.0.1", "PORT": port, "PORT_RANGE": 1, "PEERS": [own]})
    try:
        # The only peer listed is itself: no window, LocMemCache semantics from the first call.
        lonely.cache("set", "k", 1, None)
        assert lonely.cache("get", "k") == 1
    finally:
        lonely.close()


def test_queue_overflow_clears_the_cache_on_peers_instead_of_dropping() -> None:
    with cluster(2, QUEUE_SIZE=16) as mesh:
        mesh.wait_connected()
        writer, receiver = mesh.procs
        receiver.cache("set", "unrelated", 1, None, alias="bulk")
        receiver.cache("set", "untouched", 1, None, alias="other")
        # Far more deletes than the queue holds, while a send is under way.
        writer.request("flood", prefix="f", count=200, alias="bulk", while_sending=True)
        assert writer.stats()["queue_overflows"] > 0
        # The overflow became a clear of that cache: even keys never deleted are gone...
        wait_for(lambda: not receiver.stored("unrelated", "bulk"), 10, message="the clear")
        # ...and only of that cache.
        assert receiver.stored("untouched", "other")


def test_clean_exit_says_goodbye_and_does_not_hang() -> None:
    # Heartbeats far apart: only the goodbye frame can make the peer notice quickly.
    with cluster(2, HEARTBEAT=5.0) as mesh:
        mesh.wait_connected()
        leaving = mesh.procs[1]
        assert leaving.proc.stdin is not None
        leaving.proc.stdin.close()  # its loop ends; the interpreter exits through atexit
        assert leaving.proc.wait(10) == 0
        wait_for(
            lambda: not any(p["connected"] for p in mesh.procs[0].stats()["peers"]),
            3,
            message="the goodbye to be seen (well before the 15 s liveness timeout)",
        )


def test_each_pair_keeps_one_pipe_so_frames_arrive_once(trio: Cluster) -> None:
    # Both sides dial each other; once both pipes are up, one side hangs up its own.
    barrier(trio)
    writer, *readers = trio.procs
    before = [proc.stats()["duplicates"] for proc in trio.procs]
    for index in range(20):
        writer.cache("delete", f"once-{index}")
    barrier(trio)
    assert [proc.stats()["duplicates"] for proc in trio.procs] == before
    for proc in readers:
        assert proc.stats()["gaps_detected"] == 0
