"""What each MeshCache operation tells the peers, and when: the op it publishes (or none), with
what it stored applied first; keys that cannot be sent refused at the call; every write handing
its ops to the node itself; ``local=True`` writes that tell no peer.

The ``node`` fixture (conftest.py) installs a recording node in place of this process's node.
"""

from __future__ import annotations

import asyncio
import os
import pickle
from collections.abc import Callable
from typing import Any

import pytest
from django.core.cache import caches
from django.core.cache.backends.base import InvalidCacheKey

from django_warpmesh import cache as mesh_cache
from django_warpmesh import protocol
from django_warpmesh.cache import MeshCache
from django_warpmesh.node import coalesce, process
from django_warpmesh.protocol import Op, OpCode, digest
from tests.cache_helpers import (
    START,
    Clock,
    RecordingNode,
    assert_value_published,
    mesh,
)


def bytes_key_func(key: str, key_prefix: str, version: int) -> bytes:
    """A KEY_FUNCTION whose keys LocMemCache takes but the wire (str keys) cannot carry."""
    return f"{key_prefix}:{version}:{key}".encode()


# -- keys the peers cannot be sent ---------------------------------------------------------------

# What os.fsdecode() makes of file names that are not UTF-8: lone surrogates, which msgpack (the
# wire) cannot encode. Such a key could be stored here but never invalidated on the peers.
UNSENDABLE_KEYS = [os.fsdecode(b"caf\xe9"), "\udcff"]

KEY_CALLS: list[tuple[str, Callable[[MeshCache, str], Any]]] = [
    ("get", lambda cache, key: cache.get(key)),
    ("set", lambda cache, key: cache.set(key, 1)),
    ("add", lambda cache, key: cache.add(key, 1)),
    ("get_or_set", lambda cache, key: cache.get_or_set(key, 1)),
    ("set_many", lambda cache, key: cache.set_many({"safe": 1, key: 2})),
    ("get_many", lambda cache, key: cache.get_many([key])),
    ("delete", lambda cache, key: cache.delete(key)),
    ("delete_many", lambda cache, key: cache.delete_many(["safe", key])),
    ("incr", lambda cache, key: cache.incr(key)),
    ("touch", lambda cache, key: cache.touch(key)),
    ("has_key", lambda cache, key: cache.has_key(key)),
    ("delete_pattern", lambda cache, key: cache.delete_pattern(key + "*")),
    ("aset", lambda cache, key: asyncio.run(cache.aset(key, 1))),
]


@pytest.mark.parametrize("key", UNSENDABLE_KEYS)
@pytest.mark.parametrize(("name", "call"), KEY_CALLS, ids=[n for n, _ in KEY_CALLS])
def test_a_key_that_cannot_be_sent_to_peers_is_rejected_at_the_call(
    node: RecordingNode, clock: Clock, key: str, name: str, call: Callable[[MeshCache, str], Any]
) -> None:
    assert "\udce9" in UNSENDABLE_KEYS[0]  # the platform decodes file names as assumed
    cache = mesh()
    with pytest.raises(InvalidCacheKey, match="cannot be sent to the mesh"):
        call(cache, key)
    # Nothing half-done: the store holds at most the valid key of a batch, as LocMemCache's
    # set_many would, and every op that was queued can be sent.
    assert all(k == ":1:safe" for k in cache._store.cache)
    coalesced = coalesce(node.published, set())
    assert all(
        protocol.encodable(k) for op in coalesced if op.code is OpCode.DELETE for k in op.args
    )
    assert all(
        protocol.encodable(k)
        for op in coalesced
        for k, _ in op.args
        if op.code is OpCode.DELETE_UNLESS
    )


def test_a_key_function_must_make_str_keys(node: RecordingNode, clock: Clock) -> None:
    cache = mesh({"KEY_FUNCTION": "tests.test_cache_publishing.bytes_key_func"})
    with pytest.raises(InvalidCacheKey, match="must be a str"):
        cache.set("k", 1)
    assert node.published == []
    assert dict(cache._store.cache) == {}


def test_valid_non_ascii_keys_are_still_accepted(node: RecordingNode, clock: Clock) -> None:
    cache = mesh()
    cache.set("ünïcode✓", 1)
    assert cache.get("ünïcode✓") == 1
    (published,) = node.published
    assert_value_published(cache, published, ":1:ünïcode✓", 1)


# -- what gets published -------------------------------------------------------------------------


def test_set_publishes_the_digest_of_the_stored_bytes(node: RecordingNode, clock: Clock) -> None:
    cache = mesh()
    assert node.stores[cache._location] is cache._store  # the store was registered with the node
    cache.set("k", {"v": 1})
    (published,) = node.published
    assert_value_published(cache, published, ":1:k", {"v": 1})
    # Applied locally before it was queued.
    assert node.stored_at_publish[0][":1:k"] == cache._store.cache[":1:k"]


