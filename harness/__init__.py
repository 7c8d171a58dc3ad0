"""The process harness the test suite and the benchmarks share (not shipped: only
``django_warpmesh*`` goes into the wheel).

- here: the repository's root, free loopback ports, and polling with a deadline;
- :mod:`harness.process`: the parent's side of a Python process driven by JSON lines
  (``tests.cluster.MeshProcess``, ``benchmarks.procs.Worker``);
- :mod:`harness.serve`: the child's side, the request loop (``tests.meshproc``,
  ``benchmarks.worker``);
- :mod:`harness.junk`: strangers spraying junk at a mesh port.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

# The processes are started with ``python -m <module>`` from here, so that the repository's
# packages (tests, benchmarks, harness) import whatever the caller's working directory.
ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports of 127.0.0.1 that nothing listened on a moment ago.

    All bound at once before any is closed, so the kernel cannot hand out the same port twice.
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.01,
    message: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def stays(
    predicate: Callable[[], object], seconds: float, interval: float = 0.05, message: str = ""
) -> None:
    """Poll ``predicate`` for ``seconds``; fail as soon as it is falsy (an event that must not
    happen within a window, such as a peer declared lost after its liveness timeout)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():
            raise AssertionError(f"no longer true: {message or predicate}")
        time.sleep(interval)
