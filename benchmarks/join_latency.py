"""Join latency: a new process starts; how long until an old peer applies its first invalidation?

    .venv/bin/python -m benchmarks.join_latency [--rounds 20] [--database sqlite|postgresql]

Two old processes share a peer table (a fresh SQLite file, or PostgreSQL's ``test`` database when
``--database postgresql``); each round starts a third, which deletes a key the old ones hold as
soon as its node is up. Reported per round:

- node start → applied: from the new process starting its mesh node to the key being gone on an
  old peer (the new node registers, reads the table, dials, is heard, and its delete arrives or,
  if it was sent before the pipes were up, the old peer's first-contact flush removes the key);
- spawn → applied: the same from the moment the OS process was spawned (adds Python and Django
  start-up, which dominates).

Every process is a benchmark worker (:mod:`benchmarks.procs`) on ``benchmarks.settings_app``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.procs import Worker, call_all, close_all, environ, spawn
from harness import free_ports, wait_for
from harness.process import run_django

TIMING = {"HEARTBEAT": 1.0, "DISCOVERY_INTERVAL": 5.0, "STALE_AFTER": 30.0}
# The workers' settings: the benchmark ones with django_warpmesh installed, for its peer table.
SETTINGS = "benchmarks.settings_app"

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


def prepare(database: str) -> dict[str, str]:
    """The workers' environment: their settings and a peer table of their own, migrated."""
    if database == "postgresql":
        env = {"BENCH_DB": "postgresql"}
    else:
        path = Path(tempfile.mkdtemp(prefix="warpmesh-join-")) / "peers.sqlite3"
        env = {"BENCH_DB": "sqlite", "BENCH_SQLITE_PATH": str(path)}
    env["DJANGO_SETTINGS_MODULE"] = SETTINGS
    run_django("migrate", "django_warpmesh", "-v0", env={**environ(), **env}, check=True)
    return env


def summary(name: str, samples: list[float]) -> str:
    ms = sorted(sample * 1000 for sample in samples)
    return (
        f"{name:<24} median {statistics.median(ms):8.2f} ms   "
        f"min {ms[0]:8.2f} ms   max {ms[-1]:8.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args()
    env = prepare(args.database)
    from_node: list[float] = []
    from_spawn: list[float] = []
    # Two old peers that find each other through the peer table (no PEERS).
    configs = [
        {"BIND": "127.0.0.1", "PORT": port, "PORT_RANGE": 1, "PEERS": [], **TIMING}
        for port in free_ports(2)
    ]
    olds = spawn([(f"old{index}", config, env) for index, config in enumerate(configs)])
    try:
        call_all(olds, "worker:start_node")
        call_all(olds, "worker:wait_connected", timeout=45, peers=1, timeout_s=15)
        old = olds[0]
        for _ in range(args.rounds):
            old.call("join_latency:set_probe")
            spawned = time.monotonic()
            newcomer = Worker(
                "newcomer", {"BIND": "127.0.0.1", "PORT": 0, "PEERS": [], **TIMING}, env
            )
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
    print(f"join latency over {args.rounds} rounds ({args.database} peer table, 2 old peers):")
    print(summary("node start -> applied", from_node))
    print(summary("spawn -> applied", from_spawn))


if __name__ == "__main__":
    main()