def test_set_many_publishes_each_key(node: RecordingNode, clock: Clock) -> None:
    cache = mesh({"KEY_PREFIX": "site"})
    assert cache.set_many({"a": 1, "b": [2]}, version=3) == []
    first, second = node.published
    assert_value_published(cache, first, "site:3:a", 1)
    assert_value_published(cache, second, "site:3:b", [2])


def test_add_publishes_only_when_it_stores(node: RecordingNode, clock: Clock) -> None:
    cache = mesh()
    assert cache.add("k", "first") is True
    (published,) = node.take()
    assert_value_published(cache, published, ":1:k", "first")
    assert cache.add("k", "second") is False
    assert node.published == []
    assert cache.get("k") == "first"


def test_incr_and_decr_publish_the_new_value(node: RecordingNode, clock: Clock) -> None:
    cache = mesh()
    cache.set("n", 10)
    node.take()
    assert cache.incr("n", 5) == 15
    (published,) = node.take()
    assert_value_published(cache, published, ":1:n", 15)
    assert cache.decr("n", 20) == -5
    (published,) = node.take()
    assert_value_published(cache, published, ":1:n", -5)
    with pytest.raises(ValueError, match="not found"):
        cache.incr("missing")
    assert node.published == []


def test_get_or_set_publishes_only_what_it_stores(node: RecordingNode, clock: Clock) -> None:
    cache = mesh()
    assert cache.get_or_set("k", lambda: "computed") == "computed"
    (published,) = node.take()
    assert_value_published(cache, published, ":1:k", "computed")
    assert cache.get_or_set("k", "other") == "computed"
    assert node.published == []


def test_reads_and_touch_publish_nothing(node: RecordingNode, clock: Clock) -> None:
    cache = mesh()
    cache.set("k", 1)
    node.take()
    cache.get("k")
    cache.get("missing")
    cache.get_many(["k", "missing"])
    cache.has_key("k")
    assert "k" in cache
    assert cache.touch("k", 100) is True
    assert cache.touch("missing") is False
    cache.make_key("k")
    cache.close()
    assert node.published == []


def test_delete_publishes_the_full_key_even_when_absent(node: RecordingNode, clock: Clock) -> None:
    cache = mesh({"KEY_PREFIX": "site", "VERSION": 2})
    cache.set("k", 1)
    node.take()
    assert cache.delete("k") is True
    assert cache.delete("absent", version=5) is False
    assert node.published == [
        (cache._location, OpCode.DELETE, ["site:2:k"]),
        (cache._location, OpCode.DELETE, ["site:5:absent"]),
    ]
    assert node.stored_at_publish[0] == {}


def test_delete_many_publishes_one_delete(node: RecordingNode, clock: Clock) -> None:
    cache = mesh()
    cache.set_many({"a": 1, "b": 2})
    node.take()
    cache.delete_many(["a", "b", "absent"])
    cache.delete_many(["x"], version=9)
    cache.delete_many([])  # nothing to say
    assert node.published == [
        (cache._location, OpCode.DELETE, [":1:a", ":1:b", ":1:absent"]),
        (cache._location, OpCode.DELETE, [":9:x"]),
    ]


def test_clear_publishes_clear(node: RecordingNode, clock: Clock) -> None:
    cache = mesh()
    cache.set("k", 1)
    node.take()
    cache.clear()
    assert node.published == [(cache._location, OpCode.CLEAR, None)]
    assert node.stored_at_publish == [{}]


def test_delete_pattern_publishes_the_full_escaped_pattern(
    node: RecordingNode, clock: Clock
) -> None:
    cache = mesh({"KEY_PREFIX": "a*b"})
    cache.set("user:1", 1)
    node.take()
    assert cache.delete_pattern("user:*") == 1
    assert cache.delete_pattern("x?", version=3) == 0
    assert node.published == [
        (cache._location, OpCode.PATTERN, "a[*]b:1:user:*"),
        (cache._location, OpCode.PATTERN, "a[*]b:3:x?"),
    ]


def test_incr_version_publishes_the_new_key_and_deletes_the_old(
    node: RecordingNode, clock: Clock
) -> None:
    cache = mesh()
    cache.set("k", "v")
    node.take()
    assert cache.incr_version("k") == 2
    stored, deleted = node.published
    assert_value_published(cache, stored, ":2:k", "v")
    assert deleted == (cache._location, OpCode.DELETE, [":1:k"])


def test_published_value_survives_on_a_peer_holding_the_same_bytes(
    node: RecordingNode, clock: Clock
) -> None:
    writer, peer_same, peer_stale = mesh(), mesh(), mesh()
    writer.set("k", "new")
    peer_same.set("k", "new")
    peer_stale.set("k", "old")
    ops = coalesce([node.published[0]], set())
    peer_same._store.apply(ops)
    peer_stale._store.apply(ops)
    assert peer_same.get("k") == "new"
    assert peer_stale.get("k") is None


