"""A cache name's storage in this process: entries, the tag index and the fill bookkeeping.

:class:`LocMemStore` shares its dicts and lock with Django's ``LocMemCache`` of the same name,
so :class:`~django_warpmesh.cache.MeshCache` (the backend, in :mod:`django_warpmesh.cache`) and
the node (which applies peers' ops, :data:`APPLIERS`) work on one storage.
"""

from __future__ import annotations

import fnmatch
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from django.core.cache.backends import locmem

from django_warpmesh.node import process
from django_warpmesh.protocol import Op, OpCode, digest
from django_warpmesh.tags import TABLE, marks, table_of, watches

# Invalidations remembered at most for the fills in progress (per kind: keys, tag marks). Past
# that, the oldest open fills are treated as cleared (not stored: a miss, never stale data).
MAX_FILL_NOTES = 10_000


class LocMemStore:
    """One cache name's storage, shared by every thread's ``MeshCache`` instance.

    It is also what the node applies peers' invalidations to, and it remembers which keys were
    invalidated while a value was being computed, so that value is not stored (the fill race).
    """

    def __init__(self, location: str) -> None:
        self.location = location
        # The very dicts and lock LocMemCache keeps per name, so inherited methods see our writes.
        shared = vars(locmem)
        self.cache: OrderedDict[str, bytes] = shared["_caches"].setdefault(location, OrderedDict())
        self.expire_info: dict[str, float | None] = shared["_expire_info"].setdefault(location, {})
        self.lock: threading.Lock = shared["_locks"].setdefault(location, threading.Lock())
        self._generation = 0
        self._open_fills = 0
        # Generation a fill began at -> how many fills that began then are still open.
        self._fill_starts: dict[int, int] = {}
        # What was invalidated while fills were open, oldest first: an entry no open fill began
        # before is pruned when a fill closes, so overlapping fills (a threaded worker is never
        # without one) keep only what the oldest open fill may still need.
        self._invalidated_at: OrderedDict[str, int] = OrderedDict()
        self._marked_at: OrderedDict[str, int] = OrderedDict()
        self._cleared_at = 0
        # The tag index: only keys present in the cache appear here, so it shrinks as entries
        # are deleted, expire or are culled, and evicting a tag costs what it evicts.
        self._key_tags: dict[str, tuple[str, ...]] = {}
        self._tag_keys: dict[str, set[str]] = {}
        self._table_rows: dict[str, set[str]] = {}

    # Called with self.lock held.

    def has_expired(self, key: str) -> bool:
        expiry = self.expire_info.get(key, -1)
        return expiry is not None and expiry <= time.time()

    def put(
        self,
        key: str,
        pickled: bytes,
        expiry: float | None,
        max_entries: int,
        cull_frequency: int,
        *,
        tags: tuple[str, ...] = (),
    ) -> None:
        """LocMemCache._set with the expiry computed by the caller (capped when degraded)."""
        cache = self.cache
        if len(cache) >= max_entries:
            if cull_frequency == 0:
                self._forget_all()
            else:
                for _ in range(len(cache) // cull_frequency):
                    culled, _ = cache.popitem()
                    del self.expire_info[culled]
                    self._untag(culled)
        cache[key] = pickled
        cache.move_to_end(key, last=False)
        self.expire_info[key] = expiry
        if key in self._key_tags:
            self._untag(key)
        if tags:
            self._tag(key, tags)

    def _tag(self, key: str, tags: tuple[str, ...]) -> None:
        self._key_tags[key] = tags
        for tag in tags:
            self._tag_keys.setdefault(tag, set()).add(key)
            table = table_of(tag)
            if table is not None:
                self._table_rows.setdefault(table, set()).add(tag)

    def _untag(self, key: str) -> None:
        for tag in self._key_tags.pop(key, ()):
            keys = self._tag_keys.get(tag)
            if keys is None:
                continue
            keys.discard(key)
            if not keys:
                del self._tag_keys[tag]
                table = table_of(tag)
                if table is not None:
                    rows = self._table_rows.get(table)
                    if rows is not None:
                        rows.discard(tag)
                        if not rows:
                            del self._table_rows[table]

    def drop(self, key: str) -> bool:
        """Remove an expired entry: housekeeping, not an invalidation."""
        if self.cache.pop(key, None) is None:
            return False
        self.expire_info.pop(key, None)
        self._untag(key)
        return True

    def _forget(self, key: str) -> None:
        if self.cache.pop(key, None) is not None:
            self.expire_info.pop(key, None)
            self._untag(key)
        self._generation += 1
        if self._open_fills:
            self._note(self._invalidated_at, key)

    def _note(self, notes: OrderedDict[str, int], name: str) -> None:
        notes[name] = self._generation
        notes.move_to_end(name)
        if len(notes) > MAX_FILL_NOTES:
            # A fill open for very long (stuck, or thousands of invalidations meanwhile): stop
            # tracking names, and count it as a clear for every fill open now.
            self._cleared_at = self._generation
            self._invalidated_at.clear()
            self._marked_at.clear()

    def _forget_all(self) -> None:
        self.cache.clear()
        self.expire_info.clear()
        self._key_tags.clear()
        self._tag_keys.clear()
        self._table_rows.clear()
        self._generation += 1
        self._cleared_at = self._generation

    def _forget_tags(self, tags: Iterable[str]) -> int:
        doomed: set[str] = set()
        tag_keys = self._tag_keys
        for tag in tags:
            doomed.update(tag_keys.get(tag, ()))
            table = table_of(tag)
            if table is not None:
                # A written row: entries that depend on its whole table are stale too.
                doomed.update(tag_keys.get(table, ()))
            elif tag.startswith(TABLE):
                # A table written without knowing which rows: every row of it is suspect.
                for row in list(self._table_rows.get(tag, ())):
                    doomed.update(tag_keys.get(row, ()))
        for key in doomed:
            self._forget(key)
        self._generation += 1
        if self._open_fills:
            for tag in tags:
                for mark in marks(tag):
                    self._note(self._marked_at, mark)
        return len(doomed)

    def invalidate_tags(self, tags: Iterable[str]) -> int:
        with self.lock:
            return self._forget_tags(tags)

    # The node's Store protocol.

    def apply(self, ops: Sequence[Op]) -> None:
        """Apply peers' ops, each by its code's applier (see :data:`APPLIERS`)."""
        appliers = APPLIERS
        with self.lock:
            for op in ops:
                appliers[op.code](self, op.args)

    def flush(self) -> None:
        with self.lock:
            self._forget_all()

    def _forget_matching(self, pattern: str) -> int:
        match = re.compile(fnmatch.translate(pattern)).match
        doomed = [key for key in self.cache if match(key)]
        for key in doomed:
            self._forget(key)
        # A value being computed may match too; treat the pattern as a clear for fills. Its key
        # is not in the cache, so this must count as a change even when nothing matched.
        self._generation += 1
        self._cleared_at = self._generation
        return len(doomed)

    # The fill race: get_or_set computes outside the lock, so it asks afterwards whether what it
    # read from may have changed meanwhile.

    def begin_fill(self) -> int:
        with self.lock:
            self._open_fills += 1
            started_at = self._generation
            self._fill_starts[started_at] = self._fill_starts.get(started_at, 0) + 1
            return started_at

    def end_fill(self, started_at: int, key: str, tags: tuple[str, ...] = ()) -> bool:
        """Close a fill; True if neither ``key`` nor its tags were invalidated since it began."""
        with self.lock:
            return self.close_fill(started_at, key, tags)

    def close_fill(self, started_at: int, key: str, tags: tuple[str, ...] = ()) -> bool:
        """:meth:`end_fill` with ``self.lock`` held: a caller that stores what it computed
        checks freshness and stores under one acquisition, so nothing lands in between."""
        marked = self._marked_at
        fresh = (
            self._cleared_at <= started_at
            and self._invalidated_at.get(key, 0) <= started_at
            and not any(marked.get(watch, 0) > started_at for tag in tags for watch in watches(tag))
        )
        open_since = self._fill_starts.get(started_at)
        if open_since is None:
            # Begun before this process was forked: the invalidations since went to the parent.
            return False
        self._open_fills -= 1
        if open_since > 1:
            self._fill_starts[started_at] = open_since - 1
        else:
            del self._fill_starts[started_at]
        if not self._open_fills:
            self._invalidated_at.clear()
            marked.clear()
            return fresh
        oldest = min(self._fill_starts)
        for notes in (self._invalidated_at, marked):
            while notes:
                name, at = next(iter(notes.items()))
                if at > oldest:
                    break
                del notes[name]
        return fresh

    def reset_after_fork(self) -> None:
        """In a forked child: the parent's lock, entries and fills are not this process's."""
        self.lock._at_fork_reinit()  # type: ignore[attr-defined]
        # Another thread of the parent may have held the lock at fork time; what the parent
        # cached was kept coherent by the parent's node, not ours. Counted as a clear, so that
        # a fill this thread began before the fork (it goes on here) does not store either.
        self._forget_all()
        self._open_fills = 0
        self._fill_starts.clear()
        self._invalidated_at.clear()
        self._marked_at.clear()


# What each op code does to a store, called with ``store.lock`` held and the op's args.


def _apply_delete(store: LocMemStore, keys: Iterable[str]) -> None:
    for key in keys:
        store._forget(key)


def _apply_delete_unless(store: LocMemStore, pairs: Iterable[tuple[str, bytes]]) -> None:
    cache = store.cache
    for key, wanted in pairs:
        stored = cache.get(key)
        if stored is None or digest(stored) != wanted:
            store._forget(key)


def _apply_clear(store: LocMemStore, _args: None) -> None:
    store._forget_all()


def _apply_pattern(store: LocMemStore, pattern: str) -> None:
    store._forget_matching(pattern)


def _apply_tags(store: LocMemStore, tags: Iterable[str]) -> None:
    store._forget_tags(tags)


Applier = Callable[[LocMemStore, Any], object]

# One applier per OpCode, and no other dispatch: apply() looks each op's code up here, so a code
# without an applier fails loudly (KeyError) instead of being skipped. Every member is covered
# (tests/test_store.py).
APPLIERS: Mapping[OpCode, Applier] = MappingProxyType(
    {
        OpCode.DELETE: _apply_delete,
        OpCode.DELETE_UNLESS: _apply_delete_unless,
        OpCode.CLEAR: _apply_clear,
        OpCode.PATTERN: _apply_pattern,
        OpCode.TAGS: _apply_tags,
    }
)


_stores: dict[str, LocMemStore] = {}
_stores_lock = threading.Lock()


def get_store(location: str) -> LocMemStore:
    store = _stores.get(location)
    if store is None:
        with _stores_lock:
            store = _stores.get(location)
            if store is None:
                store = _stores[location] = LocMemStore(location)
                node = process.current_node()
                if node is not None:
                    node.register_store(location, store)
    return store


def existing_stores() -> dict[str, LocMemStore]:
    """Every store made in this process so far, by name."""
    with _stores_lock:
        return dict(_stores)


def reset_stores_after_fork() -> None:
    """In a forked child: see :meth:`LocMemStore.reset_after_fork`."""
    for store in _stores.values():
        store.reset_after_fork()


__all__ = ["APPLIERS", "MAX_FILL_NOTES", "LocMemStore", "existing_stores", "get_store"]
