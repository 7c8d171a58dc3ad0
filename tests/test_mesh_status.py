"""``manage.py mesh_status`` against real peer processes: the table, ``--json``, exit codes.

The command runs in its own process (as an operator or a probe runs it), with the mesh's settings
in ``WARPMESH_*`` environment variables; the peers are :mod:`tests.cluster` processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

from harness import ROOT, free_ports, wait_for
from tests.cluster import Cluster, MeshProcess, cluster, manage, run_sql
from tests.natsserver import NatsServer, running_server

pytestmark = pytest.mark.mesh

REPORT_KEYS = {
    "schema",
    "status",
    "exit_code",
    "verdict",
    "checked_at",
    "discovery",
    "transport",
    "timeout_s",
    "problems",
    "peers",
}
PEER_KEYS = {
    "id",
    "address",
    "source",
    "host",
    "pid",
    "started_at",
    "age_s",
    "last_seen",
    "last_seen_s",
    "stale",
    "answering",
    "ready",
    "degraded",
    "discovery_error",
    "relayed_pids",
    "transport_connected",
    "connected",
    "expected",
    "cannot_reach",
    "latency_ms",
    "invalidations_sent",
    "invalidations_received",
    "gaps_detected",
    "frames_rejected",
    "stats",
}
TIMING = {"HEARTBEAT": 0.2, "DISCOVERY_INTERVAL": 0.3, "STALE_AFTER": 30.0}


def command_env(env: dict[str, str]) -> dict[str, str]:
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "WARPMESH_ENABLED": "true",
        "WARPMESH_HEARTBEAT": "0.2",
        **env,
    }


def mesh_status(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return manage("mesh_status", *args, env={"WARPMESH_HEARTBEAT": "0.2", **env})


def report_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(result.stdout)
    assert set(report) == REPORT_KEYS
    assert report["exit_code"] == result.returncode
    return report


def peers_env(mesh: Cluster, *extra: str) -> dict[str, str]:
    return {"WARPMESH_PEERS": ",".join([*mesh.addresses, *extra])}


def table_row(output: str, address: str) -> str:
    """The table's line for the peer at ``address`` (between the header and the blank line)."""
    lines = output.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("PEER "))
    rows = lines[start + 1 : lines.index("", start)]
    (row,) = [line for line in rows if line.split()[1] == address]
    return row


