"""django-cachalot on ``CachalotMeshCache``: real processes sharing one database.

Every write path cachalot and the mesh know (``save``, ``update``, ``create``, ``bulk_create``,
``delete``, an atomic block with a savepoint, raw SQL, a one-off ``manage.py shell -c``) made
in one process must reach the other processes' cached querysets; and processes taking turns
reading one queryset, with no write, must be served from their caches (cachalot's fills are
kept in each process instead of evicting each other's).

Run on SQLite and, with ``WARPMESH_TEST_DB=postgresql``, on PostgreSQL. One fleet of three
processes serves the whole module.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from harness import free_ports, wait_for
from tests.cluster import Cluster, MeshProcess, cluster, manage

pytest.importorskip("cachalot")

pytestmark = [pytest.mark.mesh, pytest.mark.database]

SETTINGS = {"DJANGO_SETTINGS_MODULE": "tests.settings_cachalot"}
HELPERS = "tests.cachalotproc"
# Rows a scenario's write changes must exist before it (created, then cached everywhere).
NEEDS_ROWS = {"save", "update", "delete", "raw_sql", "one-off"}


@pytest.fixture(scope="module")
def fleet(shared_db: dict[str, str]) -> Iterator[Cluster]:
    with cluster(3, env={**shared_db, **SETTINGS}) as mesh:
        mesh.wait_connected()
        yield mesh


def call(proc: MeshProcess, function: str, **kwargs: Any) -> Any:
    return proc.request("run", function=f"{HELPERS}.{function}", kwargs=kwargs)


def cached(proc: MeshProcess, expected: list[list[Any]]) -> None:
    """``proc`` holds ``expected``: a read of it is a hit (no SQL).

    Polled: an invalidation of the write that made ``expected`` may still be on its way when
    the first read already sees the committed row, and then evicts what that read cached (a
    write sends more than one: cachalot's signal, then the ORM hooks' after the write and at
    commit).
    """
    wait_for(
        lambda: call(proc, "read") == {"rows": expected, "queries": 0},
        5,
        message=f"process {proc.pid} to serve {expected} from cachalot's cache",
    )


def fresh_within(proc: MeshProcess, expected: list[list[Any]], since: float) -> float:
    """Seconds from ``since`` until ``proc`` reads ``expected`` (a cached, stale copy fails)."""
    wait_for(
        lambda: call(proc, "read")["rows"] == expected,
        5,
        interval=0.0005,
        message=f"process {proc.pid} to see the write",
    )
    return time.monotonic() - since


def one_off(fleet: Cluster, shared_db: dict[str, str], scenario: str, name: str) -> None:
    """``manage.py shell -c``: a process that starts, writes once and exits."""
    (port,) = free_ports(1)
    env = {
        **shared_db,
        **SETTINGS,
        "WARPMESH_PEERS": ",".join(fleet.addresses),
        "WARPMESH_BIND": "127.0.0.1",
        "WARPMESH_PORT": str(port),
        "WARPMESH_PORT_RANGE": "1",
        "WARPMESH_HEARTBEAT": "0.2",
    }
    code = f"from tests.cachalotproc import write; write({scenario!r}, {name!r})"
    result = manage("shell", "-c", code, env=env)
    assert result.returncode == 0, result.stderr


SCENARIOS = ["save", "update", "create", "bulk_create", "delete", "atomic", "raw_sql", "one-off"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_write_in_one_process_reaches_the_others_cached_querysets(
    fleet: Cluster, shared_db: dict[str, str], scenario: str
) -> None:
    index = SCENARIOS.index(scenario)
    writer = fleet.procs[index % len(fleet.procs)]
    readers = [proc for proc in fleet.procs if proc is not writer]
    name = f"row-{scenario}"
    if scenario in NEEDS_ROWS:
        call(writer, "write", scenario="create", name=name)
    before = call(writer, "truth")
    for reader in readers:
        cached(reader, before)

    started = time.monotonic()
    if scenario == "one-off":
        one_off(fleet, shared_db, "save", name)
    else:
        call(writer, "write", scenario=scenario, name=name)
    after = call(writer, "truth")
    assert after != before

    for reader in readers:
        fresh_within(reader, after, started)
        cached(reader, after)  # filled again, and served from the cache again


def test_processes_taking_turns_on_one_queryset_are_served_from_their_caches(
    fleet: Cluster,
) -> None:
    first, second, third = fleet.procs
    for count, procs in ((20, (first, second)), (30, (first, second, third))):
        # A queryset no process has read yet, on a table no test writes.
        prefix = f"turns-{count}"
        reads = [
            call(procs[i % len(procs)], "read", query="categories", prefix=prefix)
            for i in range(count)
        ]
        hits = sum(read["queries"] == 0 for read in reads)
        # Each process misses once, its own first read (as LocMemCache, one per process); on a
        # plain MeshCache each fill evicted the others' copies: no hit at all.
        assert hits == count - len(procs), f"{hits} hits in {count} reads by {len(procs)}"
