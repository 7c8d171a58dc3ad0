"""MeshCache against Django's LocMemCache: the same API, the same results, in one process.

Most tests run one scenario on a real ``LocMemCache`` and on a ``MeshCache`` built from the same
params (distinct LOCATIONs, so they share no storage) under one fake clock, and require the same
trace of results *and* the same final storage (values, expiry times and LRU order). On top of
that they pin the expected values, so a behaviour both backends got wrong still fails. Last,
``delete_pattern``, the one method LocMemCache does not have (as django-redis has it).

What each operation tells the peers is in test_cache_publishing.py, the fill race in
test_cache_fill_race.py, the async twins in test_cache_async.py.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from django.core.cache.backends import base as cache_base
from django.core.cache.backends import locmem
from django.core.cache.backends.base import CacheKeyWarning
from django.core.cache.backends.locmem import LocMemCache

from django_warpmesh import cache as mesh_cache
from django_warpmesh import node as mesh_node
from django_warpmesh.cache import MeshCache
from tests.cache_helpers import (
    START,
    Clock,
    mesh,
    outcome,
    snapshot,
    unique_location,
)


def reversed_key_func(key: str, key_prefix: str, version: int) -> str:
    """A KEY_FUNCTION importable by dotted path."""
    return f"{version}|{key_prefix}|{key[::-1]}"


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


class Recorder:
    """Calls cache methods and logs (method, args, outcome); returns the value for assertions."""

    def __init__(self, cache: LocMemCache) -> None:
        self.cache = cache
        self.log: list[Any] = []

    def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "state":
            self.log.append(("state", snapshot(self.cache), None, None))
            return None
        result = outcome(getattr(self.cache, method), *args, **kwargs)
        # Callables differ per run (lambdas): log that there was one, not which.
        logged = ["<callable>" if callable(arg) else arg for arg in args]
        self.log.append((method, logged, sorted(kwargs.items()), result))
        return result[1] if result[0] == "ok" else result


BACKENDS: dict[str, type[LocMemCache]] = {"locmem": LocMemCache, "mesh": MeshCache}


@pytest.fixture
def conform(clock: Clock) -> Callable[..., tuple[list[Any], dict[str, Any]]]:
    """Run ``scenario(recorder, clock)`` on both backends; require identical traces and state."""

    def run(
        scenario: Callable[[Recorder, Clock], None], params: dict[str, Any] | None = None
    ) -> tuple[list[Any], dict[str, Any]]:
        results = {}
        for label, backend in BACKENDS.items():
            clock.now = START
            cache = backend(unique_location(label), dict(params or {}))
            recorder = Recorder(cache)
            scenario(recorder, clock)
            results[label] = (recorder.log, snapshot(cache))
        assert results["mesh"][0] == results["locmem"][0]
        assert results["mesh"][1] == results["locmem"][1]
        return results["mesh"]

    return run


# -- the test environment ------------------------------------------------------------------------


def test_mesh_is_disabled_in_these_tests() -> None:
    node = mesh_node.get_node()
    assert isinstance(node, mesh_node.NullNode)
    assert node.enabled is False
    assert node.ready is True
    assert node.max_timeout is None


def test_fake_clock_is_what_both_backends_read(clock: Clock) -> None:
    assert locmem.time.time() == START
    assert mesh_cache.time.time() == START
    clock.advance(5)
    assert cache_base.time.time() == START + 5


def test_backends_with_distinct_locations_share_nothing() -> None:
    first, second = mesh(), mesh()
    first.set("k", 1)
    assert second.get("k") is None
    same = MeshCache(first._location, {})
    assert same.get("k") == 1
    assert same._store is first._store
    assert same._cache is first._store.cache


# -- get / set / add / delete / clear ------------------------------------------------------------


VALUES = [
    0,
    1,
    -7,
    2**70,
    1.5,
    True,
    False,
    None,
    "",
    "text",
    "ünïcode ✓",
    b"\x00bytes",
    [1, [2, 3]],
    (1, "two"),
    {"a": {"b": [1]}},
    {1, 2, 3},
    Point(1, 2),
]


def test_get_and_set(conform: Callable[..., Any]) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        r("get", "missing")
        r("get", "missing", "fallback")
        r("get", "missing", default=0)
        for index, value in enumerate(VALUES):
            r("set", f"key{index}", value)
        for index in range(len(VALUES)):
            r("get", f"key{index}")
        r("set", "key0", "overwritten")
        r("get", "key0")
        r("get", "key7", "fallback")  # a stored None is a hit, not the default

    log, state = conform(scenario)
    gets = [entry[3] for entry in log if entry[0] == "get"]
    assert gets[:3] == [("ok", None), ("ok", "fallback"), ("ok", 0)]
    assert [value for _, value in gets[3 : 3 + len(VALUES)]] == VALUES
    assert gets[-2:] == [("ok", "overwritten"), ("ok", None)]
    assert all(entry[3] == ("ok", None) for entry in log if entry[0] == "set")
    assert len(state["entries"]) == len(VALUES)


def test_values_are_copies_not_references(conform: Callable[..., Any]) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        value = {"list": [1]}
        r("set", "k", value)
        value["list"].append(2)
        fetched = r("get", "k")
        fetched["list"].append(3)
        r("get", "k")

    log, _ = conform(scenario)
    assert log[-1][3] == ("ok", {"list": [1]})


def test_add(conform: Callable[..., Any]) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        r("add", "k", "first")
        r("add", "k", "second")
        r("get", "k")
        r("add", "short", "v", 10)
        clock.advance(10)
        r("add", "short", "again")  # expired: add succeeds
        r("get", "short")
        r("delete", "k")
        r("add", "k", "third")
        r("get", "k")
        r("add", "none", None)
        r("add", "none", "not none")
        r("get", "none", "fallback")

    log, _ = conform(scenario)
    assert [entry[3] for entry in log] == [
        ("ok", True),
        ("ok", False),
        ("ok", "first"),
        ("ok", True),
        ("ok", True),
        ("ok", "again"),
        ("ok", True),
        ("ok", True),
        ("ok", "third"),
        ("ok", True),
        ("ok", False),
        ("ok", None),
    ]


def test_delete(conform: Callable[..., Any]) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        r("set", "k", 1)
        r("delete", "k")
        r("delete", "k")
        r("get", "k", "gone")
        r("delete", "never")
        r("set", "short", 1, 5)
        clock.advance(6)
        r("delete", "short")  # expired but still stored: LocMemCache reports True
        r("set", "other", 2)
        r("state")

    log, state = conform(scenario)
    assert [entry[3] for entry in log if entry[0] == "delete"] == [
        ("ok", True),
        ("ok", False),
        ("ok", False),
        ("ok", True),
    ]
    assert [key for key, *_ in state["entries"]] == [":1:other"]


def test_clear(conform: Callable[..., Any]) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        r("set_many", {"a": 1, "b": 2, "c": 3})
        r("clear")
        r("get_many", ["a", "b", "c"])
        r("clear")
        r("set", "a", "after")
        r("get", "a")

    log, state = conform(scenario)
    assert log[1][3] == ("ok", None)
    assert log[2][3] == ("ok", {})
    assert state["entries"] == [(":1:a", "after", START + 300)]


def test_clear_only_clears_its_own_location() -> None:
    first, second = mesh(), mesh()
    first.set("k", 1)
    second.set("k", 2)
    first.clear()
    assert first.get("k") is None
    assert second.get("k") == 2


def test_close_is_harmless(conform: Callable[..., Any]) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        r("set", "k", 1)
        r("close")
        r("close", some_kwarg=True)
        r("get", "k")
        r("set", "j", 2)

    log, state = conform(scenario)
    assert log[1][3] == ("ok", None)
    assert log[3][3] == ("ok", 1)
    assert len(state["entries"]) == 2


# -- many / has_key / contains -------------------------------------------------------------------


def test_get_many_set_many_delete_many(conform: Callable[..., Any]) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        r("set_many", {"a": 1, "b": None, "c": [3]})
        r("set_many", {})
        r("get_many", ["a", "b", "c", "missing"])
        r("get_many", [])
        r("get_many", ("c", "a"))
        r("delete_many", ["a", "missing"])
        r("delete_many", [])
        r("get_many", ["a", "b", "c"])
        r("set_many", {"short": 1, "long": 2}, 5)
        r("set_many", {"v2": "x"}, version=2)
        clock.advance(5)
        r("get_many", ["short", "long", "v2"])
        r("get_many", ["v2"], version=2)
        r("delete_many", ["v2"], version=2)
        r("get_many", ["v2"], version=2)
        r("state")

    log, state = conform(scenario)
    results = [entry[3] for entry in log]
    assert results[0] == ("ok", [])
    assert results[1] == ("ok", [])
    assert results[2] == ("ok", {"a": 1, "b": None, "c": [3]})
    assert results[3] == ("ok", {})
    assert results[4] == ("ok", {"c": [3], "a": 1})
    assert results[5] == ("ok", None)
    assert results[7] == ("ok", {"b": None, "c": [3]})
    assert results[10] == ("ok", {})
    assert results[11] == ("ok", {"v2": "x"})
    assert results[13] == ("ok", {})
    assert {key for key, *_ in state["entries"]} == {":1:b", ":1:c"}


def test_has_key_and_contains(conform: Callable[..., Any]) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        r("set", "k", None)
        r("has_key", "k")
        r("__contains__", "k")
        r("has_key", "missing")
        r("__contains__", "missing")
        r("has_key", "k", version=2)
        r("set", "short", 1, 1)
        r("state")
        clock.advance(1)
        r("has_key", "short")  # expired: removed from storage too
        r("state")

    log, state = conform(scenario)
    results = [entry[3] for entry in log if entry[0] in {"has_key", "__contains__"}]
    assert results == [
        ("ok", True),
        ("ok", True),
        ("ok", False),
        ("ok", False),
        ("ok", False),
        ("ok", False),
    ]
    assert [key for key, *_ in state["entries"]] == [":1:k"]


# -- incr / decr ---------------------------------------------------------------------------------


def test_incr_and_decr(conform: Callable[..., Any]) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        r("set", "n", 10, 100)
        r("incr", "n")
        r("incr", "n", 5)
        r("incr", "n", -20)
        r("decr", "n")
        r("decr", "n", 4)
        r("decr", "n", -100)
        r("get", "n")
        r("set", "f", 1.5)
        r("incr", "f", 1)
        r("set", "big", 2**64)
        r("incr", "big")
        r("incr", "missing")
        r("decr", "missing")
        r("incr", "missing", version=3)
        r("set", "text", "abc")
        r("incr", "text")
        r("set", "n2", 1, version=2)
        r("incr", "n2", 1, version=2)
        r("incr", "n2")
        clock.advance(99)
        r("incr", "n")  # incr keeps the expiry: still there at 99s, gone at 100s
        clock.advance(1)
        r("incr", "n")
        r("get", "n", "gone")
        r("state")

    log, state = conform(scenario)
    results = [entry[3] for entry in log]
    assert results[1:8] == [
        ("ok", 11),
        ("ok", 16),
        ("ok", -4),
        ("ok", -5),
        ("ok", -9),
        ("ok", 91),
        ("ok", 91),
    ]
    assert results[9] == ("ok", 2.5)
    assert results[11] == ("ok", 2**64 + 1)
    assert results[12] == ("raised", "ValueError", "Key ':1:missing' not found")
    assert results[13] == ("raised", "ValueError", "Key ':1:missing' not found")
    assert results[14] == ("raised", "ValueError", "Key ':3:missing' not found")
    assert results[16][:2] == ("raised", "TypeError")
    assert results[18] == ("ok", 2)
    assert results[19] == ("raised", "ValueError", "Key ':1:n2' not found")
    assert results[20] == ("ok", 92)
    assert results[21] == ("raised", "ValueError", "Key ':1:n' not found")
    assert results[22] == ("ok", "gone")
    assert ":1:n" not in [key for key, *_ in state["entries"]]


def test_incr_does_not_cull_or_change_the_expiry(conform: Callable[..., Any]) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        r("set", "a", 1, None)
        r("set", "b", 1, 7)
        r("incr", "a")
        r("incr", "b")
        r("state")

    _, state = conform(scenario, {"OPTIONS": {"MAX_ENTRIES": 2}})
    assert state["entries"] == [(":1:b", 2, START + 7), (":1:a", 2, None)]


# -- versions ------------------------------------------------------------------------------------


def test_incr_version_and_decr_version(conform: Callable[..., Any]) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        r("set", "k", "value", 50)
        r("incr_version", "k")
        r("get", "k")
        r("get", "k", version=2)
        r("incr_version", "k", version=2, delta=3)
        r("get", "k", version=5)
        r("decr_version", "k", version=5)
        r("decr_version", "k", 3, version=4)
        r("get", "k")
        r("incr_version", "missing")
        r("decr_version", "missing")
        r("set", "none", None)
        r("incr_version", "none")  # a stored None is a value, it moves
        r("get", "none", "fallback", version=2)
        r("state")

    log, state = conform(scenario)
    results = [entry[3] for entry in log]
    assert results[1] == ("ok", 2)
    assert results[2] == ("ok", None)
    assert results[3] == ("ok", "value")
    assert results[4] == ("ok", 5)
    assert results[5] == ("ok", "value")
    assert results[6] == ("ok", 4)
    assert results[7] == ("ok", 1)
    assert results[8] == ("ok", "value")
    assert results[9] == ("raised", "ValueError", "Key 'missing' not found")
    assert results[10] == ("raised", "ValueError", "Key 'missing' not found")
    assert results[12] == ("ok", 2)
    assert results[13] == ("ok", None)
    # Moving a key to another version stores it with the default timeout, as LocMemCache does.
    assert (":1:k", "value", START + 300) in state["entries"]


# -- get_or_set ----------------------------------------------------------------------------------


def test_get_or_set(conform: Callable[..., Any]) -> None:
    calls: list[str] = []

    def compute() -> list[int]:
        calls.append("called")
        return [1, 2]

    def scenario(r: Recorder, clock: Clock) -> None:
        r("get_or_set", "plain", "value")
        r("get_or_set", "plain", "other")
        r("get_or_set", "computed", compute)
        r("get_or_set", "computed", compute)  # a hit: the callable is not called
        r("get_or_set", "timed", "v", 10)
        clock.advance(10)
        r("get_or_set", "timed", "recomputed", timeout=None)
        r("get_or_set", "versioned", "v3", version=3)
        r("get", "versioned", "absent")
        r("get", "versioned", version=3)
        r("get_or_set", "zero", "not kept", 0)  # stored already expired: returns the default
        r("has_key", "zero")
        r("state")

    log, state = conform(scenario)
    assert [entry[3] for entry in log if entry[0] == "get_or_set"] == [
        ("ok", "value"),
        ("ok", "value"),
        ("ok", [1, 2]),
        ("ok", [1, 2]),
        ("ok", "v"),
        ("ok", "recomputed"),
        ("ok", "v3"),
        ("ok", "not kept"),
    ]
    assert calls == ["called", "called"]  # once per backend
    entries = {key: (value, expiry) for key, value, expiry in state["entries"]}
    assert entries[":1:timed"] == ("recomputed", None)
    assert entries[":3:versioned"] == ("v3", START + 310)
    assert ":1:zero" not in entries


def test_get_or_set_default_none_semantics(conform: Callable[..., Any]) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        r("get_or_set", "k", None)  # None is stored: it is a value, not "no default"
        r("has_key", "k")
        r("get_or_set", "k", "later")  # the stored None is returned
        r("get_or_set", "c", lambda: None)
        r("get_or_set", "c", lambda: "later")
        r("get", "c", "fallback")

    log, state = conform(scenario)
    assert [entry[3] for entry in log] == [
        ("ok", None),
        ("ok", True),
        ("ok", None),
        ("ok", None),
        ("ok", None),
        ("ok", None),
    ]
    assert {(key, value) for key, value, _ in state["entries"]} == {(":1:k", None), (":1:c", None)}


def test_get_or_set_returns_what_another_caller_stored_first(conform: Callable[..., Any]) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        def race() -> str:
            r.cache.set("k", "winner")  # another caller fills the key meanwhile
            return "loser"

        r("get_or_set", "k", race)
        r("get", "k")

    log, _ = conform(scenario)
    assert [entry[3] for entry in log] == [("ok", "winner"), ("ok", "winner")]


def test_get_or_set_propagates_the_callables_error(conform: Callable[..., Any]) -> None:
    def boom() -> None:
        raise LookupError("no value")

    def scenario(r: Recorder, clock: Clock) -> None:
        r("get_or_set", "k", boom)
        r("has_key", "k")
        r("get_or_set", "k", "fine")

    log, _ = conform(scenario)
    assert [entry[3] for entry in log] == [
        ("raised", "LookupError", "no value"),
        ("ok", False),
        ("ok", "fine"),
    ]


# -- timeouts ------------------------------------------------------------------------------------


def test_default_timeout_boundary(conform: Callable[..., Any]) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        r("set", "k", 1)
        r("state")
        clock.advance(59.999)
        r("get", "k")
        clock.advance(0.001)
        r("get", "k", "expired")
        r("state")  # get removed it

    log, state = conform(scenario, {"TIMEOUT": 60})
    assert log[1][1]["entries"] == [(":1:k", 1, START + 60)]
    assert log[2][3] == ("ok", 1)
    assert log[3][3] == ("ok", "expired")
    assert state["entries"] == []


@pytest.mark.parametrize("timeout", [0, -1, -0.5, -1000])
def test_zero_and_negative_timeouts_store_nothing_retrievable(
    conform: Callable[..., Any], timeout: float
) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        r("set", "k", "v", timeout)
        r("get", "k", "missing")
        r("has_key", "k")
        r("set", "kept", "v")
        r("touch", "kept", timeout)
        r("get", "kept", "missing")
        r("set_many", {"a": 1, "b": 2}, timeout)
        r("get_many", ["a", "b"])
        r("add", "added", 1, timeout)
        r("add", "added", 2)  # the first add's entry is already expired
        r("get", "added")

    log, _ = conform(scenario)
    assert [entry[3] for entry in log] == [
        ("ok", None),
        ("ok", "missing"),
        ("ok", False),
        ("ok", None),
        ("ok", True),
        ("ok", "missing"),
        ("ok", []),
        ("ok", {}),
        ("ok", True),
        ("ok", True),
        ("ok", 2),
    ]


def test_none_timeout_never_expires(conform: Callable[..., Any]) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        r("set", "forever", 1, None)
        r("add", "added", 2, None)
        r("set", "touched", 3, 1)
        r("touch", "touched", None)
        r("state")
        clock.advance(10 * 365 * 24 * 3600)
        r("get_many", ["forever", "added", "touched"])

    log, state = conform(scenario)
    assert log[-1][3] == ("ok", {"forever": 1, "added": 2, "touched": 3})
    assert all(expiry is None for _, _, expiry in state["entries"])


@pytest.mark.parametrize(
    ("params", "expiry"),
    [
        ({}, START + 300),
        ({"TIMEOUT": 5}, START + 5),
        ({"TIMEOUT": "7"}, START + 7),
        ({"TIMEOUT": "not a number"}, START + 300),
        ({"TIMEOUT": None}, None),
        ({"timeout": 9, "TIMEOUT": 5}, START + 9),
    ],
)
def test_default_timeout_from_params(
    conform: Callable[..., Any], params: dict[str, Any], expiry: float | None
) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        r("set", "k", 1)
        r("add", "a", 1)
        r("set", "t", 1, 1)
        r("touch", "t")
        r("get_or_set", "g", 1)

    _, state = conform(scenario, params)
    assert {key: exp for key, _, exp in state["entries"]} == {
        ":1:k": expiry,
        ":1:a": expiry,
        ":1:t": expiry,
        ":1:g": expiry,
    }


def test_touch(conform: Callable[..., Any]) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        r("touch", "missing")
        r("set", "k", 1, 10)
        clock.advance(9)
        r("touch", "k", 10)  # now expires at START + 19
        clock.advance(9)
        r("get", "k")
        r("touch", "k", 0.5)
        clock.advance(0.5)
        r("touch", "k")
        r("get", "k", "expired")
        r("set", "v", 1, version=2)
        r("touch", "v", 100, version=2)
        r("touch", "v", 100)
        r("state")

    log, state = conform(scenario)
    assert [entry[3] for entry in log[:-1]] == [
        ("ok", False),
        ("ok", None),
        ("ok", True),
        ("ok", 1),
        ("ok", True),
        ("ok", False),
        ("ok", "expired"),
        ("ok", None),
        ("ok", True),
        ("ok", False),
    ]
    assert state["entries"] == [(":2:v", 1, START + 18.5 + 100)]


def test_expired_entries_are_evicted_lazily(conform: Callable[..., Any]) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        r("set", "a", 1, 1)
        r("set", "b", 1, 1)
        clock.advance(2)
        r("state")  # both still stored
        r("get", "a")
        r("state")  # only the read one was dropped

    log, state = conform(scenario)
    assert [key for key, *_ in log[2][1]["entries"]] == [":1:b", ":1:a"]
    assert [key for key, *_ in state["entries"]] == [":1:b"]


# -- keys: prefix, version, key function ---------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "made"),
    [
        ({}, ":1:k"),
        ({"KEY_PREFIX": "site"}, "site:1:k"),
        ({"VERSION": 7}, ":7:k"),
        ({"KEY_PREFIX": "p", "VERSION": "v2"}, "p:v2:k"),
        ({"KEY_FUNCTION": reversed_key_func, "KEY_PREFIX": "p"}, "1|p|k"),
        ({"KEY_FUNCTION": "tests.test_cache_parity.reversed_key_func", "VERSION": 3}, "3||k"),
    ],
)
def test_key_prefix_version_and_key_function(
    conform: Callable[..., Any], params: dict[str, Any], made: str
) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        r("make_key", "k")
        r("make_key", "key", version=9)
        r("set", "k", "default version")
        r("set", "k", "version 9", version=9)
        r("get", "k")
        r("get", "k", version=9)
        r("add", "k", "no", version=9)
        r("incr_version", "k", version=9)
        r("get", "k", version=10)
        r("delete", "k", version=10)
        r("state")

    log, state = conform(scenario, params)
    assert log[0][3] == ("ok", made)
    assert log[4][3] == ("ok", "default version")
    assert log[5][3] == ("ok", "version 9")
    assert log[8][3] == ("ok", "version 9")
    assert [key for key, *_ in state["entries"]] == [made]


def test_two_prefixes_on_one_location_do_not_see_each_other() -> None:
    location = unique_location("shared")
    first = MeshCache(location, {"KEY_PREFIX": "one"})
    second = MeshCache(location, {"KEY_PREFIX": "two"})
    first.set("k", 1)
    second.set("k", 2)
    assert (first.get("k"), second.get("k")) == (1, 2)
    first.delete("k")
    assert (first.get("k"), second.get("k")) == (None, 2)
    assert list(first._cache) == ["two:1:k"]


# -- culling and LRU -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"OPTIONS": {"MAX_ENTRIES": 9, "CULL_FREQUENCY": 3}},
        {"OPTIONS": {"MAX_ENTRIES": 9, "CULL_FREQUENCY": 2}},
        {"OPTIONS": {"MAX_ENTRIES": 9, "CULL_FREQUENCY": 1}},
        {"OPTIONS": {"MAX_ENTRIES": 9, "CULL_FREQUENCY": 0}},
        {"OPTIONS": {"MAX_ENTRIES": 9, "CULL_FREQUENCY": 20}},
        {"OPTIONS": {"MAX_ENTRIES": 1, "CULL_FREQUENCY": 1}},
        {"max_entries": 4, "cull_frequency": 2},
        {"OPTIONS": {"MAX_ENTRIES": "x", "CULL_FREQUENCY": "y"}},
    ],
)
def test_culling(conform: Callable[..., Any], params: dict[str, Any]) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        for index in range(9):
            r("set", f"k{index}", index)
        r("get", "k0")  # k0 becomes the most recently used
        r("state")
        r("set", "k9", 9)
        r("state")
        r("add", "k10", 10)
        r("set", "k9", "overwrite")  # a full cache culls even to overwrite, as LocMemCache does
        r("get_many", [f"k{index}" for index in range(11)])
        r("state")

    conform(scenario, params)


def test_culling_drops_the_least_recently_used(conform: Callable[..., Any]) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        for index in range(9):
            r("set", f"k{index}", index)
        r("get", "k0")
        r("incr", "k1")
        r("set", "k9", 9)
        r("state")

    _, state = conform(scenario, {"OPTIONS": {"MAX_ENTRIES": 9, "CULL_FREQUENCY": 3}})
    # Of 9 entries, 9 // 3 = 3 of the least recently used go: k2, k3, k4.
    assert [key for key, *_ in state["entries"]] == [
        ":1:k9",
        ":1:k1",
        ":1:k0",
        ":1:k8",
        ":1:k7",
        ":1:k6",
        ":1:k5",
    ]


def test_cull_frequency_zero_clears_everything(conform: Callable[..., Any]) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        for index in range(5):
            r("set", f"k{index}", index)
        r("add", "new", 1)
        r("state")

    _, state = conform(scenario, {"OPTIONS": {"MAX_ENTRIES": 5, "CULL_FREQUENCY": 0}})
    assert state["entries"] == [(":1:new", 1, START + 300)]
    assert state["expire_keys"] == [":1:new"]


def test_lru_order(conform: Callable[..., Any]) -> None:
    def scenario(r: Recorder, clock: Clock) -> None:
        r("set_many", {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5})
        r("state")
        r("get", "a")  # moves to the front
        r("state")
        r("has_key", "b")  # does not move
        r("touch", "b")  # does not move
        r("state")
        r("incr", "c")  # moves
        r("state")
        r("set", "d", 40)  # moves
        r("add", "e", 50)  # failed add: does not move
        r("state")
        r("get_many", ["b", "e"])  # each get moves
        r("get_or_set", "a", "x")  # a hit is a get: moves
        r("state")

    log, state = conform(scenario)
    orders = [[key[3:] for key, *_ in entry[1]["entries"]] for entry in log if entry[0] == "state"]
    assert orders == [
        ["e", "d", "c", "b", "a"],
        ["a", "e", "d", "c", "b"],
        ["a", "e", "d", "c", "b"],
        ["c", "a", "e", "d", "b"],
        ["d", "c", "a", "e", "b"],
        ["a", "e", "b", "d", "c"],
    ]
    assert [key for key, *_ in state["entries"]] == [":1:a", ":1:e", ":1:b", ":1:d", ":1:c"]


# -- key validation ------------------------------------------------------------------------------

UNSAFE_KEYS = ["with space", "tab\there", "newline\n", "del\x7f", "x" * 251, "ünïcode"]

KEY_OPERATIONS: list[tuple[str, Callable[[Any, str], Any]]] = [
    ("get", lambda cache, key: cache.get(key)),
    ("set", lambda cache, key: cache.set(key, 1)),
    ("add", lambda cache, key: cache.add(key, 1)),
    ("delete", lambda cache, key: cache.delete(key)),
    ("touch", lambda cache, key: cache.touch(key)),
    ("has_key", lambda cache, key: cache.has_key(key)),
    ("incr", lambda cache, key: outcome(cache.incr, key)),
    ("decr", lambda cache, key: outcome(cache.decr, key)),
    ("get_many", lambda cache, key: cache.get_many([key, "safe"])),
    ("set_many", lambda cache, key: cache.set_many({key: 1, "safe": 2})),
    ("delete_many", lambda cache, key: cache.delete_many([key, "safe"])),
    ("incr_version", lambda cache, key: outcome(cache.incr_version, key)),
    ("get_or_set hit", lambda cache, key: cache.get_or_set(key, 1)),
]


def _warnings_of(cache: LocMemCache, operation: Callable[[Any, str], Any], key: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheKeyWarning)
        cache.set(key, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = operation(cache, key)
    return result, [(w.category, str(w.message)) for w in caught]


@pytest.mark.parametrize("key", UNSAFE_KEYS)
@pytest.mark.parametrize(("name", "operation"), KEY_OPERATIONS, ids=[n for n, _ in KEY_OPERATIONS])
def test_key_warnings_match(
    clock: Clock, key: str, name: str, operation: Callable[[Any, str], Any]
) -> None:
    locmem_result, locmem_warnings = _warnings_of(
        LocMemCache(unique_location("l"), {}), operation, key
    )
    mesh_result, mesh_warnings = _warnings_of(mesh(), operation, key)
    assert mesh_result == locmem_result
    assert mesh_warnings == locmem_warnings
    if key != "ünïcode":  # memcached accepts non-ASCII: no warning
        assert mesh_warnings
        assert all(category is CacheKeyWarning for category, _ in mesh_warnings)
    else:
        assert mesh_warnings == []


def test_key_warning_is_raised_as_an_error_under_strict_filters() -> None:
    cache = mesh()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheKeyWarning)
        with pytest.raises(CacheKeyWarning, match="memcached"):
            cache.set("bad key", 1)
    assert cache.get_many([]) == {}


def test_get_or_set_miss_warns_about_the_key(clock: Clock) -> None:
    """Both warn on a miss; the same warnings, as often (see the next test)."""
    caches = [LocMemCache(unique_location("l"), {}), mesh()]
    seen = []
    for cache in caches:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cache.get_or_set("bad key", 1) == 1
        seen.append({str(w.message) for w in caught})
        assert all(w.category is CacheKeyWarning for w in caught)
    assert seen[0] == seen[1] != set()


def test_get_or_set_miss_warns_as_often_as_locmem(clock: Clock) -> None:
    counts = []
    for cache in (LocMemCache(unique_location("l"), {}), mesh()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cache.get_or_set("bad key", 1)
        counts.append(len(caught))
    assert counts[0] == counts[1]


# -- delete_pattern (MeshCache only) -------------------------------------------------------------


def test_delete_pattern(clock: Clock) -> None:
    cache = mesh()
    cache.set_many({"user:1": 1, "user:2": 2, "user:[x]": 3, "users": 4, "other": 5})
    cache.set("user:9", 9, version=2)
    assert cache.delete_pattern("user:*") == 3
    assert sorted(cache._cache) == [":1:other", ":1:users", ":2:user:9"]
    assert cache.delete_pattern("user:*") == 0
    assert cache.delete_pattern("user?", version=1) == 1
    assert cache.delete_pattern("user:*", version=2) == 1
    assert list(cache._cache) == [":1:other"]
    cache.set_many({"a1": 1, "b1": 1, "c1": 1})
    assert cache.delete_pattern("[ab]1") == 2
    assert sorted(cache._cache) == [":1:c1", ":1:other"]


def test_delete_pattern_escapes_the_prefix(clock: Clock) -> None:
    cache = mesh({"KEY_PREFIX": "p[1]*"})
    other = MeshCache(cache._location, {"KEY_PREFIX": "p1x"})
    cache.set("k", 1)
    other.set("k", 2)
    assert cache.delete_pattern("*") == 1
    assert list(cache._cache) == ["p1x:1:k"]
    assert other.get("k") == 2
