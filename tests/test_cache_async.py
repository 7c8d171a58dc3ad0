"""MeshCache's async twins: native coroutines that never suspend nor hop to a thread, with the
sync API's results, storage, publishing and fill race.
"""

from __future__ import annotations

import asyncio
import inspect
import pickle
import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.core.cache.backends import base as cache_base
from django.core.cache.backends.base import BaseCache
from django.core.cache.backends.locmem import LocMemCache

from django_warpmesh.cache import MeshCache
from django_warpmesh.protocol import Op, OpCode
from tests.cache_helpers import (
    START,
    Clock,
    RecordingNode,
    invalidating,
    mesh,
    snapshot,
    unique_location,
)

# -- async twins ---------------------------------------------------------------------------------

ASYNC_TWINS = sorted(
    name
    for name, member in vars(BaseCache).items()
    if name.startswith("a") and inspect.iscoroutinefunction(member)
)


def test_async_twin_list_is_complete() -> None:
    assert set(ASYNC_TWINS) == {
        "aadd",
        "aclear",
        "aclose",
        "adecr",
        "adecr_version",
        "adelete",
        "adelete_many",
        "aget",
        "aget_many",
        "aget_or_set",
        "ahas_key",
        "aincr",
        "aincr_version",
        "aset",
        "aset_many",
        "atouch",
    }


@pytest.mark.parametrize("name", [*ASYNC_TWINS, "adelete_pattern"])
def test_every_async_twin_is_a_native_coroutine_of_meshcache(name: str) -> None:
    assert name in vars(MeshCache), f"{name} falls back to BaseCache (sync_to_async)"
    assert inspect.iscoroutinefunction(getattr(MeshCache, name))
    assert hasattr(MeshCache, name[1:])


