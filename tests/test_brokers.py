"""The mesh through a broker (``WARPMESH['TRANSPORT']``): NATS, PostgreSQL LISTEN/NOTIFY.

Real processes, each with its own node, talking only through a real server: a private
nats-server, a private PostgreSQL server (both started here on free loopback ports, so that
they can be killed and started again), or the shared PostgreSQL database the processes also use
as their Django database.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from django_warpmesh.conf import parse
from django_warpmesh.node import NullNode
from django_warpmesh.node.transports import TransportError
from django_warpmesh.node_factory import build_broker, build_node
from harness import wait_for
from tests.cluster import Cluster, cluster
from tests.natsserver import running_server
from tests.pgserver import private_postgres
from tests.server_available import require

pytestmark = pytest.mark.mesh

KEYS = [f"k{i}" for i in range(12)]


def shared_postgresql() -> dict[str, str]:
    """The environment that makes a test process use the shared PostgreSQL as its database."""
    require("postgresql")
    return {"WARPMESH_TEST_DB": "postgresql"}


def connected(mesh: Cluster) -> None:
    """Every process's broker link up, and every other process heard through it."""

    def linked() -> bool:
        for proc in mesh.procs:
            stats = proc.stats()
            assert stats["enabled"], stats["reason"]
            if not (stats["transport"]["connected"] and stats["ready"]):
                return False
            if sum(peer["connected"] for peer in stats["peers"]) < len(mesh.procs) - 1:
                return False
        return True

    wait_for(linked, 30, interval=0.05, message="every process linked through the broker")


def coherent(mesh: Cluster) -> None:
    a, b, c = mesh.procs
    heard = a.stats()["invalidations_received"]
    for proc in (b, c):
        proc.cache("set", "page", "old")
    # Their writes reach A first (arriving after A's own, they would evict it: a miss).
    wait_for(lambda: a.stats()["invalidations_received"] == heard + 2, message="B's, C's sets")
    a.cache("set", "page", "new")
    wait_for(lambda: not b.stored("page") and not c.stored("page"), message="copies evicted")
    assert a.cache("get", "page") == "new"
    for proc in (a, c):
        proc.cache("set", "gone", 1)
    b.cache("delete", "gone")
    wait_for(lambda: not a.stored("gone") and not c.stored("gone"), message="deletes applied")
    c.cache("set", "kept", "same")
    b.cache("set", "kept", "same")  # the same value: peers keep their copy
    a.cache("set", "x", 1)
    a.cache("clear")
    wait_for(lambda: not b.stored("kept") and not c.stored("kept"), message="clear applied")
    for proc in mesh.procs:
        stats = proc.stats()
        assert stats["flushes"] == 0, stats
        assert stats["gaps_detected"] == 0, stats
        assert stats["frames_rejected"] == 0, stats


def test_three_processes_stay_coherent_through_nats(tmp_path: Path) -> None:
    with running_server(tmp_path) as server, cluster(3, TRANSPORT=server.url) as mesh:
        connected(mesh)
        coherent(mesh)
        transport = mesh.procs[0].stats()["transport"]
        assert transport["name"] == "nats"
        assert transport["url"] == server.url


@pytest.mark.broker
def test_three_processes_stay_coherent_through_their_postgresql_database() -> None:
    env = shared_postgresql()
    with cluster(3, env=env, TRANSPORT="postgresql") as mesh:
        connected(mesh)
        coherent(mesh)
        transport = mesh.procs[0].stats()["transport"]
        assert transport["name"] == "postgresql"
        assert transport["url"].startswith("postgresql://postgres@127.0.0.1:")


def outage(mesh: Cluster, stop: Callable[[], None], start: Callable[[], None]) -> None:
    """A write stream on A; the broker goes away and comes back in the middle of it. Nothing
    cached before the outage survives its detection, nothing cached during it survives the
    reconnection, and afterwards every copy is the writer's latest value or nothing."""
    a, b, c = mesh.procs
    readers = (b, c)
    for proc in readers:
        for key in KEYS:
            proc.cache("set", key, "before")
    latest: dict[str, str] = {}
    writing = threading.Event()
    writing.set()
    errors: list[BaseException] = []

    def stream() -> None:
        # The writer's own process: requests to it are serialised by its pipe.
        try:
            round_ = 0
            while writing.is_set():
                for key in KEYS:
                    value = f"v{round_}"
                    a.cache("set", key, value)
                    latest[key] = value
                round_ += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    writer = threading.Thread(target=stream)
    writer.start()
    try:
        wait_for(lambda: len(latest) == len(KEYS), message="the stream under way")
        stop()
        for proc in readers:
            wait_for(
                lambda proc=proc: not proc.stats()["transport"]["connected"],
                15,
                message="the broker link seen lost",
            )
            stats = proc.stats()
            assert stats["transport_losses"] == 1
            assert stats["degraded"]
            # What it held from before the outage may go stale unseen: flushed.
            assert not any(proc.stored(key) for key in KEYS if latest.get(key) != "before")
            # Filled during the outage (from what the writer wrote so far): capped, and
            # dropped at the reconnection.
            for key in KEYS[:4]:
                proc.cache("set", key, "during")
        start()
        connected(mesh)
        for proc in readers:
            assert not any(proc.stored(key) for key in KEYS[:4]), "a fill from the outage survived"
    finally:
        writing.clear()
        writer.join(60)
    assert not errors, errors
    # The stream went on across the outage; once its last frames are in, every copy anywhere
    # is the writer's last value, or nothing.
    for proc in readers:
        for key in KEYS:
            proc.cache("set", key, latest[key])  # a fill with the current value is kept...
    a.cache("set", KEYS[0], "final")  # ...until the writer's next write, which evicts it
    wait_for(lambda: not any(proc.stored(KEYS[0]) for proc in readers), message="the final write")
    for proc in mesh.procs:
        stats = proc.stats()
        assert not stats["degraded"], stats
        assert stats["transport"]["connected"]


def test_a_nats_outage_during_a_write_stream_leaves_nothing_stale(tmp_path: Path) -> None:
    with (
        running_server(tmp_path) as server,
        cluster(3, TRANSPORT=server.url) as mesh,
    ):
        connected(mesh)
        outage(mesh, server.kill, server.start)


@pytest.mark.broker
def test_a_postgresql_restart_during_a_write_stream_leaves_nothing_stale() -> None:
    with private_postgres() as server:
        server.start()
        url = f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
        with cluster(3, TRANSPORT=url) as mesh:
            connected(mesh)
            outage(mesh, lambda: server.stop("immediate"), server.start)


# -- a transport that cannot be used -------------------------------------------------------------


@override_settings(WARPMESH={"TRANSPORT": "postgresql"})
def test_the_postgresql_transport_on_a_database_that_is_not_postgresql_is_refused() -> None:
    with pytest.raises(TransportError, match="is sqlite; name a postgresql:// URL instead"):
        build_broker(parse({"TRANSPORT": "postgresql"}), b"k" * 32)


def test_a_postgresql_transport_refuses_frames_it_cannot_carry() -> None:
    with pytest.raises(ImproperlyConfigured, match="MAX_FRAME_BYTES"):
        parse({"TRANSPORT": "postgresql", "MAX_FRAME_BYTES": 8192})


def test_a_node_whose_transport_cannot_be_built_caches_alone_and_capped() -> None:
    from django_warpmesh.node import process

    with override_settings(WARPMESH={"TRANSPORT": "postgresql"}):
        node = process._make_node(build_node)
    assert isinstance(node, NullNode)
    assert "sqlite" in node.reason
    assert node.max_timeout is not None
