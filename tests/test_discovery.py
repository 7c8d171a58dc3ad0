"""Discovery through the peer table: real processes, a real shared database (SQLite or PostgreSQL).

Runs in both passes of ``scripts/test``: on SQLite (a file every process opens) and, with
``WARPMESH_TEST_DB=postgresql``, on a PostgreSQL database created for this module.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness import ROOT, free_ports, wait_for
from tests.cluster import Cluster, MeshProcess, cluster, manage, run_sql

pytestmark = [pytest.mark.mesh, pytest.mark.database]

# Short enough for a test, long enough that a live peer always refreshes in time.
TIMING = {"HEARTBEAT": 0.2, "DISCOVERY_INTERVAL": 0.3, "STALE_AFTER": 2.0}
TIMING_DEGRADED_TIMEOUT = 5.0  # the default


@pytest.fixture
def db_env(shared_db: dict[str, str]) -> dict[str, str]:
    run_sql(shared_db, "DELETE FROM django_warpmesh_peer")
    return shared_db


def row_addresses(proc: MeshProcess, using: str = "default") -> set[str]:
    return {row["address"] for row in proc.request("peer_rows", using=using)}


def connected(proc: MeshProcess) -> set[str]:
    return {peer["address"] for peer in proc.stats()["peers"] if peer["connected"]}


def evicts_across(mesh: Cluster, writer: MeshProcess, key: str) -> None:
    live = [proc for proc in mesh.procs if proc.proc.poll() is None]
    for proc in live:
        proc.cache("set", key, "old", None)
    writer.cache("set", key, "new", None)
    wait_for(
        lambda: not any(proc.stored(key) for proc in live if proc is not writer),
        5,
        message=f"{key!r} to be evicted from the writer's peers",
    )


def test_three_processes_find_each_other_through_the_table(db_env: dict[str, str]) -> None:
    with cluster(3, discovery=True, env=db_env, **TIMING) as mesh:
        mesh.wait_connected()
        assert row_addresses(mesh.procs[0]) == set(mesh.addresses)
        for proc in mesh.procs:
            assert proc.stats()["discovery"].startswith("database discovery")
            assert connected(proc) == set(mesh.addresses) - {proc.address}
        rows = mesh.procs[0].request("peer_rows")
        assert {row["pid"] for row in rows} == {proc.pid for proc in mesh.procs}
        for writer in mesh.procs:
            evicts_across(mesh, writer, f"from-{writer.pid}")
        # Each row says which caches its node serves, refreshed at every sync.
        wait_for(
            lambda: all(row["caches"] == ["default"] for row in mesh.procs[0].request("peer_rows")),
            5,
            message="the rows to list the caches in use",
        )


def test_sigkilled_peer_leaves_the_peers_and_the_table(db_env: dict[str, str]) -> None:
    with cluster(3, discovery=True, env=db_env, **TIMING) as mesh:
        mesh.wait_connected()
        victim = mesh.procs[2]
        victim.kill(signal.SIGKILL)
        survivors = mesh.procs[:2]
        wait_for(
            lambda: all(
                victim.address not in {p["address"] for p in proc.stats()["peers"]}
                for proc in survivors
            ),
            10,
            message="the killed peer to be dropped from the peer lists",
        )
        wait_for(
            lambda: victim.address not in row_addresses(survivors[0]),
            10,
            message="the killed peer's row to be removed as stale",
        )
        assert row_addresses(survivors[0]) == {proc.address for proc in survivors}
        # Its row gone, no expected peer is missing: entries are no longer capped.
        wait_for(lambda: not survivors[0].stats()["degraded"], 5, message="degraded to lift")
        for proc in survivors:
            proc.cache("set", "after-kill", 1, None)
        survivors[0].cache("delete", "after-kill")
        wait_for(lambda: not survivors[1].stored("after-kill"), 5, message="delete to cross")


def test_restarted_peer_rejoins_with_a_new_epoch(db_env: dict[str, str]) -> None:
    with cluster(3, discovery=True, env=db_env, **TIMING) as mesh:
        mesh.wait_connected()
        before = mesh.procs[1].stats()
        restarted = mesh.restart(1)
        mesh.wait_connected()
        after = restarted.stats()
        assert (after["node_id"], after["epoch"]) != (before["node_id"], before["epoch"])
        evicts_across(mesh, restarted, "from-restarted")
        evicts_across(mesh, mesh.procs[0], "to-restarted")


def test_clean_shutdown_deletes_its_row(db_env: dict[str, str]) -> None:
    with cluster(2, discovery=True, env=db_env, **TIMING) as mesh:
        mesh.wait_connected()
        leaving = mesh.procs[1]
        leaving.close()
        # Deleted on the way out, not left to go stale.
        assert row_addresses(mesh.procs[0]) == {mesh.procs[0].address}


def test_a_new_process_is_connected_to_everyone_at_once(db_env: dict[str, str]) -> None:
    # A discovery interval far longer than the test: only the newcomer's own dialling can
    # connect it to the old nodes in time.
    slow = {**TIMING, "DISCOVERY_INTERVAL": 60.0, "STALE_AFTER": 120.0}
    with cluster(2, discovery=True, env=db_env, **slow) as mesh:
        mesh.wait_connected()
        newcomer = mesh.add()
        mesh.wait_connected(timeout=5)
        for proc in mesh.procs[:2]:
            assert newcomer.address in connected(proc)
        evicts_across(mesh, newcomer, "from-newcomer")


def test_database_outage_keeps_the_cache_and_the_mesh(db_env: dict[str, str]) -> None:
    (refusing_port,) = free_ports(1)
    with cluster(3, discovery=True, env=db_env, **TIMING) as mesh:
        mesh.wait_connected()
        for proc in mesh.procs:
            proc.request("db_break", refusing_port=refusing_port)
        # Failed syncs back off (0.3 s, 0.6 s, 1.2 s, ...): three of them outlast STALE_AFTER,
        # so nobody could refresh a row, yet nobody may drop a peer.
        wait_for(
            lambda: all(proc.request("discovery_failures") >= 3 for proc in mesh.procs),
            15,
            message="several failed syncs",
        )
        for proc in mesh.procs:
            assert connected(proc) == set(mesh.addresses) - {proc.address}
            stats = proc.stats()
            # A peer started during the outage could not be found: entries are capped.
            assert stats["degraded"] is True
            assert "cannot reach the peer table" in stats["discovery_error"]
            proc.cache("set", "capped", 1, None)
            assert proc.request("ttl", key="capped") <= TIMING_DEGRADED_TIMEOUT
        evicts_across(mesh, mesh.procs[2], "during-outage")
        for proc in mesh.procs:
            proc.request("db_fix")
        wait_for(
            lambda: all(proc.request("discovery_failures") == 0 for proc in mesh.procs),
            30,
            message="discovery to recover on its own",
        )
        wait_for(
            lambda: row_addresses(mesh.procs[0]) == set(mesh.addresses),
            10,
            message="every row back",
        )
        newcomer = mesh.add()
        mesh.wait_connected()
        evicts_across(mesh, newcomer, "after-outage")
        for proc in mesh.procs[:3]:
            log = proc.request("logged")
            assert log.count("peer discovery failed: cannot reach the peer table") == 1, log
            assert log.count("capping new entries at DEGRADED_TIMEOUT") == 1, log
            assert log.count("peer discovery works again") == 1, log
            stats = proc.stats()
            assert (stats["discovery_error"], stats["degraded"]) == (None, False)


def test_garbage_rows_are_skipped(db_env: dict[str, str]) -> None:
    with cluster(2, discovery=True, env=db_env, **TIMING) as mesh:
        mesh.wait_connected()
        first, second = mesh.procs
        garbage = [
            ("bad1", "not an address"),
            ("bad2", "127.0.0.1:99999"),
            ("self", first.address),  # first's own address under another id
            ("dup", second.address),  # a second row claiming second's address
        ]
        for node_id, address in garbage:
            run_sql(
                db_env,
                "INSERT INTO django_warpmesh_peer "
                "(node_id, address, host, pid, caches, version, started_at, last_seen) "
                f"VALUES ('{node_id}', '{address}', 'h', 1, '[]', '0', "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
            )
        wait_for(
            lambda: all(
                f"skipping peer row {node_id}" in first.request("logged")
                for node_id in ("bad1", "bad2", "self")
            ),
            10,
            message="the bad rows to be noticed",
        )
        assert connected(first) == {second.address}
        assert not first.stats()["frames_rejected"]
        evicts_across(mesh, second, "despite-garbage")
        syncs = first.request("discovery_syncs")
        wait_for(lambda: first.request("discovery_syncs") >= syncs + 2, 5, message="more syncs")
        logged = first.request("logged")
        assert logged.count("skipping peer row bad1") == 1
        assert logged.count("skipping peer row bad2") == 1
        assert logged.count("skipping peer row self") == 1


def test_missing_table_is_a_check_error_and_not_a_crash(tmp_path: Path) -> None:
    empty = {"WARPMESH_SQLITE_PATH": str(tmp_path / "empty.sqlite3"), "WARPMESH_TEST_DB": "sqlite"}
    check = manage("check", env=empty)
    assert check.returncode == 1
    assert "warpmesh.E002" in check.stderr
    assert "python manage.py migrate django_warpmesh" in check.stderr

    proc = MeshProcess({"BIND": "127.0.0.1", "PORT": 0, **TIMING}, env=empty)
    try:
        proc.request("start")
        wait_for(lambda: "does not exist" in proc.request("logged"), 10, message="warning")
        # Not knowing whether peers exist, it caches once the start-up wait is over.
        wait_for(lambda: proc.request("ready"), 10, message="the start-up wait to end")
        proc.cache("set", "k", 1, None)
        assert proc.cache("get", "k") == 1
        assert proc.stats()["enabled"] is True
    finally:
        proc.close()


def test_peer_table_in_another_database(tmp_path: Path, shared_db: dict[str, str]) -> None:
    mesh_db = {"WARPMESH_MESH_DB_PATH": str(tmp_path / "mesh.sqlite3")}
    subprocess.run(
        [sys.executable, "-m", "django", "migrate", "django_warpmesh", "--database", "mesh", "-v0"],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", **shared_db, **mesh_db},
        check=True,
    )
    run_sql(shared_db, "DELETE FROM django_warpmesh_peer")
    with cluster(
        2, discovery=True, env={**shared_db, **mesh_db}, DATABASE="mesh", **TIMING
    ) as mesh:
        mesh.wait_connected()
        evicts_across(mesh, mesh.procs[0], "via-mesh-db")
        assert not mesh.procs[0].request(
            "peer_rows", using="default"
        )  # the default database stays empty
        assert row_addresses(mesh.procs[0], using="mesh") == set(mesh.addresses)


def test_a_missing_peer_table_opens_no_start_up_window(empty_db: dict[str, str]) -> None:
    # A start-up window and a discovery interval far longer than the test: caching must start
    # because no peer can be registered in a table that does not exist, and discovery must run
    # again because migrate created the table, not because time passed.
    slow = {**TIMING, "STARTUP_WAIT": 60.0, "DISCOVERY_INTERVAL": 60.0, "STALE_AFTER": 120.0}
    with cluster(1, discovery=True, env=empty_db, **slow) as mesh:
        (alone,) = mesh.procs
        wait_for(lambda: alone.request("ready"), 5, message="caching to start")
        alone.cache("set", "k", "v", None)
        assert alone.stored("k")
        stats = alone.stats()
        assert "does not exist" in stats["discovery_error"]
        assert not stats["degraded"]  # once is not "keeps failing"
        alone.request("migrate")
        wait_for(lambda: alone.request("discovery_failures") == 0, 5, message="discovery at once")
        assert row_addresses(alone) == {alone.address}
        assert alone.stats()["discovery_error"] is None


def test_a_row_from_the_future_is_removed_not_dialled(db_env: dict[str, str]) -> None:
    (closed,) = free_ports(1)
    with cluster(2, discovery=True, env=db_env, **TIMING) as mesh:
        mesh.wait_connected()
        first, second = mesh.procs
        run_sql(
            db_env,
            "INSERT INTO django_warpmesh_peer "
            "(node_id, address, host, pid, caches, version, started_at, last_seen) "
            f"VALUES ('future', '127.0.0.1:{closed}', 'h', 1, '[]', '0', "
            "CURRENT_TIMESTAMP, '2099-01-01 00:00:00')",
        )
        wait_for(
            lambda: "future" not in {row["node_id"] for row in first.request("peer_rows")},
            10,
            message="the row from the future to be removed",
        )
        assert "its last_seen is in the future" in first.request("logged") + second.request(
            "logged"
        )
        for proc in mesh.procs:
            stats = proc.stats()
            assert f"127.0.0.1:{closed}" not in {peer["address"] for peer in stats["peers"]}
            assert not stats["degraded"]


@pytest.mark.django_db
def test_the_rows_read_are_capped_and_checked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from django.utils import timezone

    from django_warpmesh import discovery
    from django_warpmesh.conf import parse
    from django_warpmesh.models import PeerRow

    now = timezone.now()
    newest = now + datetime.timedelta(seconds=1)  # read first
    rows = [("0.0.0.0:7934", "any"), ("224.0.0.1:7934", "multicast"), ("10.0.0.1:0", "port0")]
    for address, node_id in rows:
        PeerRow.objects.create(
            node_id=node_id, address=address, host="h", pid=1, version="0",
            started_at=now, last_seen=newest,
        )  # fmt: skip
    for i in range(5):
        PeerRow.objects.create(
            node_id=f"ok{i}", address=f"10.0.1.{i}:7934", host="h", pid=1, version="0",
            started_at=now, last_seen=now - datetime.timedelta(seconds=i),
        )  # fmt: skip
    monkeypatch.setattr(discovery, "MAX_PEER_ROWS", 6)

    class Node:
        hex_id, address, observer = "me", "10.0.9.9:7934", True

    registry = discovery.DatabaseRegistry(parse({"ENABLED": True}))
    with caplog.at_level("WARNING", logger="django_warpmesh"):
        found = registry._read(Node())  # type: ignore[arg-type]
    # The 6 most recent rows: the unspecified, multicast and port-0 addresses are never dialled.
    assert sorted(found) == ["10.0.1.0:7934", "10.0.1.1:7934", "10.0.1.2:7934"]
    assert "more than 6 rows" in caplog.text