class Api:
    """One scenario, either API: ``await api.get(...)`` is ``aget`` or a wrapped ``get``."""

    def __init__(self, cache: LocMemCache, mode: str) -> None:
        self.cache = cache
        self.mode = mode
        self.states: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if self.mode == "async":
            return getattr(self.cache, "a" + name)  # type: ignore[no-any-return]
        method = getattr(self.cache, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return method(*args, **kwargs)

        return call

    def state(self) -> None:
        self.states.append(snapshot(self.cache))


async def attempt(call: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    try:
        return ("ok", await call(*args, **kwargs))
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


async def async_scenario(api: Api, clock: Clock) -> list[Any]:
    results = [
        await api.get("a"),
        await api.set("a", 1),
        await api.add("a", 2),
        await api.add("b", 2, timeout=10),
        await api.get("a"),
        await api.get("zz", "fallback"),
        await api.get("zz", default="kw"),
        await api.has_key("a"),
        await api.has_key("zz"),
        await api.set_many({"c": 3, "d": 4}),
        await api.get_many(["a", "c", "d", "zz"]),
        await api.incr("c"),
        await api.incr("c", 10),
        await api.decr("d"),
        await api.decr("d", 5),
        await attempt(api.incr, "zz"),
        await attempt(api.decr, "zz", 2),
        await api.touch("b", 100),
        await api.touch("zz"),
        await api.get_or_set("e", 5),
        await api.get_or_set("e", 6),
        await api.get_or_set("f", lambda: [1, 2]),
        await api.get_or_set("g", None),
        await api.get_or_set("g", "not none"),
        await api.get_or_set("h", "zero", 0),
        await api.incr_version("a"),
        await api.get("a"),
        await api.get("a", version=2),
        await api.decr_version("a", version=2),
        await attempt(api.incr_version, "zz"),
        await attempt(api.decr_version, "zz"),
        await api.set("v", "x", version=5),
        await api.has_key("v", version=5),
        await api.get_many(["v"], version=5),
    ]
    api.state()
    clock.advance(50)
    results += [
        await api.get_many(["a", "b", "c", "d", "e", "f", "g", "h"]),
        await api.delete("a"),
        await api.delete("a"),
        await api.delete_many(["c", "zz"]),
        await api.delete_many([]),
        await api.get_many(["c", "d"]),
        await api.close(),
        await api.get("d"),
        await api.set_many({"t": 1}, 1),
    ]
    api.state()
    clock.advance(1)
    results += [
        await api.get("t", "expired"),
        await api.clear(),
        await api.get_many(["b", "d", "e", "f", "g", "v"]),
    ]
    api.state()
    return results


def run_async_scenario(backend: type[LocMemCache], mode: str, clock: Clock) -> tuple[Any, Any]:
    clock.now = START
    api = Api(backend(unique_location(f"{backend.__name__}-{mode}"), {}), mode)
    results = asyncio.run(async_scenario(api, clock))
    return results, api.states


def test_async_twins_behave_like_the_sync_api(clock: Clock) -> None:
    mesh_async = run_async_scenario(MeshCache, "async", clock)
    mesh_sync = run_async_scenario(MeshCache, "sync", clock)
    locmem_sync = run_async_scenario(LocMemCache, "sync", clock)
    locmem_async = run_async_scenario(LocMemCache, "async", clock)
    # Same results and same storage (values, expiry, LRU order) as the sync API of both.
    assert mesh_async == mesh_sync == locmem_sync

    # Same results as Django's own (thread-hopping) async API, but for three things where
    # BaseCache's generic twins differ from LocMemCache's sync methods and MeshCache keeps the
    # sync semantics: aincr/adecr re-set with the default timeout, ahas_key refreshes the LRU
    # order, and aincr's "not found" message names the key unprefixed.
    def exception_types(results: list[Any]) -> list[Any]:
        return [r[:2] if isinstance(r, tuple) and r[:1] == ("raised",) else r for r in results]

    assert exception_types(mesh_async[0]) == exception_types(locmem_async[0])
    results = mesh_async[0]
    assert results[:9] == [None, None, False, True, 1, "fallback", "kw", True, False]
    assert results[10] == {"a": 1, "c": 3, "d": 4}
    assert results[11:17] == [
        4,
        14,
        3,
        -2,
        ("raised", "ValueError", "Key ':1:zz' not found"),
        ("raised", "ValueError", "Key ':1:zz' not found"),
    ]
    assert results[17:25] == [True, False, 5, 5, [1, 2], None, None, "zero"]
    assert results[25:31] == [
        2,
        None,
        1,
        1,
        ("raised", "ValueError", "Key 'zz' not found"),
        ("raised", "ValueError", "Key 'zz' not found"),
    ]
    assert results[32:34] == [True, {"v": "x"}]
    assert results[34] == {"a": 1, "b": 2, "c": 14, "d": -2, "e": 5, "f": [1, 2], "g": None}
    assert results[35:41] == [True, False, None, None, {"d": -2}, None]
    assert results[41] == -2
    assert results[43:] == ["expired", None, {}]


def test_async_incr_keeps_the_expiry_and_ahas_key_keeps_the_order(clock: Clock) -> None:
    cache = mesh()

    async def scenario() -> None:
        await cache.aset("n", 1, 10)
        await cache.aset("other", 1)
        assert await cache.ahas_key("n")
        assert list(cache._cache) == [":1:other", ":1:n"]
        assert await cache.aincr("n", 2) == 3
        assert await cache.adecr("n") == 2
        assert cache._expire_info[":1:n"] == START + 10
        assert list(cache._cache) == [":1:n", ":1:other"]

    asyncio.run(scenario())
    clock.advance(10)
    assert cache.get("n") is None


def test_async_twins_never_suspend(clock: Clock) -> None:
    """Each coroutine completes on its first step: no await on a thread pool, no event loop."""
    cache = mesh()
    cache.set_many({"k": 1, "n": 5, "v": "x", "p:1": 1})
    calls: list[tuple[str, tuple[Any, ...]]] = [
        ("aget", ("k",)),
        ("aset", ("s", 1)),
        ("aadd", ("new", 1)),
        ("atouch", ("k", 50)),
        ("ahas_key", ("k",)),
        ("aget_many", (["k", "s"],)),
        ("aset_many", ({"m1": 1, "m2": 2},)),
        ("aincr", ("n",)),
        ("adecr", ("n", 3)),
        ("aget_or_set", ("gs", lambda: "computed")),
        ("aincr_version", ("v",)),
        ("adecr_version", ("v", 1, 2)),
        ("adelete", ("s",)),
        ("adelete_many", (["m1", "m2"],)),
        ("adelete_pattern", ("p:*",)),
        ("aclose", ()),
        ("aclear", ()),
    ]
    assert {name for name, _ in calls} == {*ASYNC_TWINS, "adelete_pattern"}
    results = {}
    for name, args in calls:
        coroutine = getattr(cache, name)(*args)
        assert inspect.iscoroutine(coroutine)
        try:
            coroutine.send(None)
        except StopIteration as stop:
            results[name] = stop.value
        else:
            coroutine.close()
            pytest.fail(f"{name} suspended")
    assert results == {
        "aget": 1,
        "aset": None,
        "aadd": True,
        "atouch": True,
        "ahas_key": True,
        "aget_many": {"k": 1, "s": 1},
        "aset_many": [],
        "aincr": 6,
        "adecr": 3,
        "aget_or_set": "computed",
        "aincr_version": 2,
        "adecr_version": 1,
        "adelete": True,
        "adelete_many": None,
        "adelete_pattern": 1,
        "aclose": None,
        "aclear": None,
    }
    assert dict(cache._cache) == {}


class RecordingLock:
    """Wraps a cache's lock; records the thread of every acquisition."""

    def __init__(self, lock: Any) -> None:
        self.lock = lock
        self.threads: list[int] = []

    def __enter__(self) -> Any:
        self.threads.append(threading.get_ident())
        return self.lock.__enter__()

    def __exit__(self, *exc: object) -> Any:
        return self.lock.__exit__(*exc)

    def _at_fork_reinit(self) -> None:
        # The store stays registered after the test: a fork in a later test resets it too.
        self.lock._at_fork_reinit()


def _probe(cache: LocMemCache) -> RecordingLock:
    probe = RecordingLock(cache._lock)
    cache._lock = probe  # type: ignore[assignment]
    if isinstance(cache, MeshCache):
        cache._store.lock = probe  # type: ignore[assignment]
    return probe


def test_async_twins_run_on_the_calling_thread(clock: Clock) -> None:
    async def every_twin(cache: Any) -> None:
        await cache.aset("k", 1)
        await cache.aadd("a", 1)
        await cache.aget("k")
        await cache.atouch("k")
        await cache.ahas_key("k")
        await cache.aset_many({"m": 1})
        await cache.aget_many(["k", "m"])
        await cache.aincr("k")
        await cache.adecr("k")
        await cache.aget_or_set("g", lambda: 1)
        await cache.aincr_version("k")
        await cache.adecr_version("k", version=2)
        await cache.adelete("k")
        await cache.adelete_many(["m"])
        await cache.adelete_pattern("*")
        await cache.aclose()
        await cache.aclear()

    cache = mesh()
    probe = _probe(cache)
    asyncio.run(every_twin(cache))
    assert len(probe.threads) >= 17
    assert set(probe.threads) == {threading.get_ident()}

    # The probe does see a thread hop: Django's LocMemCache.aget runs in sync_to_async.
    reference = LocMemCache(unique_location("l"), {})
    reference_probe = _probe(reference)
    asyncio.run(reference.aget("k"))
    assert reference_probe.threads
    assert threading.get_ident() not in reference_probe.threads


def test_async_twins_do_not_use_sync_to_async(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("sync_to_async used")

    monkeypatch.setattr(cache_base, "sync_to_async", forbidden)
    monkeypatch.setattr("asgiref.sync.sync_to_async", forbidden)

    async def use(cache: Any) -> list[Any]:
        await cache.aset("k", 1)
        return [
            await cache.aget("k"),
            await cache.aadd("k", 2),
            await cache.aincr("k"),
            await cache.aget_or_set("g", 3),
            await cache.ahas_key("g"),
            await cache.atouch("g"),
            await cache.adelete("g"),
            await cache.aclear(),
        ]

    assert asyncio.run(use(mesh())) == [1, False, 2, 3, True, True, True, None]
    with pytest.raises(AssertionError, match="sync_to_async used"):
        asyncio.run(use(LocMemCache(unique_location("l"), {})))


# -- the rest of what the sync API does: delete_pattern, publishing, the fill race, local writes --


def test_adelete_pattern_is_delete_pattern(clock: Clock) -> None:
    cache = mesh()
    cache.set_many({"a:1": 1, "a:2": 2, "b": 3})
    cache.set("a:3", 3, version=4)
    assert asyncio.run(cache.adelete_pattern("a:*")) == 2
    assert asyncio.run(cache.adelete_pattern("a:*", version=4)) == 1
    assert list(cache._cache) == [":1:b"]


def test_async_twins_publish_like_the_sync_api(node: RecordingNode, clock: Clock) -> None:
    cache = mesh()

    async def mutate() -> None:
        await cache.aset("k", 1)
        await cache.aadd("k", 2)  # fails: nothing
        await cache.aadd("a", 2)
        await cache.aset_many({"m": 3})
        await cache.aincr("k")
        await cache.adecr("k")
        await cache.atouch("k")  # nothing
        await cache.aget_or_set("g", 4)
        await cache.adelete("a")
        await cache.adelete_many(["m"])
        await cache.adelete_pattern("z*")
        await cache.aclear()

    asyncio.run(mutate())
    name = cache._location
    assert [
        (alias, code, arg if code is not OpCode.DELETE_UNLESS else arg[0])
        for alias, code, arg in node.published
    ] == [
        (name, OpCode.DELETE_UNLESS, ":1:k"),
        (name, OpCode.DELETE_UNLESS, ":1:a"),
        (name, OpCode.DELETE_UNLESS, ":1:m"),
        (name, OpCode.DELETE_UNLESS, ":1:k"),
        (name, OpCode.DELETE_UNLESS, ":1:k"),
        (name, OpCode.DELETE_UNLESS, ":1:g"),
        (name, OpCode.DELETE, [":1:a"]),
        (name, OpCode.DELETE, [":1:m"]),
        (name, OpCode.PATTERN, ":1:z*"),
        (name, OpCode.CLEAR, None),
    ]
    values = [
        pickle.loads(arg[1]) for _, code, arg in node.published if code is OpCode.DELETE_UNLESS
    ]
    assert values == [1, 2, 3, 2, 1, 4]


def test_aget_or_set_does_not_store_a_value_invalidated_while_computed(
    node: RecordingNode, clock: Clock
) -> None:
    cache = mesh()
    compute = invalidating(cache, [Op(cache._location, OpCode.DELETE, [":1:k"])])
    assert asyncio.run(cache.aget_or_set("k", compute)) == "computed"
    assert cache.has_key("k") is False
    assert node.published == []
    assert asyncio.run(cache.aget_or_set("k", "stored")) == "stored"
    assert cache.get("k") == "stored"


def test_async_twins_take_local_too(node: RecordingNode, clock: Clock) -> None:
    cache = mesh()
    asyncio.run(cache.aset("a", 1, local=True))
    asyncio.run(cache.aset_many({"b": 2}, local=True))
    assert asyncio.run(cache.aadd("c", 3, local=True)) is True
    assert node.published == []
    assert cache.get_many(["a", "b", "c"]) == {"a": 1, "b": 2, "c": 3}
