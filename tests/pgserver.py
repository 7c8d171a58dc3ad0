"""A private PostgreSQL server for the tests that stop and start one (never the shared one)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import free_ports

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def as_postgres() -> list[str] | None:
    """The command prefix that runs a program as the ``postgres`` OS user, if we can."""
    if os.geteuid() == 0 and shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--"]
    if pwd.getpwuid(os.geteuid()).pw_name == "postgres":
        return []
    return None


class PrivateServer:
    def __init__(self, prefix: list[str], directory: Path, port: int) -> None:
        self.prefix = prefix
        self.directory = directory
        self.port = port
        self.conninfo = f"host=127.0.0.1 port={port} dbname=postgres user=postgres"
        self._pg_ctl("initdb", "-o", "-A trust -U postgres -E UTF8 --locale=C --no-sync")

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.prefix, str(PG_BIN / "pg_ctl"), "-D", str(self.directory / "data"), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg_ctl("-o", options, "-l", str(self.directory / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("-m", mode, "-w", "stop")


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivateServer]:
    """A server initialised in a temporary directory on a free loopback port, not started;
    skips the test where it cannot be run (needs root or the ``postgres`` OS user)."""
    prefix = as_postgres()
    if prefix is None or not (PG_BIN / "initdb").exists():
        pytest.skip("cannot run a private PostgreSQL server here (needs root or the postgres user)")
    directory = Path(tempfile.mkdtemp(prefix="warpmesh-pg-"))
    try:
        owner = pwd.getpwnam("postgres")
        os.chown(directory, owner.pw_uid, owner.pw_gid)
        server = PrivateServer(prefix, directory, free_ports(1)[0])
        try:
            yield server
        finally:
            with contextlib.suppress(subprocess.SubprocessError):
                server.stop("immediate")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