def test_not_ready_node_publishes_but_does_not_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = RecordingNode(ready=False)
    monkeypatch.setattr(process, "_current", fake)
    cache = mesh()
    cache._store.cache[":1:k"] = pickle.dumps("stale")
    cache._store.expire_info[":1:k"] = None
    cache.set("k", "new")
    assert cache.get("k") is None  # the stale copy is dropped, the new one not kept
    assert cache.add("a", 1) is True
    assert cache.get("a") is None
    assert [(code, arg[0]) for _, code, arg in fake.published] == [
        (OpCode.DELETE_UNLESS, ":1:k"),
        (OpCode.DELETE_UNLESS, ":1:a"),
    ]


def test_degraded_node_caps_timeouts(monkeypatch: pytest.MonkeyPatch, clock: Clock) -> None:
    monkeypatch.setattr(process, "_current", RecordingNode(max_timeout=30))
    cache = mesh()
    cache.set("forever", 1, None)
    cache.set("long", 1, 3600)
    cache.set("short", 1, 10)
    cache.add("added", 1, None)
    cache.set("touched", 1, 5)
    cache.touch("touched", None)
    assert cache._expire_info == {
        ":1:forever": START + 30,
        ":1:long": START + 30,
        ":1:short": START + 10,
        ":1:added": START + 30,
        ":1:touched": START + 30,
    }


# -- every write delivers what it queued ----------------------------------------------------------


@pytest.mark.parametrize(
    "write",
    [
        lambda c: c.set("k", 1),
        lambda c: c.add("fresh", 1),
        lambda c: c.set_many({"a": 1, "b": 2}),
        lambda c: c.incr("n"),
        lambda c: c.delete("k"),
        lambda c: c.delete_many(["a", "b"]),
        lambda c: c.clear(),
        lambda c: c.delete_pattern("k*"),
        lambda c: c.get_or_set("filled", 1),
        lambda c: mesh_cache.invalidate("a-tag"),
    ],
    ids=[
        "set",
        "add",
        "set_many",
        "incr",
        "delete",
        "delete_many",
        "clear",
        "delete_pattern",
        "get_or_set",
        "invalidate",
    ],
)
def test_every_write_sends_its_invalidation_itself(
    node: RecordingNode, write: Callable[[MeshCache], object]
) -> None:
    """The writing thread hands what it queued to the node at once (no hop to another thread),
    after releasing the store's lock."""
    cache = caches["default"]
    assert isinstance(cache, MeshCache)
    node.register_store(cache._location, cache._store)
    cache.set("n", 1)
    node.take()
    before = node.deliveries
    write(cache)
    assert node.take(), "nothing was queued"
    assert node.deliveries > before
    assert not node.delivered_while_locked


# -- local-only writes: values that differ between processes but are equally valid -------------


def test_a_local_set_is_stored_here_and_published_to_no_peer(
    node: RecordingNode, clock: Clock
) -> None:
    cache = mesh()
    cache.set("stamp", 1.5, local=True)
    cache.set_many({"a": 1.25, "b": 2.5}, local=True)
    assert cache.add("added", 3.5, local=True) is True
    assert cache.add("added", 4.5, local=True) is False
    assert node.published == []
    assert cache.get_many(["stamp", "a", "b", "added"]) == {
        "stamp": 1.5,
        "a": 1.25,
        "b": 2.5,
        "added": 3.5,
    }


def test_a_local_set_still_obeys_the_start_up_window_and_the_degraded_cap(
    monkeypatch: pytest.MonkeyPatch, clock: Clock
) -> None:
    # Stored only where an ordinary set would be: until the node may have missed nothing, a
    # value kept here could outlive an invalidation it never received.
    fake = RecordingNode(ready=False)
    monkeypatch.setattr(process, "_current", fake)
    cache = mesh()
    cache._store.cache[":1:k"] = pickle.dumps("stale")
    cache._store.expire_info[":1:k"] = None
    cache.set("k", "new", local=True)
    assert cache.add("a", 1, local=True) is True
    assert cache.get("k") is None
    assert cache.get("a") is None
    assert fake.published == []
    fake.ready, fake.max_timeout = True, 30
    cache.set("k", "new", None, local=True)
    assert cache._expire_info[":1:k"] == START + 30


def test_a_local_entry_is_still_evicted_by_the_peers_writes_and_its_tags(
    node: RecordingNode, clock: Clock
) -> None:
    cache = mesh()
    cache.set("k", 1.0, local=True)
    cache.set("tagged", 2.0, local=True, tags=["stamps"])
    # A peer's ordinary set of another value, and a tag invalidation, as the node applies them.
    cache._store.apply([Op(cache._location, OpCode.DELETE_UNLESS, [[":1:k", digest(b"other")]])])
    cache._store.apply([Op(cache._location, OpCode.TAGS, ["s:stamps"])])
    assert cache.get("k") is None
    assert cache.get("tagged") is None
