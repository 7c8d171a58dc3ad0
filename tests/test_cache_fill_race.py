"""The fill race: a value ``get_or_set`` computed (or pickled) while its key, its tags or the
whole cache was invalidated is returned but not stored, and not published.

The invalidations land as the node's receiver thread would apply them, mid-computation. The
async twin (``aget_or_set``) is in test_cache_async.py.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import pytest

from django_warpmesh.cache import MeshCache
from django_warpmesh.protocol import Op, OpCode
from tests.cache_helpers import (
    Clock,
    RecordingNode,
    assert_value_published,
    invalidating,
    mesh,
)

# -- the fill race: a value computed while its key was invalidated is not stored ------------------


@pytest.mark.parametrize(
    "make_ops",
    [
        pytest.param(lambda name: [Op(name, OpCode.DELETE, [":1:k"])], id="delete"),
        pytest.param(
            lambda name: [Op(name, OpCode.DELETE, [":1:other", ":1:k"])], id="delete-many"
        ),
        pytest.param(
            lambda name: [Op(name, OpCode.DELETE_UNLESS, [[":1:k", b"\x00" * 8]])],
            id="delete-unless",
        ),
        pytest.param(lambda name: [Op(name, OpCode.CLEAR, None)], id="clear"),
        pytest.param(lambda name: [Op(name, OpCode.PATTERN, ":1:k*")], id="pattern"),
        pytest.param(lambda name: [Op(name, OpCode.PATTERN, "*")], id="pattern-all"),
    ],
)
def test_get_or_set_does_not_store_a_value_invalidated_while_computed(
    node: RecordingNode, clock: Clock, make_ops: Callable[[str], list[Op]]
) -> None:
    cache = mesh()
    compute = invalidating(cache, make_ops(cache._location))
    assert cache.get_or_set("k", compute) == "computed"
    assert cache.has_key("k") is False
    assert node.published == []  # nothing stored, nothing to announce
    # The next caller computes again, undisturbed, and stores.
    assert cache.get_or_set("k", lambda: "second") == "second"
    assert cache.get("k") == "second"
    (published,) = node.published
    assert_value_published(cache, published, ":1:k", "second")


def test_local_delete_during_the_computation_also_counts(node: RecordingNode, clock: Clock) -> None:
    cache = mesh()

    def compute() -> str:
        cache.delete("k")
        return "computed"

    assert cache.get_or_set("k", compute) == "computed"
    assert cache.has_key("k") is False


def test_invalidating_another_key_does_not_block_the_fill(
    node: RecordingNode, clock: Clock
) -> None:
    cache = mesh()
    cache.set("other", 1)
    compute = invalidating(
        cache,
        [
            Op(cache._location, OpCode.DELETE, [":1:other"]),
            Op(cache._location, OpCode.DELETE, [":2:k"]),
            Op(cache._location, OpCode.DELETE_UNLESS, [[":1:j", b"\x00" * 8]]),
        ],
    )
    assert cache.get_or_set("k", compute) == "computed"
    assert cache.get("k") == "computed"
    assert cache.get("other") is None


def test_invalidations_before_the_fill_do_not_block_it(node: RecordingNode, clock: Clock) -> None:
    cache = mesh()
    cache._store.apply([Op(cache._location, OpCode.DELETE, [":1:k"])])
    cache._store.apply([Op(cache._location, OpCode.CLEAR, None)])
    cache._store.apply([Op(cache._location, OpCode.PATTERN, "*")])
    assert cache.get_or_set("k", lambda: "computed") == "computed"
    assert cache.get("k") == "computed"


def test_nested_fills_track_their_own_keys(node: RecordingNode, clock: Clock) -> None:
    cache = mesh()

    def inner() -> str:
        cache._store.apply([Op(cache._location, OpCode.DELETE, [":1:outer"])])
        return "inner"

    def outer() -> str:
        assert cache.get_or_set("inner", inner) == "inner"
        return "outer"

    assert cache.get_or_set("outer", outer) == "outer"
    assert cache.get("inner") == "inner"
    assert cache.has_key("outer") is False


def test_failed_computation_closes_the_fill(node: RecordingNode, clock: Clock) -> None:
    cache = mesh()

    def boom() -> None:
        raise LookupError("boom")

    with pytest.raises(LookupError):
        cache.get_or_set("k", boom)
    assert cache._store._open_fills == 0
    assert cache.get_or_set("k", "value") == "value"
    assert cache.get("k") == "value"


class InvalidatedWhilePickled:
    """A value whose pickling lets an invalidation land, as a peer's would while a large
    queryset result is being pickled. It unpickles as the string "computed"."""

    def __init__(self, cache: MeshCache, ops: list[Op]) -> None:
        self.cache = cache
        self.ops = ops

    def __reduce__(self) -> tuple[Any, ...]:
        ops, self.ops = self.ops, []
        if ops:
            self.cache._store.apply(ops)  # as the node's receiver thread would, meanwhile
        return (str, ("computed",))


@pytest.mark.parametrize(
    "make_ops",
    [
        pytest.param(lambda name: [Op(name, OpCode.DELETE, [":1:k"])], id="delete"),
        pytest.param(lambda name: [Op(name, OpCode.TAGS, ["s:t"])], id="tags"),
        pytest.param(lambda name: [Op(name, OpCode.CLEAR, None)], id="clear"),
    ],
)
def test_an_invalidation_landing_while_the_value_is_pickled_is_not_missed(
    node: RecordingNode, clock: Clock, make_ops: Callable[[str], list[Op]]
) -> None:
    cache = mesh()
    value = InvalidatedWhilePickled(cache, make_ops(cache._location))
    assert cache.get_or_set("k", lambda: value, tags=["t"]) is value
    assert cache.has_key("k") is False
    assert node.published == []
    assert cache._store._open_fills == 0
    # Pickled again, with nothing landing meanwhile: stored.
    assert cache.get_or_set("k", value, tags=["t"]) == "computed"
    assert cache.get("k") == "computed"


def test_an_unpicklable_value_closes_the_fill(node: RecordingNode, clock: Clock) -> None:
    cache = mesh()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        cache.get_or_set("k", lambda: lambda: None)
    assert cache._store._open_fills == 0
    assert cache.has_key("k") is False
    assert node.published == []
