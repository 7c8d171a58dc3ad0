"""Join latency per discovery mode: a new process starts; how long until an old peer applies its
first invalidation?

    .venv/bin/python -m benchmarks.join_latency [--rounds 20] [--modes database,static,...]

Two old processes are connected; each round starts a third, which deletes a key the old ones
hold as soon as its node is up. The modes (``WARPMESH["DISCOVERY"]``):

- ``database``: the peer table, a fresh SQLite file (``database-postgresql``: PostgreSQL's
  ``test`` database); the newcomer registers, reads the table and dials;
- ``static``: the newcomer's ``PEERS`` lists the old ones; ``peers-file``: its ``PEERS_FILE``
  does;
- ``dns``: every process lists one host name, which resolves to all of them (a headless
  Service), in a network namespace whose hosts file is the DNS; the newcomer resolves it on
  its resolver thread, then dials;
- ``mdns``: each process on a host of its own on a LAN of network namespaces; the newcomer
  announces itself and browses (needs the ``mdns`` extra).

Reported per round: node start → applied, from the new process starting its mesh node to the
key being gone on an old peer (its delete is held until the node is ready, so this includes
discovery, dialling and being heard); spawn → applied, the same from the moment the OS process
was spawned (adds Python and Django start-up, which dominates).

Every process is a benchmark worker (:mod:`benchmarks.procs`) on ``benchmarks.settings_app``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import Section, Table
from benchmarks.procs import Worker, call_all, close_all, environ, spawn
from harness import free_ports, netns, wait_for
from harness.process import run_django

TITLE = "Join latency per discovery mode"
TIMING = {"HEARTBEAT": 1.0, "DISCOVERY_INTERVAL": 5.0, "STALE_AFTER": 30.0}
# The workers' settings: the benchmark ones with django_warpmesh installed, for its peer table.
SETTINGS = "benchmarks.settings_app"
MODES = ("database", "database-postgresql", "static", "peers-file", "dns", "mdns")
SERVICE = "shop-mesh.bench"  # the host name of the dns mode

# -- in the workers ----------------------------------------------------------------------------


def _cache() -> Any:
    from django.core.cache import caches

    return caches["mesh"]


def set_probe() -> bool:
    _cache().set("probe", "old", None)
    return True


def join() -> float:
    """A newcomer's first request: start this process's node, delete "probe" at once. When
    (``time.monotonic()``, one clock for every process here) the node started.

    Stamped in here, after this module's import: the pipes and the import are not the join."""
    from django_warpmesh import node as mesh_node

    started = time.monotonic()
    mesh_node.get_node()
    _cache().delete("probe")
    return started


def holds_probe() -> bool:
    """Whether this process still holds "probe" (without touching LRU order or expiry)."""
    from django_warpmesh.store import get_store

    cache = _cache()
    return cache.make_key("probe") in get_store(cache._location).cache


# -- in the parent -----------------------------------------------------------------------------


@dataclasses.dataclass
class Fleet:
    """How a mode's processes run: the old ones' settings, the newcomer's, their environment,
    and what runs each (a network namespace)."""

    olds: list[dict[str, Any]]
    newcomer: dict[str, Any]
    env: dict[str, str]
    old_prefixes: list[list[str]] = dataclasses.field(default_factory=list)
    newcomer_prefix: list[str] = dataclasses.field(default_factory=list)


def _database_env(database: str) -> dict[str, str]:
    """The workers' environment with a peer table of their own, migrated."""
    if database == "postgresql":
        env = {"BENCH_DB": "postgresql"}
    else:
        path = Path(tempfile.mkdtemp(prefix="warpmesh-join-")) / "peers.sqlite3"
        env = {"BENCH_DB": "sqlite", "BENCH_SQLITE_PATH": str(path)}
    env["DJANGO_SETTINGS_MODULE"] = SETTINGS
    run_django("migrate", "django_warpmesh", "-v0", env={**environ(), **env}, check=True)
    return env


