"""A benchmark worker: one Django process, driven by JSON lines on stdin.

Started by :class:`benchmarks.procs.Worker` as ``python -m benchmarks.worker``. Each request line
``{"call": "module:function", "kwargs": {...}}`` runs that function of a ``benchmarks`` module in
this process and gets one reply line ``{"ok": result}`` or ``{"error": "..."}`` (the harness's
loop, :func:`harness.serve.serve`). Every measurement happens in here; the pipes only carry
set-up and results.

The few calls every benchmark needs (start the node, is it connected, CPU and memory) live here.
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Any

from harness.serve import serve

# Where a node's snapshot may say how often it sends heartbeats (seconds): the period may grow
# with the mesh. Absent: the node does not say (HEARTBEAT, 1 s by default, is then its period).
HEARTBEAT_FIELDS = ("heartbeat_period", "heartbeat_s", "heartbeat_interval")


def start_node() -> dict[str, Any]:
    """Start this process's mesh node now (it would start on the first write anyway)."""
    from django_warpmesh import node as mesh_node

    node = mesh_node.get_node()
    return {"enabled": node.enabled, "address": getattr(node, "address", None)}


def mesh_status() -> dict[str, Any]:
    import django_warpmesh

    stats = django_warpmesh.mesh_stats()
    periods = (stats.get(name) for name in HEARTBEAT_FIELDS)
    transport = stats.get("transport") or {}
    return {
        "enabled": stats["enabled"],
        "ready": stats["ready"],
        "connected": sum(1 for peer in stats["peers"] if peer["connected"]),
        # The node's own link: nng's is always up; a broker's once subscribed.
        "link": bool(transport.get("connected", stats["enabled"])),
        "transport": transport,
        "heartbeat_period": next((p for p in periods if isinstance(p, int | float)), None),
        "counters": {
            name: value for name, value in stats.items() if isinstance(value, int) and name != "pid"
        },
    }


def wait_connected(peers: int, timeout_s: float, interval: float = 0.1) -> int:
    """When (``time.monotonic_ns()``) this node first had ``peers`` live peers, its transport's
    link up (a broker: subscribed) and was ready.

    Polled here, every ``interval``: a fleet's nodes watch themselves at the same time, and the
    polling costs a node a snapshot ten times a second, not a round trip through a pipe.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        status = mesh_status()
        now = time.monotonic_ns()
        if status["ready"] and status["link"] and status["connected"] >= peers:
            return now
        if time.monotonic() > deadline:
            error = status["transport"].get("last_error")
            raise TimeoutError(
                f"{status['connected']} of {peers} peers connected after {timeout_s:.0f} s"
                + ("" if status["ready"] else ", not ready")
                + ("" if status["link"] else f", transport link down ({error or 'no error'})")
            )
        time.sleep(interval)


def resources() -> dict[str, float]:
    """This process's CPU-seconds and RSS, and when (``time.monotonic()``) they were read."""
    from benchmarks.common import cpu_seconds, rss_bytes

    return {"cpu_s": cpu_seconds(), "rss": float(rss_bytes()), "at_s": time.monotonic()}


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")
    import django

    django.setup()
    from django.core.cache import caches

    # Instantiate every mesh cache now, as a web process would, so its store exists.
    for alias in ("mesh", "bulk"):
        caches[alias].get("warm-up")

    def handle(request: dict[str, Any]) -> Any:
        if request["call"] == "exit":  # answered, then serve() returns and the process exits
            from django_warpmesh import node as mesh_node

            mesh_node.stop_node()
            return True
        module_name, _, function_name = request["call"].rpartition(":")
        function = getattr(importlib.import_module(module_name), function_name)
        return function(**request.get("kwargs", {}))

    # Stamped on CLOCK_MONOTONIC, as the parent stamps the spawn: the start-up's length.
    serve(handle, {"at_ns": time.monotonic_ns()}, tracebacks=True)


if __name__ == "__main__":
    main()
