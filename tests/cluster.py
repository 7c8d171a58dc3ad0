"""Real OS processes on loopback, for the mesh tests: start, drive, poll, kill.

The process harness itself (starting, talking with a deadline, reaping; free ports; polling) is
:mod:`harness`, shared with the benchmarks; this is what the mesh tests add to it.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from harness import free_ports, wait_for
from harness.process import DEFAULT_TIMEOUT, JsonLinesProcess, run_django


class MeshProcess(JsonLinesProcess):
    """One ``python -m tests.meshproc`` process (tests.settings), ``warpmesh`` its ``WARPMESH``.

    ``env`` is added to this process's environment, less ``WARPMESH_ENABLED``: whether the mesh
    runs is the test's ``warpmesh`` to say. ``prefix``: what runs it (a network namespace's
    ``ip netns exec NAME``, :mod:`harness.netns`). Started when made: it has said hello on
    return.
    """

    def __init__(
        self,
        warpmesh: dict[str, Any],
        env: dict[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        prefix: Sequence[str] = (),
    ) -> None:
        self.warpmesh = warpmesh
        full_env = {**os.environ, "WARPMESH_JSON": json.dumps(warpmesh), **(env or {})}
        full_env.pop("WARPMESH_ENABLED", None)
        super().__init__("tests.meshproc", full_env, timeout=timeout, prefix=prefix)
        self.address: str | None = None
        try:
            self.wait_hello()
        except BaseException:
            self.close()
            raise

    def request(self, call: str, **fields: Any) -> Any:
        """One call of :mod:`tests.meshproc` (a command, or a method of the cache)."""
        return self.ask({"call": call, **fields})

    def cache(self, method: str, *args: Any, alias: str = "default", **kwargs: Any) -> Any:
        return self.request(method, args=list(args), kwargs=kwargs, alias=alias)

    def stored(self, key: str, alias: str = "default") -> bool:
        return bool(self.request("stored", key=key, alias=alias))

    def stats(self) -> dict[str, Any]:
        return self.request("stats")  # type: ignore[no-any-return]


class Cluster:
    """N processes on 127.0.0.1: a static peer list, or (``discovery=True``) the peer table.

    ``extra_peers``: addresses added to every process's static ``PEERS`` (another node started
    elsewhere, or an address where nothing listens).
    """

    def __init__(
        self,
        size: int,
        *,
        discovery: bool = False,
        env: dict[str, str] | None = None,
        extra_peers: Sequence[str] = (),
        **warpmesh: Any,
    ) -> None:
        self.discovery = discovery
        self.env = env
        self.extra_peers = list(extra_peers)
        self.ports = free_ports(size)
        self.addresses = [f"127.0.0.1:{port}" for port in self.ports]
        self.warpmesh = warpmesh
        self.procs: list[MeshProcess] = []
        for index in range(size):
            self.procs.append(self.spawn(index))

    def config(self, index: int) -> dict[str, Any]:
        peers = (
            {"PEERS": [], "DISCOVERY_INTERVAL": 0.3}
            if self.discovery
            else {"PEERS": self.addresses + self.extra_peers}
        )
        return {
            "BIND": "127.0.0.1",
            "PORT": self.ports[index],
            "PORT_RANGE": 1,
            "HEARTBEAT": 0.2,
            **peers,
            **self.warpmesh,
        }

    def spawn(self, index: int, **overrides: Any) -> MeshProcess:
        proc = MeshProcess({**self.config(index), **overrides}, env=self.env)
        proc.address = proc.request("start")["address"]
        if index < len(self.addresses) and proc.address:  # none on a broker TRANSPORT
            self.addresses[index] = proc.address
        return proc

    def add(self, **overrides: Any) -> MeshProcess:
        """Start one more process (its port chosen now) and make it part of the cluster."""
        (port,) = free_ports(1)
        self.ports.append(port)
        self.addresses.append(f"127.0.0.1:{port}")
        self.procs.append(self.spawn(len(self.procs), **overrides))
        return self.procs[-1]

    def restart(self, index: int) -> MeshProcess:
        self.procs[index].kill()
        self.procs[index].close()
        self.procs[index] = self.spawn(index)
        return self.procs[index]

    def wait_connected(self, timeout: float = 15.0) -> None:
        expected = len(self.procs) - 1

        def all_connected() -> bool:
            for proc in self.procs:
                if proc.proc.poll() is not None:
                    continue
                peers = proc.stats()["peers"]
                if sum(1 for peer in peers if peer["connected"]) < expected:
                    return False
                if not proc.request("ready"):
                    return False
            return True

        wait_for(all_connected, timeout, interval=0.05, message="every peer connected")

    def close(self) -> None:
        for proc in self.procs:
            proc.close()


@contextmanager
def cluster(
    size: int,
    *,
    discovery: bool = False,
    env: dict[str, str] | None = None,
    extra_peers: Sequence[str] = (),
    **warpmesh: Any,
) -> Iterator[Cluster]:
    mesh = Cluster(size, discovery=discovery, env=env, extra_peers=extra_peers, **warpmesh)
    try:
        yield mesh
    finally:
        mesh.close()


def manage(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``manage.py ARGS`` in a process of its own (tests.settings, the mesh enabled), run to
    its end: a management command, a cron job, a one-off ``shell -c``."""
    full_env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "WARPMESH_ENABLED": "true",
    }
    return run_django(*args, env={**full_env, **env}, timeout=timeout)


