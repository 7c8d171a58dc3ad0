from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.conf import settings
from django.core.cache.backends import locmem

from django_warpmesh import node as mesh_node
from django_warpmesh.node import process
from tests.cache_helpers import Clock, RecordingNode
from tests.cluster import migrate, server_execute

# Where each server's shared database is named in a process's environment (tests/settings.py).
NAME_VARIABLE = {"postgresql": "WARPMESH_PG_NAME", "mysql": "WARPMESH_MARIADB_NAME"}


@contextmanager
def database_of_its_own(suffix: str, directory: Path) -> Iterator[dict[str, str]]:
    """A new, empty database on the server the suite runs against (a SQLite file in
    ``directory`` by default): the environment a process needs to open it."""
    admin_db = settings.DATABASES["default"]["NAME"]
    vendor = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[1]
    if vendor not in NAME_VARIABLE:
        yield {"WARPMESH_SQLITE_PATH": str(directory / f"{suffix}.sqlite3")}
        return
    # Named after this run's test database, so runs with different test databases never collide.
    name = f"{settings.DATABASES['default']['TEST']['NAME']}_{suffix}"
    drop = f"DROP DATABASE IF EXISTS {name}" + (" WITH (FORCE)" if vendor == "postgresql" else "")
    server_execute(admin_db, drop)
    server_execute(admin_db, f"CREATE DATABASE {name}")
    try:
        yield {NAME_VARIABLE[vendor]: name}
    finally:
        server_execute(admin_db, drop)


@pytest.fixture(scope="module")
def shared_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A migrated database of its own that every process of a test opens: the env to reach it.

    A SQLite file, or (with ``WARPMESH_TEST_DB=postgresql`` or ``mariadb``) a database made here
    on that server.
    """
    with database_of_its_own("shared", tmp_path_factory.mktemp("shared")) as env:
        migrate(env)
        yield env


@pytest.fixture
def empty_db(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A database with no tables at all (``migrate`` not run yet), for one test."""
    with database_of_its_own("empty", tmp_path) as env:
        yield env


# The MeshCache API tests' (tests/test_cache_*.py, tests/cache_helpers.py).


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    # locmem.time *is* the time module: LocMemCache, BaseCache and MeshCache all read this.
    monkeypatch.setattr(locmem.time, "time", fake)
    return fake


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> RecordingNode:
    fake = RecordingNode()
    monkeypatch.setattr(process, "_current", fake)
    assert mesh_node.get_node() is fake
    return fake
