"""The same job done four ways, in a worker process: a writer changes a key in its local cache and
announces it, every other process removes the key from its local cache. Each receiver notes, in its
own process, when the key went.

- ``mesh``: ``MeshCache.set`` on the writer; the node's receiver thread applies the invalidation
  (through :class:`benchmarks.probes.InstrumentedStore`).
- ``nng``: the floor: a raw pynng ``Bus0`` full mesh like the node's (every process listens and
  dials every other), the key as the whole message.
- ``redis``: Redis Pub/Sub with redis-py, one subscriber thread per process.
- ``nats``: core NATS with nats-py, the client's asyncio loop on a thread of its own.

The three baselines are what one would build with each transport to keep Django's own
``LocMemCache`` coherent: the writer's ``LocMemCache.set`` then a publish of the key; a receiving
thread's ``LocMemCache.delete`` of it. So every system pays the same local cache work, and what
differs is the message path. Every process subscribes in the pub/sub cases (as every instance of
an application would), so the writer also receives its own messages there.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import threading
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.probes import Probe, instrument

NNG_BUFFER = 8192
LOCAL_ALIAS = "locmem"  # the baselines' local cache: Django's LocMemCache


class Transport:
    """Base of the baselines: Django's ``LocMemCache``, kept coherent by announcing each key."""

    def __init__(self) -> None:
        from django.core.cache import caches

        self.probe = Probe()
        self.cache = caches[LOCAL_ALIAS]

    def arm(self, keys: Sequence[str]) -> None:
        self.cache.set_many(dict.fromkeys(keys, "old"), None)
        self.probe.arm(keys)

    def received(self, key: str) -> None:
        if self.cache.delete(key):
            self.probe.record([key], time.monotonic_ns())

    def publish(self, key: str) -> None:
        self.cache.set(key, "new", None)
        self.announce(key)

    def announce(self, key: str) -> None:
        raise NotImplementedError

    def write(self, keys: Sequence[str], gaps: Sequence[float]) -> list[int]:
        """Publish each key, ``gaps[i]`` seconds apart; the time just before each publish."""
        sent = []
        for key, gap in zip(keys, gaps, strict=True):
            sent.append(time.monotonic_ns())
            self.publish(key)
            time.sleep(gap)
        return sent

    def wait(self, keys: Sequence[str], timeout: float) -> dict[str, int | None]:
        return self.probe.wait(keys, timeout)

    def close(self) -> None:
        pass


class MeshTransport(Transport):
    def __init__(self, alias: str = "mesh") -> None:
        from django.core.cache import caches

        from django_warpmesh.cache import get_store

        super().__init__()
        self.cache = caches[alias]
        self.store = get_store(self.cache._location)  # type: ignore[attr-defined]
        self.probe, self.meter = instrument(alias)
        self.old = pickle.dumps("old")

    def _full(self, keys: Sequence[str]) -> list[str]:
        return [self.cache.make_key(key) for key in keys]

    def arm(self, keys: Sequence[str]) -> None:
        # Stored here only, as if filled from the database: nothing is broadcast.
        full = self._full(keys)
        with self.store.lock:
            for key in full:
                self.store.put(key, self.old, None, 10**9, 3)
        self.probe.arm(full)

    def publish(self, key: str) -> None:
        self.cache.set(key, "new", None)

    def wait(self, keys: Sequence[str], timeout: float) -> dict[str, int | None]:
        gone = self.probe.wait(self._full(keys), timeout)
        return dict(zip(keys, gone.values(), strict=True))


class NngTransport(Transport):
    def __init__(self, address: str, peers: Sequence[str]) -> None:
        import pynng

        super().__init__()
        self.socket = pynng.Bus0(recv_buffer_size=NNG_BUFFER, send_buffer_size=NNG_BUFFER)
        self.socket.recv_timeout = 100
        self.socket.listen(f"tcp://{address}")
        for peer in peers:
            if peer != address:
                self.socket.dial(f"tcp://{peer}", block=False)
        self.running = True
        self.thread = threading.Thread(target=self._receive, name="nng-bench", daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        import pynng

        while self.running:
            try:
                data = self.socket.recv()
            except pynng.Timeout:
                continue
            except pynng.Closed:
                return
            self.received(data.decode())

    def announce(self, key: str) -> None:
        self.socket.send(key.encode())

    def close(self) -> None:
        self.running = False
        self.socket.close()
        self.thread.join(2)


class RedisTransport(Transport):
    def __init__(self, channel: str, url: str) -> None:
        import redis

        super().__init__()
        self.channel = channel
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self.pubsub.subscribe(**{channel: self._on_message})
        self.thread = self.pubsub.run_in_thread(sleep_time=0.1, daemon=True)

    def _on_message(self, message: dict[str, Any]) -> None:
        self.received(message["data"].decode())

    def announce(self, key: str) -> None:
        self.client.publish(self.channel, key)

    def close(self) -> None:
        self.thread.stop()
        self.thread.join(2)
        self.pubsub.close()
        self.client.close()


class NatsTransport(Transport):
    def __init__(self, subject: str, url: str) -> None:
        super().__init__()
        self.subject = subject
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="nats-bench", daemon=True)
        self.thread.start()
        self.client: Any = self._run(self._connect(url), timeout=10)

    def _run(self, coroutine: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _connect(self, url: str) -> Any:
        import nats

        client = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)

        async def on_message(message: Any) -> None:
            self.received(message.data.decode())

        await client.subscribe(self.subject, cb=on_message)
        await client.flush()
        return client

    def announce(self, key: str) -> None:
        self._run(self.client.publish(self.subject, key.encode()), timeout=5)

    def write(self, keys: Sequence[str], gaps: Sequence[float]) -> list[int]:
        # nats-py is asyncio: publish from its own loop, as an application using it would.
        async def rounds() -> list[int]:
            sent = []
            for key, gap in zip(keys, gaps, strict=True):
                sent.append(time.monotonic_ns())
                self.cache.set(key, "new", None)
                await self.client.publish(self.subject, key.encode())
                await asyncio.sleep(gap)
            return sent

        return self._run(rounds(), timeout=60 + sum(gaps) * 2)  # type: ignore[no-any-return]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self.client.close(), timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(2)


# -- the calls the parent makes in each worker ---------------------------------------------------

_open: dict[str, Transport] = {}


def open_transport(system: str, **config: Any) -> None:
    if system in _open:
        return
    factories = {
        "mesh": MeshTransport,
        "nng": NngTransport,
        "redis": RedisTransport,
        "nats": NatsTransport,
    }
    _open[system] = factories[system](**config)


def arm(system: str, keys: list[str]) -> None:
    _open[system].arm(keys)


def write(system: str, keys: list[str], gaps: list[float]) -> list[int]:
    return _open[system].write(keys, gaps)


def wait(system: str, keys: list[str], within: float) -> dict[str, int | None]:
    """When each key went on this process (None: still here after ``within`` seconds)."""
    return _open[system].wait(keys, within)


def close_transport(system: str) -> None:
    transport = _open.pop(system, None)
    if transport is not None:
        transport.close()


def meter(alias: str = "mesh", reset: bool = False) -> dict[str, int]:
    _, store_meter = instrument(alias)
    snapshot = store_meter.snapshot()
    if reset:
        store_meter.reset()
    return snapshot