# -- a database every process of a test shares --------------------------------------------------


def migrate(env: dict[str, str], *args: str) -> None:
    """``manage.py migrate`` in a subprocess, against the database ``env`` points at."""
    full_env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", **env}
    run_django("migrate", *args, "-v0", env=full_env, timeout=DEFAULT_TIMEOUT, check=True)


def server_connect(dbname: str) -> Any:
    """An autocommit connection to the PostgreSQL or MariaDB server the suite runs against."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("mysql"):
        import pymysql

        return pymysql.connect(
            host=db["HOST"],
            port=int(db["PORT"]),
            user=db["USER"],
            password=db["PASSWORD"],
            database=dbname,
            autocommit=True,
        )
    import psycopg

    return psycopg.connect(
        host=db["HOST"], port=int(db["PORT"]), user=db["USER"], dbname=dbname, autocommit=True
    )


def server_execute(dbname: str, sql: str) -> None:
    with server_connect(dbname) as conn:
        conn.cursor().execute(sql)


def run_sql(env: dict[str, str], sql: str) -> None:
    """Run one statement on the shared database (not the test database pytest-django made)."""
    for name in ("WARPMESH_PG_NAME", "WARPMESH_MARIADB_NAME"):
        if name in env:
            server_execute(env[name], sql)
            return
    import sqlite3

    with sqlite3.connect(env["WARPMESH_SQLITE_PATH"]) as conn:
        conn.execute(sql)


@contextmanager
def node_in_this_process(port: int, peers: Sequence[str], **warpmesh: Any) -> Iterator[str]:
    """This (pytest) process's own mesh node on 127.0.0.1:``port``, for the HTTP views and the
    live server: ``WARPMESH`` overridden, the node started by a first cache write, stopped after.
    """
    from django.core.cache import caches
    from django.test import override_settings

    from django_warpmesh import node as mesh_node

    address = f"127.0.0.1:{port}"
    config = {
        "ENABLED": True,
        "BIND": "127.0.0.1",
        "PORT": port,
        "PORT_RANGE": 1,
        "HEARTBEAT": 0.2,
        "PEERS": [address, *peers],
        **warpmesh,
    }
    with override_settings(WARPMESH=config):
        mesh_node.stop_node()
        try:
            caches["default"].delete("warpmesh-tests:start")  # the first mutation starts it
            yield address
        finally:
            mesh_node.stop_node()
