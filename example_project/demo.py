"""The django-warpmesh demo: three instances of a small catalogue site, one price change.

Run it with ``scripts/demo`` from the repository root (``scripts/demo --serve`` keeps the three
instances running for you to click around). It migrates one shared SQLite file (or the
PostgreSQL database of ``DATABASE_URL=postgres://user@host:port/name``), starts three Django
servers on 127.0.0.1, lets them find each other through the peer table, and narrates:

1. each instance serves a product from its own memory;
2. the price changes through instance A;
3. instances B and C serve the new price on their next request, and how long their stale copies
   survived is measured;
4. the same round many times, then ``manage.py mesh_status``.

It stops every process it started, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("A", "B", "C")
ROUNDS = int(os.environ.get("DEMO_ROUNDS", "200"))


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def wait_until(predicate: Any, timeout: float, what: str) -> float:
    started = time.perf_counter()
    while True:
        try:
            if predicate():
                return time.perf_counter() - started
        except OSError:
            pass  # not listening yet
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"gave up after {timeout:.0f}s waiting for {what}")
        time.sleep(0.001)


class Instance:
    """One ``runserver`` process of the example project, and an HTTP client for it."""

    def __init__(self, name: str, http_port: int, mesh_port: int, env: dict[str, str]) -> None:
        self.name = name
        self.base = f"http://127.0.0.1:{http_port}"
        self.log = Path(tempfile.gettempdir()) / f"warpmesh-demo-{name}.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "django",
                    "runserver",
                    "--noreload",
                    f"127.0.0.1:{http_port}",
                ],
                cwd=ROOT,
                env={
                    **env,
                    "DEMO_INSTANCE": name,
                    "WARPMESH_PORT": str(mesh_port),
                    "WARPMESH_PORT_RANGE": "1",
                },
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, **fields: str) -> Any:
        request = urllib.request.Request(
            self.base + path,
            data=urllib.parse.urlencode(fields).encode(),
            headers={"Accept": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def cached(self, pk: int) -> bool:
        return bool(self.get(f"/product/{pk}/cache-state")["cached"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # a clean exit: goodbye frame, row deleted
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def environment() -> dict[str, str]:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "example_project.settings"}
    if not os.environ.get("DATABASE_URL"):
        database = ROOT / "example_project" / "demo.sqlite3"
        # A fresh file: rows left by a run that was killed would be dialled until they go stale.
        database.unlink(missing_ok=True)
        env["DEMO_DATABASE"] = str(database)
    return env


def manage(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "django", *args],
        cwd=ROOT,
        env=env,
        check=False,
        capture_output=True,
        text=True,
    )
    if result.returncode not in (0, 1):
        raise SystemExit(f"manage.py {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description="Three instances, one price change, measured.")
    parser.add_argument("--serve", action="store_true", help="keep the instances running")
    args = parser.parse_args()

    env = environment()
    manage(env, "migrate", "-v0")
    print(f"Database migrated and seeded: {manage(env, 'seed_catalogue').strip()}.")
    http_ports, mesh_ports = free_ports(3), free_ports(3)
    instances: list[Instance] = []
    try:
        for name, http_port, mesh_port in zip(NAMES, http_ports, mesh_ports, strict=True):
            instances.append(Instance(name, http_port, mesh_port, env))
            print(
                f"  instance {name}: http://127.0.0.1:{http_port}/  "
                f"(pid {instances[-1].proc.pid}, mesh on port {mesh_port})"
            )
        for inst in instances:
            wait_until(lambda i=inst: i.get("/product/1/json"), 60, f"instance {inst.name}")

        def mesh_formed() -> bool:
            return all(
                sum(p["connected"] for p in inst.get("/warpmesh/api/stats")["peers"]) == 2
                for inst in instances
            )

        took = wait_until(mesh_formed, 30, "the instances to find each other")
        print(f"They found each other through the peer table ({took:.3f}s after the last was up).")
        if args.serve:
            serve(instances)
        else:
            narrate(instances)
            print("\n$ python manage.py mesh_status")
            print(manage(env, "mesh_status").rstrip())
    finally:
        for inst in instances:
            inst.stop()
    print("\nAll three instances stopped cleanly.")


def serve(instances: list[Instance]) -> None:
    print("\nServing; change a price on one instance and reload the page on another.")
    print(f"Dashboard: {instances[0].base}/warpmesh/   (Ctrl-C to stop)")
    try:
        while all(inst.proc.poll() is None for inst in instances):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass


def narrate(instances: list[Instance]) -> None:
    a, b, c = instances
    print("\n1. Every instance serves product 1, the second time from its own memory:")
    for inst in instances:
        inst.get("/product/1/json")
        card = inst.get("/product/1/json")
        print(
            f"   {inst.name}: {card['name']} at {card['price']} (from cache: {card['was_cached']})"
        )

    old = a.get("/product/1/json")["price"]
    new = f"{float(old) + 1:.2f}"
    print(f"\n2. The price changes on instance A: {old} -> {new}.")
    a.post("/product/1/price/", price=new)
    changed = time.perf_counter()
    for peer in (b, c):
        wait_until(lambda p=peer: not p.cached(1), 5, f"{peer.name} to drop its copy")
        gone = time.perf_counter() - changed
        print(f"   {peer.name} dropped its stale copy {gone * 1000:.2f} ms after A's response")

    print("\n3. Their next requests serve the new price, read again from the database:")
    for peer in (b, c):
        card = peer.get("/product/1/json")
        print(f"   {peer.name}: {card['price']} (from cache: {card['was_cached']})")

    print(f"\n4. The same round {ROUNDS} times (write on A, poll B and C until both dropped it):")
    samples = []
    for round_number in range(ROUNDS):
        for inst in (b, c):
            inst.get("/product/2/json")
        a.post("/product/2/price/", price=f"{10 + round_number}.00")
        changed = time.perf_counter()
        wait_until(lambda: not b.cached(2) and not c.cached(2), 5, "eviction")
        samples.append((time.perf_counter() - changed) * 1000)
    samples.sort()
    print(
        f"   write -> gone on both: median {statistics.median(samples):.2f} ms, "
        f"p99 {samples[int(len(samples) * 0.99) - 1]:.2f} ms, max {samples[-1]:.2f} ms"
    )
    print("   (an upper bound: each poll is an HTTP request to each instance)")
    stats = a.get("/warpmesh/api/stats")
    rtt = ", ".join(f"{p['address']} {p['latency_ms']} ms" for p in stats["peers"])
    print(f"   mesh latency measured by A's heartbeats: {rtt}")


if __name__ == "__main__":
    main()
