"""Benchmark worker processes: spawned, driven with a deadline on every call, always reaped.

A :class:`Worker` is a :class:`harness.process.JsonLinesProcess` (the harness the test suite's
processes use too): a call that does not answer in time kills its worker and raises
:class:`WorkerError`, so a benchmark ends even when a process hangs.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from typing import Any

from harness import free_ports
from harness.process import JsonLinesProcess, ProcessError

# Every worker still alive, so that the run can kill them all whatever happened.
_alive: set[Worker] = set()

# What a worker raises: the harness's error, under the name the benchmarks catch.
WorkerError = ProcessError


def environ() -> dict[str, str]:
    """This process's environment less every ``WARPMESH_*`` variable: what a process of a
    benchmark starts from, so that the parent's environment cannot change its settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("WARPMESH_")}


class Worker(JsonLinesProcess):
    """One ``python -m benchmarks.worker`` process.

    ``warpmesh`` is its ``WARPMESH`` setting; ``env`` is added to its environment (after every
    ``WARPMESH_*`` variable of ours is removed, so the parent's environment cannot change it).
    ``prefix`` runs it (a network namespace's ``ip netns exec NAME``, :mod:`harness.netns`).
    Started when made; :meth:`wait_hello` (or the first call) waits for it to have started, so
    that several workers can start at once.
    """

    def __init__(
        self,
        name: str,
        warpmesh: dict[str, Any],
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.warpmesh = warpmesh
        self.env = env
        full_env = environ()
        full_env.update(
            {
                "DJANGO_SETTINGS_MODULE": "benchmarks.settings",
                "BENCH_WARPMESH_JSON": json.dumps(warpmesh),
                "PYTHONUNBUFFERED": "1",
                **(env or {}),  # which may name other settings (benchmarks.settings_cachalot)
            }
        )
        # CLOCK_MONOTONIC, as the worker stamps its hello: one clock for every process here.
        self.spawned_ns = time.monotonic_ns()
        self.hello_ns = 0  # when the worker said hello: Python and Django started
        self.connected_ns = 0  # when its node first had every peer of its fleet (mesh_fleet)
        # A minute for what is not given a timeout of its own (the hello: Python and Django
        # start-up, on a machine busy with a whole fleet doing the same).
        super().__init__("benchmarks.worker", full_env, name=name, timeout=60.0, prefix=prefix)
        _alive.add(self)

    def wait_hello(self, timeout: float | None = None) -> dict[str, Any]:
        hello = super().wait_hello(timeout)
        if not self.hello_ns:
            self.hello_ns = int(hello.get("at_ns") or time.monotonic_ns())
        return hello

    def call(self, function: str, timeout: float = 60.0, **kwargs: Any) -> Any:
        """Run ``benchmarks.<module>:<function>`` in the worker and return its result."""
        self.submit(function, **kwargs)
        return self.result(timeout)

    def submit(self, function: str, **kwargs: Any) -> None:
        """Start ``benchmarks.<module>:<function>`` in the worker; :meth:`result` waits for it
        (so that several workers can run a call at the same time)."""
        self.wait_hello()
        self.send({"call": f"benchmarks.{function}", "kwargs": kwargs})

    def result(self, timeout: float = 60.0) -> Any:
        """The result of the call :meth:`submit` started."""
        return self.answer(timeout)

    def leave(self, timeout: float = 10.0) -> tuple[float, float]:
        """Exit through the worker's normal path: ``stop_node()`` (what ``atexit`` runs), then
        the interpreter's own exit. Returns the seconds until ``stop_node()`` had returned and
        until the process was gone (its stdout closed); :meth:`close` cleans up after."""
        self.wait_hello()
        started = time.monotonic()
        deadline = started + timeout
        self.send({"call": "exit"})
        self.receive(deadline - time.monotonic())
        stopped = time.monotonic() - started
        self.wait_eof(deadline)
        gone = time.monotonic() - started
        self.proc.wait(max(0.0, deadline - time.monotonic()))
        return stopped, gone

    def close(self, timeout: float = 5.0) -> None:
        """Ask the worker to stop its node and exit; kill it if it does not within ``timeout``."""
        try:
            super().close(timeout)
        finally:
            _alive.discard(self)


def close_all(workers: Sequence[Worker] | set[Worker], timeout: float = 10.0) -> None:
    """Ask every worker to exit at once, then reap each; kill those not gone in ``timeout``.

    At once: a node's exit waits (up to 2 s) for its peers to acknowledge its goodbye, so one by
    one a fleet of 64 took half a minute to end.
    """
    workers = list(workers)
    for worker in workers:
        worker.ask_exit()
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.close(max(0.0, deadline - time.monotonic()))


def call_all(
    workers: Sequence[Worker], function: str, timeout: float = 60.0, **kwargs: Any
) -> list[Any]:
    """Run the same call in every worker at the same time; the results, in order."""
    for worker in workers:
        worker.submit(function, **kwargs)
    deadline = time.monotonic() + timeout
    return [worker.result(max(0.0, deadline - time.monotonic())) for worker in workers]


def kill_everything() -> None:
    """Last resort at the end of a run: no worker outlives the benchmark."""
    for worker in list(_alive):
        worker.kill()
        _alive.discard(worker)


def spawn(
    specs: Sequence[tuple[str, dict[str, Any], dict[str, str] | None]],
    timeout: float = 60.0,
    prefixes: Sequence[Sequence[str]] = (),
) -> list[Worker]:
    """Start several workers at once (their Django start-ups overlap), then wait for each, all
    within ``timeout``. ``prefixes``: what runs each (see :class:`Worker`), if not ().
    """
    workers: list[Worker] = []
    try:
        for index, (name, warpmesh, env) in enumerate(specs):
            prefix = prefixes[index] if index < len(prefixes) else ()
            workers.append(Worker(name, warpmesh, env, prefix))
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.wait_hello(max(0.0, deadline - time.monotonic()))
    except BaseException:
        close_all(workers)
        raise
    return workers


def alone_config() -> dict[str, Any]:
    """A real, started mesh node that knows no other peer (its only listed peer is itself)."""
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    return {"BIND": "127.0.0.1", "PORT": port, "PORT_RANGE": 1, "PEERS": [address]}


@contextlib.contextmanager
def mesh_fleet(
    size: int,
    env: dict[str, str] | None = None,
    connect_timeout: float = 60.0,
    start_timeout: float = 60.0,
    transport: str = "nng",
    **warpmesh: Any,
) -> Iterator[list[Worker]]:
    """``size`` workers on 127.0.0.1, each connected to all the others, and ready.

    ``transport`` is their ``WARPMESH["TRANSPORT"]``: with ``"nng"`` each listens on a port of
    its own and lists every other's address in ``PEERS``; with a broker (a ``nats://`` or
    ``postgresql://`` URL) none listens or dials, and connected means subscribed to the broker
    (the node's transport link up) and every other node heard (its heartbeats, through the
    broker). Every process starts at once and says hello within ``start_timeout``; then every
    node starts at once, and each is connected to all the others within ``connect_timeout``.
    Each worker keeps when it was spawned, said hello and was connected (``spawned_ns``,
    ``hello_ns``, ``connected_ns``).
    """
    if transport == "nng":
        ports = free_ports(size)
        addresses = [f"127.0.0.1:{port}" for port in ports]
        configs = [
            {"BIND": "127.0.0.1", "PORT": port, "PORT_RANGE": 1, "PEERS": addresses}
            for port in ports
        ]
    else:
        # A secret of the fleet's own: a channel of its own on the broker (named after the frame
        # key), so no other fleet's frames (another run, a test suite's) reach it.
        configs = [{"TRANSPORT": transport, "SECRET": secrets.token_hex(16)}] * size
    specs = [(f"node{index}", {**config, **warpmesh}, env) for index, config in enumerate(configs)]
    workers = spawn(specs, start_timeout)
    try:
        # Every node at once, as a fleet deployed together starts serving together; one by one,
        # the first nodes would dial peers not listening yet and the last would start late.
        for worker, started in zip(workers, call_all(workers, "worker:start_node"), strict=True):
            if not started["enabled"]:
                raise WorkerError(f"{worker.name}: the mesh did not start: {worker.stderr_tail()}")
        # Each worker watches its own node and stamps the moment it has every peer: no round
        # trips through the pipes, so no waiting on 64 processes in turn for a core.
        connected = call_all(
            workers,
            "worker:wait_connected",
            timeout=connect_timeout + 30,
            peers=size - 1,
            timeout_s=connect_timeout,
        )
        for worker, at_ns in zip(workers, connected, strict=True):
            worker.connected_ns = at_ns
        yield workers
    finally:
        close_all(workers)
