"""The host's own costs that bound every latency here: measured first, reported with the machine.

On a virtual machine, waking a thread (a futex wake, an inter-processor interrupt) and running
code whose caches went cold during a short sleep can cost far more than on bare metal; every
message path in these benchmarks pays for a few such wake-ups.
"""

from __future__ import annotations

import pickle
import random
import threading
import time

from benchmarks.common import Distribution, Table, fmt_us, median
from harness import free_ports

PAYLOAD = {"id": 42, "name": "Ada Lovelace", "roles": ["admin", "editor"], "score": 3.14}


def _pause() -> None:
    time.sleep(random.uniform(0.001, 0.002))


def thread_wakeup(samples: int) -> list[float]:
    """µs from ``Event.set()`` in one thread to the waiting thread running."""
    event, woke = threading.Event(), []

    def waiter() -> None:
        for _ in range(samples):
            event.wait()
            event.clear()
            woke.append(time.monotonic_ns())

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    sent = []
    for _ in range(samples):
        _pause()
        sent.append(time.monotonic_ns())
        event.set()
        while len(woke) < len(sent) and thread.is_alive():
            time.sleep(0.0001)
    thread.join(5)
    return [(w - s) / 1000 for s, w in zip(sent, woke, strict=False)]


def nng_delivery(samples: int) -> list[float]:
    """µs from ``send()`` on one Bus0 socket to a thread of the same process receiving it."""
    import pynng

    (port,) = free_ports(1)
    address = f"tcp://127.0.0.1:{port}"
    received: list[int] = []
    with pynng.Bus0(recv_timeout=2000) as server, pynng.Bus0() as client:
        server.listen(address)
        client.dial(address, block=True)
        time.sleep(0.1)

        def receive() -> None:
            try:
                for _ in range(samples):
                    server.recv()
                    received.append(time.monotonic_ns())
            except pynng.NNGException:
                return

        thread = threading.Thread(target=receive, daemon=True)
        thread.start()
        sent = []
        for _ in range(samples):
            _pause()
            sent.append(time.monotonic_ns())
            client.send(b"k" * 60)
        thread.join(5)
    return [(r - s) / 1000 for s, r in zip(sent, received, strict=False)]


def cold_and_hot(samples: int) -> tuple[float, float]:
    """µs of one pickle round trip of a small dict: in a tight loop, and alone after a sleep."""
    data = pickle.dumps(PAYLOAD)
    started = time.perf_counter_ns()
    for _ in range(10_000):
        pickle.loads(data)
    hot = (time.perf_counter_ns() - started) / 10_000 / 1000
    cold = []
    for _ in range(samples):
        _pause()
        started = time.perf_counter_ns()
        pickle.loads(data)
        cold.append((time.perf_counter_ns() - started) / 1000)
    return hot, median(cold)


def calibrate(quick: bool) -> Table:
    samples = 100 if quick else 300
    table = Table("Host calibration (this process, median / p99)", ["what", "p50", "p99"])
    wake = Distribution.of(thread_wakeup(samples))
    table.add(
        "thread wake-up: Event.set() → the waiting thread runs", fmt_us(wake.p50), fmt_us(wake.p99)
    )
    nng = Distribution.of(nng_delivery(samples))
    table.add(
        "raw nng Bus0 send → receiving thread, same process", fmt_us(nng.p50), fmt_us(nng.p99)
    )
    hot, cold = cold_and_hot(samples)
    table.add("pickle.loads of a small dict in a loop", fmt_us(hot), "")
    table.add("the same call alone, 1-2 ms after the previous", fmt_us(cold), "")
    table.notes.append(
        "Every message path below pays several thread wake-ups; a call made alone pays cold "
        "CPU caches. Both are properties of this host, not of the code measured."
    )
    return table
