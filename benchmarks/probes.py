"""In-process instruments: when did a key go, how fast did the store apply. Run in the workers.

Times are ``time.monotonic_ns()``: CLOCK_MONOTONIC is one clock for every process of a Linux
host, so a writer's "just before the write" and a receiver's "key gone" compare directly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from django_warpmesh.protocol import Op, OpCode


class Probe:
    """Keys this process holds and waits to see removed, and when each one went."""

    def __init__(self) -> None:
        self.armed: set[str] = set()
        self.gone: dict[str, int] = {}
        self.changed = threading.Condition()

    def arm(self, keys: Sequence[str]) -> None:
        with self.changed:
            self.armed.update(keys)
            for key in keys:
                self.gone.pop(key, None)

    def record(self, keys: Sequence[str], now: int) -> None:
        with self.changed:
            for key in keys:
                if key in self.armed:
                    self.armed.discard(key)
                    self.gone[key] = now
            self.changed.notify_all()

    def wait(self, keys: Sequence[str], timeout: float) -> dict[str, int | None]:
        """When each key went (None: still here after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while any(key in self.armed for key in keys):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.changed.wait(remaining)
            return {key: self.gone.get(key) for key in keys}


def op_keys(op: Op) -> list[str]:
    """The keys an invalidation names (none for a clear or a pattern)."""
    if op.code is OpCode.DELETE:
        return list(op.args)
    if op.code is OpCode.DELETE_UNLESS:
        return [pair[0] for pair in op.args]
    return []


class Meter:
    """What a store applied: keys, CPU time spent inside ``apply``, first and last application
    (``time.monotonic_ns()``)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.keys = 0
        self.applies = 0
        self.apply_ns = 0
        self.first_ns = 0
        self.last_ns = 0
        self.flushes = 0

    def snapshot(self) -> dict[str, int]:
        return dict(vars(self))


class InstrumentedStore:
    """Wraps a cache's store as the node sees it: times ``apply`` and tells the probe what went.

    The node calls ``apply``/``flush`` on its receiver thread; the wrapper adds two clock reads
    and, when keys are armed, one set lookup per key, after the real store has done its work.
    """

    def __init__(self, store: Any, probe: Probe, meter: Meter) -> None:
        self.store = store
        self.probe = probe
        self.meter = meter

    def apply(self, ops: Sequence[Op]) -> None:
        started, cpu_started = time.monotonic_ns(), time.thread_time_ns()
        self.store.apply(ops)
        cpu_done, done = time.thread_time_ns(), time.monotonic_ns()
        meter = self.meter
        meter.applies += 1
        # CPU time of the applying thread: a wall clock would also count the moments this
        # process waited for a core (several processes share two here).
        meter.apply_ns += cpu_done - cpu_started
        meter.keys += sum(len(op.args) if isinstance(op.args, list) else 1 for op in ops)
        meter.first_ns = meter.first_ns or started
        meter.last_ns = done
        if self.probe.armed:
            cache = self.store.cache
            gone = [key for op in ops for key in op_keys(op) if key not in cache]
            self.probe.record(gone, done)

    def flush(self) -> None:
        self.store.flush()
        self.meter.flushes += 1
        self.probe.record(list(self.probe.armed), time.monotonic_ns())


_instruments: dict[str, tuple[Probe, Meter]] = {}


def instrument(alias: str) -> tuple[Probe, Meter]:
    """Put an :class:`InstrumentedStore` between this process's node and cache ``alias``."""
    if alias not in _instruments:
        from django.core.cache import caches

        from django_warpmesh import node as mesh_node
        from django_warpmesh.cache import get_store

        name = caches[alias]._location  # type: ignore[attr-defined]
        probe, meter = Probe(), Meter()
        mesh_node.get_node().register_store(name, InstrumentedStore(get_store(name), probe, meter))
        _instruments[alias] = (probe, meter)
    return _instruments[alias]