def by_address(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {peer["address"]: peer for peer in report["peers"]}


@pytest.fixture(scope="module")
def trio() -> Iterator[Cluster]:
    with cluster(3) as mesh:
        mesh.wait_connected()
        writer = mesh.procs[0]
        writer.cache("delete", "status:written")
        wait_for(
            lambda: all(proc.stats()["invalidations_received"] >= 1 for proc in mesh.procs[1:]),
            5,
            message="the delete to reach the peers",
        )
        yield mesh


def test_table_lists_every_peer_with_a_healthy_verdict(trio: Cluster) -> None:
    result = mesh_status(env=peers_env(trio))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Mesh: 3 peer(s), static PEERS (3), checked ")
    assert lines[1] == "Transport: nng, connected"
    header = next(line for line in lines if line.startswith("PEER "))
    for column in ("ADDRESS", "HOST/PID", "CONNECTED", "LINK", "LATENCY", "INV SENT", "INV RECV"):
        assert column in header
    assert header.split()[-2:] == ["LAST", "SEEN"]
    for proc in trio.procs:
        node_id = proc.stats()["node_id"]
        (row,) = [line for line in lines if line.startswith(node_id)]
        assert proc.address in row
        assert f"/{proc.pid}" in row
        assert re.search(r" 2 of 2 +up ", row)
        assert " ms " in row
    assert lines[-1] == "healthy: 3 peer(s), all answering, all connected to each other"
    # The observer's node logged nothing at its default verbosity.
    assert "mesh:" not in result.stderr


def test_json_has_the_documented_keys_and_every_peer(trio: Cluster) -> None:
    result = mesh_status("--json", env=peers_env(trio))
    assert result.returncode == 0, result.stderr
    report = report_of(result)
    assert report["schema"] == 1
    assert report["status"] == "healthy"
    assert report["problems"] == []
    assert report["discovery"] == "static PEERS (3)"
    # The observer's own transport: nng listens nowhere, so has no URL to show.
    assert report["transport"] == {
        "name": "nng",
        "url": None,
        "connected": True,
        "last_error": None,
    }
    peers = by_address(report)
    assert set(peers) == set(trio.addresses)
    writer, *readers = trio.procs
    for proc in trio.procs:
        peer = peers[proc.address]
        assert set(peer) == PEER_KEYS
        assert peer["source"] == "PEERS"
        stats = proc.stats()
        assert peer["id"] == stats["node_id"]
        assert peer["pid"] == proc.pid
        assert peer["answering"] is True
        assert peer["ready"] is True
        assert peer["degraded"] is False
        assert peer["transport_connected"] is True
        assert peer["stats"]["transport"]["name"] == "nng"
        assert (peer["connected"], peer["expected"], peer["cannot_reach"]) == (2, 2, [])
        assert peer["latency_ms"] > 0
        assert peer["age_s"] > 0
        assert peer["gaps_detected"] == 0
        assert peer["frames_rejected"] == 0
        # Its own full view, GL Mesh's /api/stats shape included.
        assert peer["stats"]["peer_id"] == stats["node_id"]
        assert {row["address"] for row in peer["stats"]["peers"]} == set(trio.addresses) - {
            proc.address
        }
        assert all(row["connected"] for row in peer["stats"]["peers"])
    assert peers[writer.address]["invalidations_sent"] >= 1
    for proc in readers:
        assert peers[proc.address]["invalidations_received"] >= 1


WATCH = ["mesh_status", "--json", "--watch", "0.1", "--count", "12"]


def test_the_observer_is_invisible_and_never_invalidates(trio: Cluster, tmp_path: Path) -> None:
    for proc in trio.procs:
        proc.request("fill_local", prefix="kept:", count=20)
    before = {proc.address: proc.stats() for proc in trio.procs}
    logged_before = {proc.address: proc.request("logged") for proc in trio.procs}
    out_path, err_path = tmp_path / "watch.out", tmp_path / "watch.err"
    with out_path.open("w") as out_file, err_path.open("w") as err_file:
        # Files, not pipes: nobody reads a pipe while this test polls the peers.
        watcher = subprocess.Popen(
            [sys.executable, "-m", "django", *WATCH],
            cwd=ROOT,
            env=command_env(peers_env(trio)),
            stdout=out_file,
            stderr=err_file,
        )
        samples = 0
        try:
            while watcher.poll() is None:
                for proc in trio.procs:
                    seen = {peer["address"] for peer in proc.stats()["peers"]}
                    assert seen == set(trio.addresses) - {proc.address}
                samples += 1
        finally:
            if watcher.poll() is None:
                watcher.kill()
            watcher.wait(10)
    out, err = out_path.read_text(), err_path.read_text()
    assert watcher.returncode == 0, err
    assert samples > 3
    reports = [json.loads(line) for line in out.splitlines()]  # one document per line
    assert len(reports) == 12
    assert all(report["status"] == "healthy" for report in reports)
    assert all(len(report["peers"]) == 3 for report in reports)
    # Another observer after it: by then the first one's silence has outlasted the peers'
    # liveness window (3 heartbeats), and losing it must not be logged either.
    assert mesh_status("--json", env=peers_env(trio)).returncode == 0
    for proc in trio.procs:
        after = proc.stats()
        for counter in ("invalidations_received", "flushes", "gaps_detected", "frames_rejected"):
            assert after[counter] == before[proc.address][counter], counter
        assert proc.request("count") >= 20  # nothing flushed
        new_lines = proc.request("logged")[len(logged_before[proc.address]) :]
        assert "connected" not in new_lines
        assert "lost" not in new_lines


def test_a_peer_that_does_not_answer_is_shown_as_such() -> None:
    (port,) = free_ports(1)
    silent = f"127.0.0.1:{port}"  # listed everywhere, nothing listens there
    with cluster(2, extra_peers=[silent]) as mesh:
        mesh.wait_connected()
        result = mesh_status("--json", "--timeout", "1", env=peers_env(mesh, silent))
        assert result.returncode == 1, result.stderr
        report = report_of(result)
        assert report["status"] == "degraded"
        peers = by_address(report)
        assert peers[silent]["answering"] is False
        assert peers[silent]["latency_ms"] is None
        for proc in mesh.procs:
            assert peers[proc.address]["answering"] is True
            assert peers[proc.address]["connected"] == 1
            assert peers[proc.address]["expected"] == 2
            assert peers[proc.address]["cannot_reach"] == [silent]
            assert peers[proc.address]["degraded"] is True  # it caps entries meanwhile
        kinds = sorted(problem["kind"] for problem in report["problems"])
        assert kinds == ["cannot_reach", "cannot_reach", "not_answering"]
        assert report["verdict"].startswith("degraded: ")
        assert f"{silent} not answering" in report["verdict"]
        assert f"cannot reach {silent}" in report["verdict"]

        table = mesh_status("--timeout", "1", env=peers_env(mesh, silent))
        assert table.returncode == 1
        row = table_row(table.stdout, silent)
        assert "not answering" in row
        assert table.stdout.splitlines()[-1].startswith("degraded: ")
        assert "Traceback" not in table.stderr


def test_disabled_and_misconfigured_exit_2(tmp_path: Path) -> None:
    disabled = mesh_status(env={"WARPMESH_ENABLED": "false"})
    assert disabled.returncode == 2
    assert disabled.stdout.strip() == "disabled: WARPMESH['ENABLED'] is false"
    report = report_of(mesh_status("--json", env={"WARPMESH_ENABLED": "off"}))
    assert (report["status"], report["peers"], report["discovery"]) == ("disabled", [], None)

    # An invalid WARPMESH (in this process: the command reports it as it would from a shell).
    out = StringIO()
    with override_settings(WARPMESH={"PORT": "many"}), pytest.raises(SystemExit) as exit_:
        call_command("mesh_status", "--json", stdout=out)
    assert exit_.value.code == 2
    bad = json.loads(out.getvalue())
    assert set(bad) == REPORT_KEYS
    assert (bad["status"], bad["exit_code"]) == ("misconfigured", 2)
    assert "WARPMESH['PORT'] must be an integer" in bad["verdict"]

    no_table = mesh_status(
        env={"WARPMESH_SQLITE_PATH": str(tmp_path / "empty.sqlite3"), "WARPMESH_TEST_DB": "sqlite"}
    )
    assert no_table.returncode == 2, no_table.stderr
    assert "does not exist" in no_table.stdout
    assert "migrate django_warpmesh" in no_table.stdout
    assert "Traceback" not in no_table.stderr


def test_bad_arguments_are_command_errors() -> None:
    for args, message in [
        (["--timeout", "0"], "argument --timeout: must be more than 0 seconds, got '0'"),
        (["--timeout", "soon"], "argument --timeout: takes a number of seconds, got 'soon'"),
        (["--watch", "-1"], "argument --watch: must be more than 0 seconds"),
        (["--watch", "nan"], "argument --watch: must be more than 0 seconds"),
        (["--watch", "1", "--count", "0"], "argument --count: must be at least 1"),
        (["--count", "3"], "--count only makes sense with --watch"),
    ]:
        with pytest.raises(CommandError, match=re.escape(message)):
            call_command("mesh_status", *args)
    # From a shell: the message on stderr, exit status 2 (a probe's "misconfigured").
    for args, message in [
        (["--timeout", "soon"], "argument --timeout: takes a number of seconds, got 'soon'"),
        (["--count", "3"], "CommandError: --count only makes sense with --watch."),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ]:
        result = mesh_status(*args, env={})
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr


# -- through the peer table ---------------------------------------------------------------


@pytest.fixture
def status_db(shared_db: dict[str, str]) -> dict[str, str]:
    """The shared peer-table database (tests/conftest.py), emptied."""
    run_sql(shared_db, "DELETE FROM django_warpmesh_peer")
    return shared_db


def row_ids(proc: MeshProcess) -> set[str]:
    return {row["node_id"] for row in proc.request("peer_rows")}


@pytest.mark.database
def test_peers_from_the_table_and_a_killed_peer(status_db: dict[str, str]) -> None:
    with cluster(3, discovery=True, env=status_db, **TIMING) as mesh:
        mesh.wait_connected()
        ids = row_ids(mesh.procs[0])
        assert len(ids) == 3

        result = mesh_status("--json", env=status_db)
        assert result.returncode == 0, result.stdout + result.stderr
        report = report_of(result)
        assert report["discovery"].startswith("database discovery (")
        peers = by_address(report)
        assert set(peers) == set(mesh.addresses)
        for proc in mesh.procs:
            peer = peers[proc.address]
            assert peer["id"] in ids
            assert peer["pid"] == proc.pid
            assert peer["host"]
            assert peer["stale"] is False
            assert 0 <= peer["last_seen_s"] < 30
            assert peer["age_s"] >= 0
            assert (peer["connected"], peer["expected"]) == (2, 2)
        # The observer read the table and never wrote to it.
        assert row_ids(mesh.procs[0]) == ids

        victim, *survivors = mesh.procs
        victim.kill(signal.SIGKILL)
        wait_for(
            lambda: all(
                victim.address
                not in {peer["address"] for peer in proc.stats()["peers"] if peer["connected"]}
                for proc in survivors
            ),
            10,
            message="the survivors to lose the killed peer",
        )
        # Its row stays until STALE_AFTER: the mesh is degraded meanwhile, and says why.
        result = mesh_status("--json", "--timeout", "1", env=status_db)
        assert result.returncode == 1, result.stderr
        report = report_of(result)
        peers = by_address(report)
        assert peers[victim.address]["answering"] is False
        assert peers[victim.address]["pid"] == victim.pid  # known from its row
        for proc in survivors:
            assert peers[proc.address]["cannot_reach"] == [victim.address]
        assert f"{victim.address} (" in report["verdict"]
        assert "not answering" in report["verdict"]

        table = mesh_status("--timeout", "1", env=status_db)
        assert table.returncode == 1
        row = table_row(table.stdout, victim.address)
        assert "not answering" in row
        assert f"/{victim.pid}" in row


@pytest.mark.database
def test_an_empty_peer_table_is_degraded(status_db: dict[str, str]) -> None:
    result = mesh_status("--json", "--timeout", "0.5", env=status_db)
    assert result.returncode == 1, result.stderr
    report = report_of(result)
    assert report["peers"] == []
    assert report["problems"] == [{"kind": "no_peers"}]
    assert report["verdict"].startswith("degraded: no peers (the peer table is empty")


@pytest.mark.database
def test_a_peer_whose_discovery_fails_makes_the_mesh_degraded(status_db: dict[str, str]) -> None:
    (refusing_port,) = free_ports(1)
    # Rows outlive the test, so the failing peer stays listed while it cannot refresh its own.
    with cluster(2, discovery=True, env=status_db, **{**TIMING, "STALE_AFTER": 60.0}) as mesh:
        mesh.wait_connected()
        failing = mesh.procs[1]
        failing.request("db_break", refusing_port=refusing_port)
        wait_for(lambda: failing.request("discovery_failures") >= 2, 10, message="failed syncs")
        result = mesh_status("--json", env=status_db)
        report = report_of(result)
        assert result.returncode == 1, report["verdict"]
        assert report["status"] == "degraded"
        (problem,) = report["problems"]
        assert (problem["kind"], problem["peer"]) == ("discovery_failing", failing.address)
        assert "cannot reach the peer table" in problem["reason"]
        assert f"{failing.address} (" in report["verdict"]
        assert "cannot use peer discovery" in report["verdict"]
        assert by_address(report)[failing.address]["degraded"] is True

        failing.request("db_fix")
        wait_for(lambda: failing.request("discovery_failures") == 0, 10, message="recovery")
        assert mesh_status("--json", env=status_db).returncode == 0


# -- through a broker TRANSPORT: nobody dialled, whoever answers is the mesh ----------------------


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of the test's own (tests/natsserver.py), killed at the end."""
    with running_server(tmp_path) as server:
        yield server


def by_id(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {peer["id"]: peer for peer in report["peers"]}


def assert_all_answer_through(report: dict[str, Any], mesh: Cluster, name: str, url: str) -> None:
    assert report["status"] == "healthy", report["verdict"]
    assert report["problems"] == []
    assert report["transport"] == {"name": name, "url": url, "last_error": None, "connected": True}
    assert report["discovery"] == "no discovery: every process subscribed to the broker"
    peers = by_id(report)
    assert len(peers) == len(mesh.procs)
    for proc in mesh.procs:
        stats = proc.stats()
        peer = peers[stats["node_id"]]
        assert (peer["address"], peer["pid"]) == ("", proc.pid)
        assert peer["transport_connected"] is True
        assert peer["stats"]["transport"]["name"] == name
        others = len(mesh.procs) - 1
        assert (peer["connected"], peer["expected"], peer["cannot_reach"]) == (others, others, [])
        assert peer["latency_ms"] > 0


def test_through_nats_whoever_answers_and_nobody_once_the_server_is_gone(
    nats_server: NatsServer,
) -> None:
    env = {"WARPMESH_TRANSPORT": nats_server.url}
    with cluster(3, TRANSPORT=nats_server.url, PEERS=[]) as mesh:
        mesh.wait_connected()
        result = mesh_status("--json", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert_all_answer_through(report_of(result), mesh, "nats", nats_server.url)

        table = mesh_status(env=env)
        assert table.returncode == 0, table.stdout + table.stderr
        lines = table.stdout.splitlines()
        assert lines[1] == f"Transport: nats at {nats_server.url}, connected"
        for proc in mesh.procs:
            (row,) = [line for line in lines if line.startswith(proc.stats()["node_id"])]
            assert row.split()[1] == "-"  # no address: a node listens nowhere
            assert f"/{proc.pid} " in row
            assert re.search(r" 2 of 2 +up ", row)
        assert lines[-1] == (
            f"healthy: 3 peer(s) answered through {nats_server.url}, all connected to each other"
        )

        nats_server.kill()
        wait_for(
            lambda: not any(proc.stats()["transport"]["connected"] for proc in mesh.procs),
            10,
            message="every node to see its NATS link gone",
        )
        for proc in mesh.procs:
            stats = proc.stats()
            assert stats["transport"]["disconnects"] >= 1
            assert stats["transport_losses"] == 1
        result = mesh_status("--json", "--timeout", "1", env=env)
        assert result.returncode == 1, result.stdout + result.stderr
        report = report_of(result)
        assert (report["status"], report["peers"]) == ("degraded", [])
        assert report["problems"] == [{"kind": "no_answer"}]
        assert report["transport"]["connected"] is False
        assert report["transport"]["last_error"]
        assert report["verdict"].startswith(
            f"degraded: no node answered through {nats_server.url} (not connected to it: "
        )
        assert "Traceback" not in result.stderr


@pytest.mark.broker
def test_through_postgresql_listen_notify() -> None:
    from tests.server_available import require

    require("postgresql")
    url = (
        f"postgresql://{os.environ.get('WARPMESH_PG_USER', 'postgres')}@"
        f"{os.environ.get('WARPMESH_PG_HOST', '127.0.0.1')}:"
        f"{os.environ.get('WARPMESH_PG_PORT', '5432')}/{os.environ.get('WARPMESH_PG_NAME', 'test')}"
    )
    # A secret of its own: a channel no other test's nodes (nor another run's) publish on.
    secret = f"status-{os.getpid()}-{free_ports(1)[0]}"
    with cluster(3, TRANSPORT=url, PEERS=[], SECRET=secret) as mesh:
        mesh.wait_connected()
        result = mesh_status("--json", env={"WARPMESH_TRANSPORT": url, "WARPMESH_SECRET": secret})
        assert result.returncode == 0, result.stdout + result.stderr
        assert_all_answer_through(report_of(result), mesh, "postgresql", url)


def test_a_node_whose_broker_link_is_down_is_a_problem() -> None:
    """The report alone (a node that answered, then lost its link, or reached us otherwise)."""
    from django_warpmesh.status_report import Census, Reply, Target, build_report

    link = {"name": "nats", "url": "nats://broker:4222", "connected": False}
    stats = {"node_id": "ab" * 8, "address": "", "pid": 7, "host": "h", "transport": link}
    census = Census(
        "no discovery: every process subscribed to the broker",
        [Target("", "ab" * 8, "h", 7)],
        {"ab" * 8: Reply(stats, 0.001, datetime.now(timezone.utc))},
        transport={**link, "last_error": None, "connected": True},
    )
    report = build_report(census, 2.0)
    assert report["exit_code"] == 1
    assert report["problems"] == [
        {"kind": "transport_disconnected", "peer": "", "id": "ab" * 8, "transport": "nats"}
    ]
    assert report["verdict"] == "degraded: node abababab has lost its nats link"
    assert report["peers"][0]["transport_connected"] is False
    # nng has no link to lose: its "connected" is never a problem, whatever it says.
    nng = {**stats, "transport": {"name": "nng", "url": "", "connected": False}}
    census.replies["ab" * 8] = Reply(nng, 0.001, datetime.now(timezone.utc))
    assert build_report(census, 2.0)["problems"] == []
