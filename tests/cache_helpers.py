"""What the MeshCache API tests share (tests/test_cache_*.py); their fixtures ``clock`` and
``node`` are in conftest.py.

The mesh is disabled in the test settings, so the node is a ``NullNode``; the tests about what
is published install a :class:`RecordingNode` where ``django_warpmesh.node.get_node()`` finds it
(the ``node`` fixture).
"""

from __future__ import annotations

import itertools
import pickle
from collections.abc import Callable
from typing import Any

from django.core.cache.backends.locmem import LocMemCache

from django_warpmesh.cache import MeshCache
from django_warpmesh.node import coalesce
from django_warpmesh.protocol import Op, OpCode, digest

START = 1_700_000_000.0
_names = itertools.count()


def unique_location(label: str) -> str:
    return f"test-cache-{label}-{next(_names)}"


class Clock:
    """``time.time`` for the cache modules: frozen until a test advances it."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def snapshot(cache: LocMemCache) -> dict[str, Any]:
    """Everything a LocMemCache keeps for its name, in LRU order (most recent first)."""
    with cache._lock:
        return {
            "entries": [
                (key, pickle.loads(pickled), cache._expire_info.get(key, "MISSING"))
                for key, pickled in cache._cache.items()
            ],
            "expire_keys": sorted(cache._expire_info),
        }


def outcome(func: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    try:
        return ("ok", func(*args, **kwargs))
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


def mesh(params: dict[str, Any] | None = None) -> MeshCache:
    return MeshCache(unique_location("mesh"), dict(params or {}))


class RecordingNode:
    """Stands in for the process's node (``django_warpmesh.node.process._current``)."""

    enabled = True

    def __init__(self, *, ready: bool = True, max_timeout: float | None = None) -> None:
        self.ready = ready
        self.max_timeout = max_timeout
        self.published: list[tuple[str, OpCode, Any]] = []
        self.stores: dict[str, Any] = {}
        self.stored_at_publish: list[dict[str, bytes]] = []
        self.cache: MeshCache | None = None
        self.deliveries = 0
        self.delivered_while_locked = False

    def register_store(self, name: str, store: Any) -> None:
        self.stores[name] = store

    def publish(self, alias: str, code: OpCode, arg: Any) -> None:
        self.published.append((alias, code, arg))
        store = self.stores.get(alias)
        self.stored_at_publish.append(dict(store.cache) if store is not None else {})

    def deliver(self) -> None:
        self.deliveries += 1
        # A send may release the GIL: holding a store's lock meanwhile would stall its readers.
        self.delivered_while_locked |= any(store.lock.locked() for store in self.stores.values())

    def take(self) -> list[tuple[str, OpCode, Any]]:
        published, self.published = self.published, []
        self.stored_at_publish = []
        return published


def assert_value_published(
    cache: MeshCache, published: tuple[str, OpCode, Any], key: str, value: Any
) -> None:
    alias, code, (published_key, pickled) = published
    assert (alias, code, published_key) == (cache._location, OpCode.DELETE_UNLESS, key)
    stored = cache._store.cache[key]
    assert pickled == stored
    assert pickle.loads(pickled) == value
    # What peers receive after coalescing: the digest of exactly the bytes we hold.
    assert coalesce([published], set()) == [
        Op(cache._location, OpCode.DELETE_UNLESS, [[key, digest(stored)]])
    ]


def invalidating(cache: MeshCache, ops: list[Op], value: Any = "computed") -> Callable[[], Any]:
    def compute() -> Any:
        cache._store.apply(ops)  # as the node's receiver thread would, mid-computation
        return value

    return compute
