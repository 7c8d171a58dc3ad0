"""Processes as real fleets have them: short-lived writers and joining workers.

A management command, a cron job or ``manage.py shell -c`` writes once and exits at once; a new
worker writes on its first request, before it is connected to anyone. Their invalidations must
reach the peers (frames wait for the first connections, and exit waits, bounded, for the peers
to acknowledge the goodbye that follows them), and their arrival must not make any peer flush
its whole cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import free_ports, stays, wait_for
from tests.cluster import MeshProcess, cluster, manage, run_sql

pytestmark = pytest.mark.mesh

TIMING = {"HEARTBEAT": 0.2, "DISCOVERY_INTERVAL": 0.3, "STALE_AFTER": 5.0}


def holds(proc: MeshProcess, *keys: str) -> None:
    for key in keys:
        proc.cache("set", key, "old", None)
        assert proc.stored(key)


def shell(code: str, env: dict[str, str]) -> None:
    """``manage.py shell -c CODE``: a process that writes and exits at once."""
    result = manage("shell", "-c", code, env=env)
    assert result.returncode == 0, result.stderr


def static_writer_env(peer: str) -> dict[str, str]:
    (port,) = free_ports(1)
    return {
        "WARPMESH_PEERS": peer,
        "WARPMESH_BIND": "127.0.0.1",
        "WARPMESH_PORT": str(port),
        "WARPMESH_PORT_RANGE": "1",
        "WARPMESH_HEARTBEAT": str(TIMING["HEARTBEAT"]),
    }


def evicted_without_a_flush(proc: MeshProcess, key: str, kept: str) -> None:
    wait_for(lambda: not proc.stored(key), 5, message=f"{key!r} to be evicted")
    assert proc.stored(kept), "the writer's arrival flushed the whole cache"
    assert proc.stats()["flushes"] == 0


# Long enough for a peer to be declared lost (3 heartbeats), and the tick that notices.
LIVENESS_WINDOW = 3 * TIMING["HEARTBEAT"] + 0.25 + 0.3


def never_flushes(*procs: MeshProcess) -> None:
    """Nothing the writer did, nor its leaving, makes these flush, even once it is gone."""
    stays(
        lambda: all(p.stats()["flushes"] == 0 == p.stats()["peers_lost"] for p in procs),
        LIVENESS_WINDOW,
        message="no flush and no peer lost",
    )


def test_a_short_lived_writer_delivers_its_delete_static_peers() -> None:
    with cluster(1, **TIMING) as mesh:
        (peer,) = mesh.procs
        holds(peer, "k", "other")
        shell(
            "from django.core.cache import cache; cache.delete('k')",
            static_writer_env(peer.address or ""),
        )
        evicted_without_a_flush(peer, "k", "other")
        never_flushes(peer)


@pytest.mark.database
def test_a_short_lived_writer_delivers_its_delete_discovery(shared_db: dict[str, str]) -> None:
    run_sql(shared_db, "DELETE FROM django_warpmesh_peer")
    with cluster(1, discovery=True, env=shared_db, **TIMING) as mesh:
        (peer,) = mesh.procs
        wait_for(lambda: peer.request("discovery_syncs") >= 1, 5, message="registered")
        holds(peer, "k", "other")
        env = {**shared_db, "WARPMESH_BIND": "127.0.0.1", "WARPMESH_PORT": "0"}
        shell("from django.core.cache import cache; cache.delete('k')", env)
        evicted_without_a_flush(peer, "k", "other")
        never_flushes(peer)
        # It deleted its row on the way out.
        wait_for(
            lambda: {row["address"] for row in peer.request("peer_rows")} == {peer.address},
            5,
            message="only the long-lived peer's row left",
        )


@pytest.mark.database
def test_a_management_command_saving_a_model_evicts_the_peers_copies(
    shared_db: dict[str, str],
) -> None:
    run_sql(shared_db, "DELETE FROM django_warpmesh_peer")
    with cluster(1, discovery=True, env=shared_db, **TIMING) as mesh:
        (peer,) = mesh.procs
        wait_for(lambda: peer.request("discovery_syncs") >= 1, 5, message="registered")
        pk = peer.request("create_product", name="kept", price=1)
        peer.request("set_tagged", key="row", value="price 1", product=pk)
        holds(peer, "other")
        env = {**shared_db, "WARPMESH_BIND": "127.0.0.1", "WARPMESH_PORT": "0"}
        shell(
            "from tests.testapp.models import Product; "
            f"p = Product.objects.get(pk={pk}); p.price = 2; p.save()",
            env,
        )
        evicted_without_a_flush(peer, "row", "other")
        never_flushes(peer)


def test_a_joining_worker_that_writes_at_once_flushes_nobody() -> None:
    with cluster(2, **TIMING) as mesh:
        mesh.wait_connected()
        for proc in mesh.procs:
            holds(proc, "k", "other")
        # Its first write happens before it is connected to anyone (as a worker's first
        # request, right after it was spawned).
        joining = mesh.add()
        joining.cache("delete", "k")
        for proc in mesh.procs[:2]:
            evicted_without_a_flush(proc, "k", "other")
        mesh.wait_connected()
        joining.close()  # and it leaves again, as a worker replaced at once
        never_flushes(*mesh.procs[:2])


def test_a_short_lived_writer_whose_listed_peer_is_down_still_delivers() -> None:
    with cluster(1, **TIMING) as mesh:
        (peer,) = mesh.procs
        holds(peer, "k", "other")
        (closed,) = free_ports(1)
        env = static_writer_env(f"{peer.address},127.0.0.1:{closed}")
        shell("from django.core.cache import cache; cache.delete('k')", env)
        evicted_without_a_flush(peer, "k", "other")
        never_flushes(peer)


def test_a_node_that_cannot_listen_still_delivers_and_receives() -> None:
    with cluster(2, **TIMING) as mesh:
        mesh.wait_connected()
        # Its only port is taken (by the first peer): it can dial, not be dialled.
        config = {**mesh.config(0), "PEERS": list(mesh.addresses)}
        dialling = MeshProcess(config)
        try:
            assert dialling.request("start")["address"] == ""
            stats = dialling.stats()
            assert "Address in use" in stats["listen_error"], stats["listen_error"]
            wait_for(lambda: dialling.request("ready"), 5, message="its peers to answer")
            for proc in mesh.procs:
                holds(proc, "from-dialling", "other")
            dialling.cache("delete", "from-dialling")
            for proc in mesh.procs:
                evicted_without_a_flush(proc, "from-dialling", "other")
            holds(dialling, "to-dialling")
            mesh.procs[1].cache("delete", "to-dialling")
            wait_for(lambda: not dialling.stored("to-dialling"), 5, message="a peer's delete")
        finally:
            dialling.close()


@pytest.mark.database
@pytest.mark.django_db(transaction=True)
def test_a_failed_start_leaves_the_callers_transaction_alone(tmp_path: Path) -> None:
    from django.core.cache import caches
    from django.db import connection, transaction
    from django.test import override_settings

    from django_warpmesh import node as mesh_node
    from tests.testapp.models import Category

    # Files that pass the settings' checks but that TLS cannot use: the node fails to start.
    garbage = "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"
    (tmp_path / "cert.pem").write_text(garbage)
    (tmp_path / "ca.pem").write_text(garbage)
    (tmp_path / "key.pem").write_text(
        "-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n"
    )
    tls = {name.upper(): str(tmp_path / f"{name}.pem") for name in ("cert", "key", "ca")}
    with override_settings(WARPMESH={"ENABLED": True, "PEERS": [], "TLS": tls}):
        mesh_node.stop_node()
        try:
            with transaction.atomic():
                Category.objects.create(name="before")
                caches["default"].set("k", 1)  # the first write starts the node: it fails
                assert "could not start" in mesh_node.get_node().snapshot()["reason"]
                Category.objects.create(name="after")
            assert not connection.needs_rollback
            assert set(Category.objects.values_list("name", flat=True)) == {"before", "after"}
        finally:
            mesh_node.stop_node()


def test_a_child_forked_after_the_socket_opened_is_relayed_by_its_parent() -> None:
    # A slower heartbeat: on a loaded host a peer taken for lost would flush what is checked.
    with cluster(2, **{**TIMING, "HEARTBEAT": 1.0}) as mesh:
        mesh.wait_connected()
        parent, peer = mesh.procs
        holds(parent, "in-the-parent")
        child_pid = parent.request("fork")["child"]
        child = parent  # from now on, the child answers on the same pipes
        holds(child, "in-the-child")  # its first write starts its node
        stats = child.stats()
        assert (stats["relayed_by"], stats["enabled"], stats["ready"]) == (parent.pid, True, True)
        assert not child.stored("in-the-parent")  # kept coherent for the parent, not for it
        # Its writes reach the peers (through the parent), without a flush.
        holds(peer, "from-child", "other")
        child.cache("delete", "from-child")
        evicted_without_a_flush(peer, "from-child", "other")
        # The peers' writes reach it.
        holds(child, "to-child")
        peer.cache("delete", "to-child")
        wait_for(lambda: not child.stored("to-child"), 5, message="a peer's delete")
        # mesh_status names the processes a node relays for.
        status = manage("mesh_status", env={"WARPMESH_PEERS": ",".join(mesh.addresses)})
        assert f"relays for forked process(es) {child_pid}" in status.stdout, status.stdout
        child.request("exit")
        assert child.receive() == {"ok": {"child_status": 0}}  # the parent answers again
        wait_for(lambda: not parent.stats()["relayed_pids"], 5, message="the child forgotten")


@pytest.mark.database
def test_migrate_does_not_join_the_mesh(empty_db: dict[str, str]) -> None:
    # Creating and altering watched tables are writes the ORM hooks see.
    result = manage("migrate", env=empty_db)
    assert result.returncode == 0, result.stderr
    assert "mesh: enabled" not in result.stderr
