"""A mesh's idle cost does not grow with its size (real processes on loopback).

A mesh of 64 processes is a benchmark (`benchmarks/run --only 4`); here a few processes are made
to behave as a large mesh does by lowering HEARTBEAT_FANIN (the heartbeats a node hears per
HEARTBEAT interval), so the same rules show in seconds.
"""

from __future__ import annotations

import signal
import time

import pytest

from harness import wait_for
from tests.cluster import cluster

pytestmark = pytest.mark.mesh


def test_idle_heartbeats_per_process_do_not_grow_with_the_mesh() -> None:
    # 9 processes, each hearing 2 heartbeats per HEARTBEAT (0.2 s) instead of 8: a period of
    # 0.2 x 8 / 2 = 0.8 s each.
    with cluster(9, env={"WARPMESH_TEST_HEARTBEAT_FANIN": "2"}, HEARTBEAT=0.2) as mesh:
        mesh.wait_connected(timeout=30)
        wait_for(
            lambda: all(
                proc.stats()["heartbeat_period"] == pytest.approx(0.8) for proc in mesh.procs
            ),
            10,
            message="every process to promise the period of a 9-process mesh",
        )
        before = [proc.stats()["frames_received"] for proc in mesh.procs]
        started = time.monotonic()
        # A window of about 20 of the periods of one peer, as long as the host takes for them.
        wait_for(
            lambda: mesh.procs[0].stats()["frames_received"] - before[0] >= 8 * 20,
            30,
            message="process 0 to hear 160 heartbeats",
        )
        elapsed = time.monotonic() - started
        rates = [
            (proc.stats()["frames_received"] - was) / elapsed
            for proc, was in zip(mesh.procs, before, strict=True)
        ]
        # 8 peers / 0.8 s = 10 frames a second each; 8 / 0.2 s = 40 if every peer sent every
        # HEARTBEAT. Nothing was lost or flushed meanwhile.
        assert max(rates) < 16, rates
        for proc in mesh.procs:
            stats = proc.stats()
            assert stats["peers_lost"] == 0
            assert stats["flushes"] == 0
            assert all(peer["connected"] for peer in stats["peers"])


def test_a_killed_peer_is_found_by_its_closed_connections_long_before_its_period() -> None:
    # Periods of 1 s x 2 peers / 0.25 = 8 s: silence alone would take 24 s to count.
    with cluster(3, env={"WARPMESH_TEST_HEARTBEAT_FANIN": "0.25"}, HEARTBEAT=1.0) as mesh:
        mesh.wait_connected(timeout=30)
        a, b, c = mesh.procs
        wait_for(lambda: a.stats()["heartbeat_period"] == pytest.approx(8.0), 10)
        b.cache("set", "held", "old")
        c.kill(signal.SIGKILL)
        # Lost within LIVENESS_HEARTBEATS x HEARTBEAT (3 s) of the connections closing; the
        # bound below is well under the 24 s of the promised period.
        wait_for(lambda: a.stats()["peers_lost"] == 1, 12, message="A to count C lost")
        wait_for(lambda: b.stats()["peers_lost"] == 1, 12, message="B to count C lost")
        assert not b.stored("held")  # C's last writes may have been lost with it: flushed
        assert a.stats()["peers_lost"] == 1  # and A, B stay connected to each other
        assert sum(peer["connected"] for peer in a.stats()["peers"]) == 1


def test_a_frozen_peer_is_lost_after_the_periods_it_promised() -> None:
    """A peer that stops without closing its connections (SIGSTOP, a VM pause, a partition)
    is found only by its silence: LIVENESS_HEARTBEATS of its promised periods."""
    with cluster(3, env={"WARPMESH_TEST_HEARTBEAT_FANIN": "1"}, HEARTBEAT=0.5) as mesh:
        mesh.wait_connected(timeout=30)
        a, _, c = mesh.procs
        wait_for(lambda: a.stats()["heartbeat_period"] == pytest.approx(1.0), 10)
        c.kill(signal.SIGSTOP)
        try:
            wait_for(lambda: a.stats()["peers_lost"] == 1, 15, message="A to count C lost")
            rows = {row["address"]: row for row in a.stats()["peers"]}
            assert rows[c.address]["heartbeat_period"] == pytest.approx(1.0)
        finally:
            c.kill(signal.SIGCONT)
