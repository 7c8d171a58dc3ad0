"""Faults: crashes, frozen peers, partitions, stalled receivers, garbage. Real processes, loopback.

Each test states the bound it checks, from docs/consistency.md: with HEARTBEAT 0.2 s a lost
peer is detected within 3 heartbeats (0.6 s) plus one idle tick (250 ms).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from harness import free_ports, wait_for
from harness.junk import flood, rss_of
from tests.cluster import MeshProcess, cluster
from tests.proxy import Proxy

pytestmark = pytest.mark.mesh

HEARTBEAT = 0.2
# Detection (3 heartbeats) plus a tick, plus generous slack for a loaded 2-core machine.
DETECTION_BOUND = 3 * HEARTBEAT + 0.25 + 2.0


def test_a_crash_mid_stream_leaves_nothing_stale() -> None:
    with cluster(3, HEARTBEAT=HEARTBEAT) as mesh:
        mesh.wait_connected()
        writer, *receivers = mesh.procs
        for proc in receivers:
            proc.request("fill_local", prefix="f", count=20_000, alias="bulk")
        # Start a flood and kill the writer while it runs: which deletes left is unknown.
        writer.send({"call": "flood", "prefix": "f", "count": 200000, "alias": "bulk"})
        wait_for(lambda: all(p.stats()["keys_received"] > 0 for p in receivers), 10, message="flow")
        writer.kill(signal.SIGKILL)
        # Whatever was in flight: each receiver notices the loss and flushes.
        for proc in receivers:
            wait_for(
                lambda p=proc: p.request("count", alias="bulk") == 0,
                DETECTION_BOUND,
                message="the receiver to flush after the writer's crash",
            )
            assert proc.stats()["peers_lost"] >= 1


def test_a_frozen_peer_neither_blocks_writers_nor_serves_stale_values() -> None:
    with cluster(3, HEARTBEAT=HEARTBEAT) as mesh:
        mesh.wait_connected()
        writer, healthy, frozen = mesh.procs
        for proc in mesh.procs:
            proc.cache("set", "price", 10, None)
        for proc in (healthy, frozen):
            proc.request("fill_local", prefix="f", count=20_000, alias="bulk")
        frozen.kill(signal.SIGSTOP)
        try:
            # The frozen peer reads nothing: the writer must not wait for it.
            assert writer.request("flood", prefix="f", count=20_000, alias="bulk") == 20_000
            writer.cache("set", "price", 11, None)
            wait_for(lambda: healthy.request("count", alias="bulk") == 0, 10, message="healthy")
            wait_for(lambda: not healthy.stored("price"), 5, message="price on the healthy peer")
            wait_for(
                lambda: (
                    not any(
                        p["connected"]
                        for p in writer.stats()["peers"]
                        if p["id"] and p["address"] == frozen.address
                    )
                ),
                DETECTION_BOUND,
                message="the frozen peer to be seen as lost",
            )
        finally:
            frozen.kill(signal.SIGCONT)
        # Thawed, it must not keep serving the price it held before the write.
        wait_for(
            lambda: not frozen.stored("price") and frozen.request("count", alias="bulk") == 0,
            DETECTION_BOUND,
            message="the thawed peer to drop what it missed",
        )
        mesh.wait_connected()
        frozen.cache("set", "after", 1, None)
        writer.cache("set", "after", 2, None)
        wait_for(lambda: not frozen.stored("after"), 5, message="the thawed peer to rejoin")


@pytest.fixture
def partitioned_pair() -> Iterator[tuple[MeshProcess, MeshProcess, list[Proxy]]]:
    """Two nodes that only reach each other through proxies the test can cut."""
    port_a, port_b = free_ports(2)
    to_a, to_b = Proxy(("127.0.0.1", port_a)), Proxy(("127.0.0.1", port_b))
    common = {"BIND": "127.0.0.1", "PORT_RANGE": 1, "HEARTBEAT": HEARTBEAT}
    procs: list[MeshProcess] = []
    try:
        procs.append(MeshProcess({**common, "PORT": port_a, "PEERS": [to_b.address]}))
        procs.append(MeshProcess({**common, "PORT": port_b, "PEERS": [to_a.address]}))
        for proc in procs:
            proc.request("start")
        yield procs[0], procs[1], [to_a, to_b]
    finally:
        for proc in procs:
            proc.close()
        to_a.close()
        to_b.close()


def connected(proc: MeshProcess) -> int:
    return sum(peer["connected"] for peer in proc.stats()["peers"])


def test_a_partition_bounds_staleness_and_heals(
    partitioned_pair: tuple[MeshProcess, MeshProcess, list[Proxy]],
) -> None:
    a, b, proxies = partitioned_pair
    wait_for(lambda: connected(a) and connected(b) and a.request("ready"), 10, message="link")
    for proc in (a, b):
        proc.cache("set", "k", "old", None)
    for proxy in proxies:
        proxy.cut()
    a.cache("set", "k", "new", None)  # B cannot hear this
    # B sees A gone within the detection bound and drops what it may have missed...
    wait_for(lambda: b.stats()["peers_lost"] >= 1, DETECTION_BOUND, message="B to see A lost")
    assert not b.stored("k")
    # ...and what it caches while cut off lives at most DEGRADED_TIMEOUT (5 s by default).
    b.cache("set", "during", "b-side", 3600)
    assert 0 < b.request("ttl", key="during") <= 5.0
    a.cache("set", "during", "a-side", 3600)
    for proxy in proxies:
        proxy.heal()
    wait_for(lambda: connected(a) and connected(b), 10, message="the link to come back")
    # Neither side keeps a value written while it could not hear the other.
    wait_for(
        lambda: not a.stored("during") and not b.stored("during"),
        DETECTION_BOUND,
        message="the values of the partition to be flushed after it heals",
    )
    assert a.stats()["gaps_detected"] + a.stats()["peers_lost"] >= 1
    # Healed: invalidations cross again, and entries are no longer capped.
    wait_for(lambda: not b.stats()["degraded"], 5, message="the cap to lift")
    b.cache("set", "after", 1, 3600)
    assert b.request("ttl", key="after") > 5.0
    a.cache("set", "after", 2, None)
    wait_for(lambda: not b.stored("after"), 5, message="invalidation after healing")


def test_garbage_from_the_network_is_dropped_and_the_node_stays_healthy() -> None:
    import pynng

    with cluster(2, HEARTBEAT=HEARTBEAT) as mesh:
        mesh.wait_connected()
        victim, other = mesh.procs
        victim.cache("set", "precious", 1, None)
        host, port = victim.address.rsplit(":", 1)  # type: ignore[union-attr]
        # Not even nng: raw bytes on fresh TCP connections, many times over.
        for _ in range(200):
            with socket.create_connection((host, int(port)), timeout=2) as sock:
                sock.sendall(os.urandom(4096))
        # nng, but frames of random bytes as fast as one socket can send them.
        with pynng.Bus0(dial=f"tcp://{victim.address}", send_buffer_size=1024) as noise:
            wait_for(
                lambda: victim.stats()["frames_rejected"] > 0 or noise.send(os.urandom(64)),
                10,
                message="the first garbage frame to arrive",
            )
            for _ in range(20_000):
                noise.send(os.urandom(int.from_bytes(os.urandom(1), "big") + 1))
        # Counted, and the connections that sent them hung up on: the first frame of a new
        # connection that fails verification ends it (the rest of the 20,000 never get queued).
        wait_for(
            lambda: victim.stats()["frames_rejected"] >= 1 and victim.stats()["pipes_dropped"] >= 1,
            10,
            message="rejections",
        )
        # Intact and still serving, still in the mesh.
        assert victim.stored("precious")
        assert victim.cache("get", "precious") == 1
        victim.cache("set", "k", "old", None)
        other.cache("set", "k", "new", None)
        wait_for(lambda: not victim.stored("k"), 5, message="real invalidations still apply")


# The junk flood: how long it lasts, and what it may make the node hold at most (issue 14).
FLOOD_SECONDS = 4.0
RSS_BOUND = 64 * 2**20


class PeakRSS:
    """Samples a process's VmRSS every 10 ms on a thread of its own; stops ``on_excess`` (the
    flood) if it grows past ``give_up``, so a node without the bound cannot eat the machine."""

    def __init__(self, pid: int, give_up: int, on_excess: threading.Event) -> None:
        self.pid, self.give_up, self.on_excess = pid, give_up, on_excess
        self.before = self.peak = rss_of(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_of(self.pid))
            if self.peak - self.before > self.give_up:
                self.on_excess.set()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak - self.before


def test_a_junk_flood_is_bounded_in_memory_and_the_node_keeps_hearing_its_peer() -> None:
    """Strangers spraying junk (1 MiB frames, frames just under the receive limit, raw TCP
    clients that never read) must not make a node hold more than 64 MB more, nor cut it off
    from its real peer: invalidations cross both ways during the flood and after it."""
    with cluster(2, HEARTBEAT=HEARTBEAT) as mesh:
        mesh.wait_connected()
        victim, other = mesh.procs

        def exchange(key: str, within: float = 5.0) -> bool:
            """One invalidation each way; whether both arrived within ``within`` seconds."""
            for here, there in ((victim, other), (other, victim)):
                here.cache("set", key, "old", None)
                there.cache("set", key, "new", None)
                deadline = time.monotonic() + within
                while here.stored(key):
                    if time.monotonic() > deadline:
                        return False
                    time.sleep(0.01)
            return True

        for i in range(20):  # what normal traffic allocates, before the baseline
            assert exchange(f"warm-{i}")
        assert victim.address is not None
        too_much = threading.Event()
        with flood(victim.address, seconds=FLOOD_SECONDS + 10) as junk:
            rss = PeakRSS(victim.pid, give_up=8 * RSS_BOUND, on_excess=too_much)
            deadline = time.monotonic() + FLOOD_SECONDS
            arrived: list[bool] = []
            try:
                while time.monotonic() < deadline and not too_much.is_set():
                    arrived.append(exchange(f"during-{len(arrived)}"))
            finally:
                grown = rss.stop()
        assert grown < RSS_BOUND, f"RSS grew by {grown / 2**20:.0f} MB under the flood"
        assert len(arrived) >= 3
        assert all(arrived), arrived
        assert sum(junk.sent) > 1000
        # The node hung up on them, and they came back.
        assert sum(junk.connections) > len(junk.kinds)
        stats = victim.stats()
        assert stats["frames_rejected"] > 0
        # The connections that sent junk were hung up on, not read to the end.
        assert stats["pipes_dropped"] >= 1, stats
        assert exchange("after")
        assert all(peer["connected"] for peer in victim.stats()["peers"])


def test_a_link_kept_by_one_side_is_dialled_again_by_the_other(
    partitioned_pair: tuple[MeshProcess, MeshProcess, list[Proxy]],
) -> None:
    a, b, (to_a, to_b) = partitioned_pair
    wait_for(lambda: connected(a) and connected(b), 10, message="link")
    # Both dial; once both pipes are up, the side with the smaller id hangs up its own, so
    # the link runs through the larger side's dialer: through the proxy in front of the smaller.
    smaller, larger = sorted((a, b), key=lambda proc: bytes.fromhex(proc.stats()["node_id"]))
    to_smaller, to_larger = (to_a, to_b) if smaller is a else (to_b, to_a)
    wait_for(
        lambda: (to_smaller.connections(), to_larger.connections()) == (1, 0),
        5,
        message="one pipe left, the larger side's",
    )
    to_smaller.cut()  # and it stays cut: only the smaller side's own dial can bring it back
    wait_for(lambda: to_larger.connections() == 1, 5, message="the smaller side to dial again")
    wait_for(
        lambda: connected(a) and connected(b) and not smaller.stats()["degraded"],
        DETECTION_BOUND + 5,
        message="the link to be back",
    )
    smaller.cache("set", "k", "old", None)
    larger.cache("set", "k", "new", None)
    wait_for(lambda: not smaller.stored("k"), 5, message="an invalidation over the new link")
