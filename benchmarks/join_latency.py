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
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.cluster import ROOT, MeshProcess, cluster, wait_for

TIMING = {"HEARTBEAT": 1.0, "DISCOVERY_INTERVAL": 5.0, "STALE_AFTER": 30.0}


def prepare(database: str) -> dict[str, str]:
    if database == "postgresql":
        env = {"WARPMESH_TEST_DB": "postgresql"}
    else:
        path = Path(tempfile.mkdtemp(prefix="warpmesh-join-")) / "peers.sqlite3"
        env = {"WARPMESH_TEST_DB": "sqlite", "WARPMESH_SQLITE_PATH": str(path)}
    subprocess.run(
        [sys.executable, "-m", "django", "migrate", "django_warpmesh", "-v0"],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", **env},
        check=True,
    )
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
    with cluster(2, discovery=True, env=env, **TIMING) as mesh:
        mesh.wait_connected()
        old = mesh.procs[0]
        for _ in range(args.rounds):
            old.cache("set", "probe", "old", None)
            spawned = time.perf_counter()
            newcomer = MeshProcess({"BIND": "127.0.0.1", "PORT": 0, "PEERS": [], **TIMING}, env=env)
            try:
                node_started = time.perf_counter()
                newcomer.request("start")
                newcomer.cache("delete", "probe")
                wait_for(lambda: not old.stored("probe"), 30, interval=0.0005, message="probe")
                done = time.perf_counter()
            finally:
                newcomer.close()
            from_node.append(done - node_started)
            from_spawn.append(done - spawned)
    print(f"join latency over {args.rounds} rounds ({args.database} peer table, 2 old peers):")
    print(summary("node start -> applied", from_node))
    print(summary("spawn -> applied", from_spawn))


if __name__ == "__main__":
    main()
