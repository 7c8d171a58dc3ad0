"""``MeshCache``: Django's ``LocMemCache``, kept coherent across processes by the mesh.

Every mutation is applied to this process's memory first, then queued for the peers as an
invalidation; reads never leave the process. A cache is known on the wire by its ``LOCATION``
(as in ``LocMemCache``, one name, one storage): give each MeshCache alias its own.
"""

from __future__ import annotations

import fnmatch
import glob
import pickle
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from types import MappingProxyType
from typing import Any

from django.core.cache.backends import locmem
from django.core.cache.backends.base import DEFAULT_TIMEOUT, InvalidCacheKey
from django.core.cache.backends.locmem import LocMemCache
from django.core.signals import setting_changed
from django.utils.module_loading import import_string

from django_warpmesh.node import MeshNode, NullNode, process
from django_warpmesh.protocol import Op, OpCode, digest, encodable
from django_warpmesh.tags import TABLE, marks, normalize, table_of, watches

# Invalidations remembered at most for the fills in progress (per kind: keys, tag marks). Past
# that, the oldest open fills are treated as cleared (not stored: a miss, never stale data).
MAX_FILL_NOTES = 10_000


class LocMemStore:
    """One cache name's storage, shared by every thread's ``MeshCache`` instance.

    It is also what the node applies peers' invalidations to, and it remembers which keys were
    invalidated while a value was being computed, so that value is not stored (the fill race).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        # The very dicts and lock LocMemCache keeps per name, so inherited methods see our writes.
        shared = vars(locmem)
        self.cache: OrderedDict[str, bytes] = shared["_caches"].setdefault(name, OrderedDict())
        self.expire_info: dict[str, float | None] = shared["_expire_info"].setdefault(name, {})
        self.lock: threading.Lock = shared["_locks"].setdefault(name, threading.Lock())
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


def get_store(name: str) -> LocMemStore:
    store = _stores.get(name)
    if store is None:
        with _stores_lock:
            store = _stores.get(name)
            if store is None:
                store = _stores[name] = LocMemStore(name)
                node = process.current_node()
                if node is not None:
                    node.register_store(name, store)
    return store


def _build_node() -> MeshNode | NullNode:
    from django_warpmesh.mesh import build_node

    return build_node()


def _degraded_timeout() -> float | None:
    from django_warpmesh.conf import get_settings

    return get_settings().degraded_timeout


def _existing_stores() -> dict[str, LocMemStore]:
    with _stores_lock:
        return dict(_stores)


def _reset_after_fork() -> None:
    for store in _stores.values():
        store.reset_after_fork()


# Callables that may veto storing a tagged value (the ORM layer's "uncommitted in this thread").
_store_guards: list[Callable[[tuple[str, ...]], bool]] = []


def add_store_guard(guard: Callable[[tuple[str, ...]], bool]) -> None:
    if guard not in _store_guards:
        _store_guards.append(guard)


@lru_cache(maxsize=1)
def mesh_locations() -> tuple[str, ...]:
    """The LOCATION of every MeshCache in settings.CACHES, whether used yet or not."""
    from django.conf import settings

    names = []
    for config in settings.CACHES.values():
        if not isinstance(config, dict):
            continue
        try:
            backend = import_string(config["BACKEND"])
        except ImportError:
            continue
        if isinstance(backend, type) and issubclass(backend, MeshCache):
            names.append(str(config.get("LOCATION", "")))
    return tuple(dict.fromkeys(names))


def _caches_changed(**kwargs: object) -> None:
    if kwargs.get("setting") == "CACHES":
        mesh_locations.cache_clear()


setting_changed.connect(_caches_changed, dispatch_uid="django_warpmesh.cache.caches_changed")


def invalidate(*tags: Any) -> None:
    """Evict every entry tagged with any of ``tags``, in every MeshCache, here and on every peer.

    A tag is a model class (its table), a saved instance (its row) or a string. Applied
    locally before returning; the peers get it through the mesh, as any invalidation.
    """
    invalidate_tags(normalize(tags))


def invalidate_tags(tags: tuple[str, ...], *, start: bool = True) -> None:
    """:func:`invalidate` for tags already in wire form (the ORM layer's entry point).

    ``start=False``: through this process's node if it runs, but without starting one (the ORM
    hooks during ``migrate``); otherwise in this process only.
    """
    if not tags:
        return
    node = process.get_node() if start else process.current_node()
    names = dict.fromkeys((*mesh_locations(), *_stores))
    for name in names:
        store = get_store(name)
        with store.lock:
            store._forget_tags(tags)
            if node is not None:
                node.publish(name, OpCode.TAGS, list(tags))
    if node is not None:
        node.deliver()


process.set_node_factory(_build_node, _existing_stores, _degraded_timeout)
process.on_fork_in_child(_reset_after_fork)


# Called unbound, without super(): a read's own cost is what the mesh must not add to.
_locmem_get = LocMemCache.get


class MeshCache(LocMemCache):
    """A ``LocMemCache`` whose mutations invalidate the same cache in every peer process."""

    def __init__(self, name: str, params: dict[str, Any]) -> None:
        super().__init__(name, params)
        self._name = name
        # The node starts on the first mutation, not here: Django's system checks instantiate
        # every cache, and `manage.py migrate` must not join the mesh.
        self._store = get_store(name)

    # -- helpers --------------------------------------------------------------------------------

    def validate_key(self, key: Any) -> None:
        """Django's warnings, and an error for a key the peers cannot be sent.

        Such a key could be stored here but never invalidated anywhere else, so it is refused
        outright (as the memcached backends refuse theirs), not warned about.
        """
        if not isinstance(key, str):
            raise InvalidCacheKey(
                f"Cache key must be a str to be sent to the mesh's peers, not "
                f"{type(key).__name__}: {key!r} (check KEY_FUNCTION)"
            )
        super().validate_key(key)
        if not encodable(key):
            raise InvalidCacheKey(
                f"Cache key cannot be sent to the mesh's peers (not valid UTF-8, such as a lone "
                f"surrogate from os.fsdecode()): {key!r}"
            )

    def _expiry(self, timeout: float | None, cap: float | None) -> float | None:
        expiry = self.get_backend_timeout(timeout)
        if cap is not None:
            latest = time.time() + cap
            if expiry is None or expiry > latest:
                expiry = latest
        return expiry

    def _put(
        self, key: str, pickled: bytes, expiry: float | None, tags: tuple[str, ...] = ()
    ) -> None:
        if tags and not all(guard(tags) for guard in _store_guards):
            # E.g. this thread's own uncommitted writes: storing them could outlive a rollback.
            self._store._forget(key)
            return
        self._store.put(key, pickled, expiry, self._max_entries, self._cull_frequency, tags=tags)

    def _delete(self, key: str) -> bool:
        # LocMemCache calls this for expired entries it meets; keep the tag index in step.
        return self._store.drop(key)

    def _publish_value(self, node: Any, key: str, pickled: bytes) -> None:
        node.publish(self._name, OpCode.DELETE_UNLESS, (key, pickled))

    # Every write queues its op for the peers while it still holds the store's lock: the sender
    # keeps each key's last queued op, so ops must be queued in the order the store applied
    # them. Published after the lock, a refill racing a delete could queue [DELETE, the old
    # value], and peers holding the old value would keep it. (Lock order: store, then node.)

    # -- reads: first what has already arrived from the peers -----------------------------------

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        process.drain_before_read()
        return _locmem_get(self, key, default, version)

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        process.drain_before_read()
        found = {}
        missing = self._missing_key
        for key in keys:
            value = _locmem_get(self, key, missing, version)
            if value is not missing:
                found[key] = value
        return found

    def has_key(self, key: Any, version: int | None = None) -> bool:
        process.drain_before_read()
        return super().has_key(key, version)

    # -- writes ---------------------------------------------------------------------------------

    def add(
        self,
        key: Any,
        value: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[Any] | None = None,
        *,
        local: bool = False,
    ) -> bool:
        key = self.make_and_validate_key(key, version=version)
        normalized = normalize(tags)
        pickled = pickle.dumps(value, self.pickle_protocol)
        node = process.get_node()
        with self._store.lock:
            if not self._store.has_expired(key):
                return False
            if node.ready:
                self._put(key, pickled, self._expiry(timeout, node.max_timeout), normalized)
            if not local:
                self._publish_value(node, key, pickled)
        if not local:
            node.deliver()
        return True

    def set(
        self,
        key: Any,
        value: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[Any] | None = None,
        *,
        local: bool = False,
    ) -> None:
        """Store ``value``; peers drop their copy unless it is the same value.

        ``local=True``: store it in this process only and tell no peer. For values that differ
        between processes but are equally valid (a timestamp, a per-process counter): as
        ordinary sets they would evict each other's copies on every write. The node still
        starts, and the start-up window and the degraded cap apply as to any store, so the
        entry is evicted by what peers send: their writes, deletes, clears and tags.
        """
        key = self.make_and_validate_key(key, version=version)
        normalized = normalize(tags)
        pickled = pickle.dumps(value, self.pickle_protocol)
        node = process.get_node()
        with self._store.lock:
            if node.ready:
                self._put(key, pickled, self._expiry(timeout, node.max_timeout), normalized)
            else:
                self._store._forget(key)
            if not local:
                self._publish_value(node, key, pickled)
        if not local:
            node.deliver()

    def set_many(
        self,
        data: dict[Any, Any],
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[Any] | None = None,
        *,
        local: bool = False,
    ) -> list[Any]:
        normalized = normalize(tags)
        for key, value in data.items():
            self.set(key, value, timeout, version=version, tags=normalized, local=local)
        return []

    def touch(
        self,
        key: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> bool:
        key = self.make_and_validate_key(key, version=version)
        cap = process.get_node().max_timeout
        with self._store.lock:
            if self._store.has_expired(key):
                return False
            self._store.expire_info[key] = self._expiry(timeout, cap)
            return True

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        key = self.make_and_validate_key(key, version=version)
        node = process.get_node()
        process.drain_before_read()  # it reads the value it adds to
        with self._store.lock:
            if self._store.has_expired(key):
                self._store._forget(key)
                raise ValueError(f"Key '{key}' not found")
            cache = self._store.cache
            new_value = pickle.loads(cache[key]) + delta
            pickled = pickle.dumps(new_value, self.pickle_protocol)
            cache[key] = pickled
            cache.move_to_end(key, last=False)
            self._publish_value(node, key, pickled)
        node.deliver()
        return new_value

    def delete(self, key: Any, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        node = process.get_node()
        with self._store.lock:
            existed = key in self._store.cache
            self._store._forget(key)
            # Peers may hold the key even where we did not.
            node.publish(self._name, OpCode.DELETE, [key])
        node.deliver()
        return existed

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        made = [self.make_and_validate_key(key, version=version) for key in keys]
        if not made:
            return
        node = process.get_node()
        with self._store.lock:
            for key in made:
                self._store._forget(key)
            node.publish(self._name, OpCode.DELETE, made)
        node.deliver()

    def clear(self) -> None:
        node = process.get_node()
        with self._store.lock:
            self._store._forget_all()
            node.publish(self._name, OpCode.CLEAR, None)
        node.deliver()

    def delete_pattern(self, pattern: str, version: int | None = None) -> int:
        """Delete every key matching a glob ``pattern`` here and in every peer (as django-redis).

        The pattern applies to the key as given to the cache; the prefix and version are added
        (and escaped) as for any key. Returns how many keys this process deleted.
        """
        marker = "\x00"
        prefix, _, suffix = self.make_key(marker, version=version).partition(marker)
        full_pattern = glob.escape(prefix) + pattern + glob.escape(suffix)
        if not encodable(full_pattern):
            raise InvalidCacheKey(
                f"Pattern cannot be sent to the mesh's peers (not valid UTF-8): {full_pattern!r}"
            )
        node = process.get_node()
        with self._store.lock:
            deleted = self._store._forget_matching(full_pattern)
            node.publish(self._name, OpCode.PATTERN, full_pattern)
        node.deliver()
        return deleted

    def get_or_set(
        self,
        key: Any,
        default: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[Any] | None = None,
    ) -> Any:
        value = self.get(key, self._missing_key, version=version)
        if value is not self._missing_key:
            return value
        normalized = normalize(tags)
        # Already validated by get(): validating again would warn twice, unlike LocMemCache.
        made = self.make_key(key, version=version)
        store = self._store
        started_at = store.begin_fill()
        closed = False
        try:
            if callable(default):
                default = default()
            self.make_and_validate_key(key, version=version)  # add()'s warnings, as LocMemCache
            # Pickled inside the fill (pickling a large queryset result takes a while, and an
            # invalidation landing meanwhile must count), then checked and stored under one
            # acquisition of the lock, as add() would store it.
            pickled = pickle.dumps(default, self.pickle_protocol)
            node = process.get_node()
            with store.lock:
                closed = True
                if not store.close_fill(started_at, made, normalized):
                    # Invalidated while we computed it: return it, but do not cache it.
                    return default
                if store.has_expired(made):
                    if node.ready:
                        expiry = self._expiry(timeout, node.max_timeout)
                        self._put(made, pickled, expiry, normalized)
                    self._publish_value(node, made, pickled)
            node.deliver()
        finally:
            if not closed:
                store.end_fill(started_at, made, normalized)
        # Fetch again in case another caller added a value first (as Django's get_or_set).
        return self.get(key, default, version=version)

    # -- async twins: an in-memory cache needs no thread hop ------------------------------------

    async def aadd(self, *args: Any, **kwargs: Any) -> bool:
        return self.add(*args, **kwargs)

    async def aget(self, *args: Any, **kwargs: Any) -> Any:
        return self.get(*args, **kwargs)

    async def aset(self, *args: Any, **kwargs: Any) -> None:
        self.set(*args, **kwargs)

    async def atouch(self, *args: Any, **kwargs: Any) -> bool:
        return self.touch(*args, **kwargs)

    async def adelete(self, *args: Any, **kwargs: Any) -> bool:
        return self.delete(*args, **kwargs)

    async def aget_many(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return self.get_many(*args, **kwargs)

    async def aget_or_set(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_or_set(*args, **kwargs)

    async def ahas_key(self, *args: Any, **kwargs: Any) -> bool:
        return self.has_key(*args, **kwargs)

    async def aincr(self, *args: Any, **kwargs: Any) -> Any:
        return self.incr(*args, **kwargs)

    async def adecr(self, *args: Any, **kwargs: Any) -> Any:
        return self.decr(*args, **kwargs)

    async def aset_many(self, *args: Any, **kwargs: Any) -> list[Any]:
        return self.set_many(*args, **kwargs)

    async def adelete_many(self, *args: Any, **kwargs: Any) -> None:
        self.delete_many(*args, **kwargs)

    async def aclear(self) -> None:
        self.clear()

    async def aincr_version(self, *args: Any, **kwargs: Any) -> int:
        return self.incr_version(*args, **kwargs)

    async def adecr_version(self, *args: Any, **kwargs: Any) -> int:
        return self.decr_version(*args, **kwargs)

    async def adelete_pattern(self, pattern: str, version: int | None = None) -> int:
        return self.delete_pattern(pattern, version=version)

    async def aclose(self, **kwargs: Any) -> None:
        self.close(**kwargs)


__all__ = ["LocMemStore", "MeshCache", "get_store", "invalidate"]
