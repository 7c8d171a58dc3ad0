"""Database discovery under both values of ``USE_TZ``, on every database the suite runs on.

Django rejects a timezone-aware datetime on SQLite and MySQL/MariaDB when ``USE_TZ`` is False,
and a naive one is ambiguous when it is True: the peer table must work either way. Each case is
two real processes on a shared database: they must find each other through the table, and a
delete on one must evict the other's copy.
"""

from __future__ import annotations

import json

import pytest

from harness import wait_for
from tests.cluster import cluster, manage, run_sql

pytestmark = [pytest.mark.mesh, pytest.mark.database]

TIMING = {"HEARTBEAT": 0.2, "DISCOVERY_INTERVAL": 0.3, "STALE_AFTER": 2.0}


@pytest.mark.parametrize("use_tz", [True, False], ids=["USE_TZ", "no-USE_TZ"])
def test_discovery_works_whatever_use_tz(shared_db: dict[str, str], use_tz: bool) -> None:
    run_sql(shared_db, "DELETE FROM django_warpmesh_peer")
    env = {**shared_db, "WARPMESH_TEST_USE_TZ": "true" if use_tz else "false"}
    with cluster(2, discovery=True, env=env, **TIMING) as mesh:
        mesh.wait_connected()
        first, second = mesh.procs
        for proc in mesh.procs:
            assert proc.stats()["discovery_error"] is None
        second.cache("set", "k", "old", None)
        first.cache("delete", "k")
        wait_for(lambda: not second.stored("k"), 5, message="the delete to evict the peer's copy")
        rows = first.request("peer_rows")
        assert {row["address"] for row in rows} == set(mesh.addresses)

        # The operator's view agrees: every row has a start time and a recent last_seen.
        status = manage("mesh_status", "--json", "--timeout", "3", env=env)
        report = json.loads(status.stdout)
        assert status.returncode == 0, report["verdict"]
        for peer in report["peers"]:
            assert peer["started_at"] is not None
            assert peer["age_s"] is not None
            assert 0 <= peer["last_seen_s"] < TIMING["STALE_AFTER"]