@contextlib.contextmanager
def fleet(mode: str) -> Iterator[Fleet]:
    """The settings of ``mode``'s processes (and its namespaces, for as long as they run)."""
    loopback = {"BIND": "127.0.0.1", "PORT_RANGE": 1, **TIMING}
    if mode.startswith("database"):
        env = _database_env("postgresql" if mode.endswith("postgresql") else "sqlite")
        olds = [{**loopback, "PORT": port, "DISCOVERY": "database"} for port in free_ports(2)]
        yield Fleet(olds, {**loopback, "PORT": 0, "DISCOVERY": "database"}, env)
        return
    env = _database_env("sqlite")  # unused by these modes' discovery, but the app is installed
    if mode in {"static", "peers-file"}:
        ports = free_ports(2)
        addresses = [f"127.0.0.1:{port}" for port in ports]
        listed: dict[str, Any] = {"PEERS": addresses}
        if mode == "peers-file":
            path = Path(tempfile.mkdtemp(prefix="warpmesh-join-")) / "peers"
            path.write_text("".join(f"{address}\n" for address in addresses))
            listed = {"PEERS_FILE": str(path)}
        olds = [{**loopback, "PORT": port, **listed} for port in ports]
        yield Fleet(olds, {**loopback, "PORT": 0, **listed}, env)
        return
    netns.remove_orphans()
    if mode == "dns":
        hosts = netns.DEFAULT_HOSTS + "".join(f"127.0.0.{n}\t{SERVICE}\n" for n in (2, 3, 4))
        with netns.namespace(hosts_file=hosts) as host:
            named = {"PORT": 7934, "PORT_RANGE": 1, "PEERS": [f"{SERVICE}:7934"], **TIMING}
            yield Fleet(
                [{**named, "BIND": f"127.0.0.{n}"} for n in (2, 3)],
                {**named, "BIND": "127.0.0.4"},
                env,
                [host.prefix, host.prefix],
                host.prefix,
            )
        return
    if mode == "mdns":
        with netns.lan(3) as lan:
            multicast = {"PORT": 7934, "PORT_RANGE": 1, "DISCOVERY": "mdns", **TIMING}
            old_hosts, new_host = lan.hosts[:2], lan.hosts[2]
            yield Fleet(
                [{**multicast, "BIND": h.address} for h in old_hosts],
                {**multicast, "BIND": new_host.address},
                env,
                [h.prefix for h in old_hosts],
                new_host.prefix,
            )
        return
    raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")


def measure(mode: str, rounds: int) -> tuple[list[float], list[float]]:
    """``rounds`` joins in ``mode``: seconds from node start, and from spawn, to applied."""
    from_node: list[float] = []
    from_spawn: list[float] = []
    with fleet(mode) as spec:
        olds = spawn(
            [(f"old{index}", config, spec.env) for index, config in enumerate(spec.olds)],
            prefixes=spec.old_prefixes,
        )
        try:
            call_all(olds, "worker:start_node")
            call_all(olds, "worker:wait_connected", timeout=45, peers=1, timeout_s=15)
            old = olds[0]
            for _ in range(rounds):
                old.call("join_latency:set_probe")
                spawned = time.monotonic()
                newcomer = Worker("newcomer", spec.newcomer, spec.env, spec.newcomer_prefix)
                try:
                    node_started = newcomer.call("join_latency:join")
                    wait_for(
                        lambda: not old.call("join_latency:holds_probe"),
                        30,
                        interval=0.0005,
                        message="probe",
                    )
                    done = time.monotonic()
                finally:
                    newcomer.close()
                from_node.append(done - node_started)
                from_spawn.append(done - spawned)
        finally:
            close_all(olds)
    return from_node, from_spawn


def _ms(samples: Sequence[float]) -> tuple[str, str, str]:
    ms = sorted(sample * 1000 for sample in samples)
    return f"{statistics.median(ms):.1f} ms", f"{ms[0]:.1f} ms", f"{ms[-1]:.1f} ms"


def run(quick: bool, modes: Sequence[str] = MODES, rounds: int | None = None) -> Section:
    """The section: one row per mode; a mode that cannot run here says why."""
    rounds = rounds or (5 if quick else 15)
    section = Section(
        9,
        TITLE,
        intro=(
            f"Two old processes, connected; a third starts and deletes a key they hold ({rounds} "
            "rounds per mode, default timings: `HEARTBEAT` 1 s, `DISCOVERY_INTERVAL` 5 s). "
            "**node start → applied**: from the newcomer starting its node to an old peer "
            "having dropped the key (its delete waits until the node is ready: discovery, "
            "dialling, being heard). **spawn → applied** adds Python and Django start-up. "
            "`dns` and `mdns` run in network namespaces of the benchmark's own (a hosts file "
            "as the DNS; a LAN of namespaces on a bridge)."
        ),
    )
    table = Table(
        "Join latency",
        ["mode", "node start → applied, median", "min", "max", "spawn → applied, median"],
    )
    for mode in modes:
        try:
            from_node, from_spawn = measure(mode, rounds)
        except Exception as exc:
            table.add(mode, f"not measured: {type(exc).__name__}: {exc}", "", "", "")
            continue
        median, low, high = _ms(from_node)
        table.add(mode, median, low, high, _ms(from_spawn)[0])
    section.tables.append(table)
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    print(run(False, modes, args.rounds).markdown())


if __name__ == "__main__":
    main()
