"""``MeshCache``: Django's ``LocMemCache``, kept coherent across processes by the mesh.

Every mutation is applied to this process's memory first, then queued for the peers as an
invalidation; reads never leave the process. A cache is known on the wire by its ``LOCATION``
(as in ``LocMemCache``, one name, one storage): give each MeshCache alias its own.
"""

from __future__ import annotations

import glob
import pickle
import threading
import time
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

from django.core.cache.backends.base import DEFAULT_TIMEOUT, InvalidCacheKey
from django.core.cache.backends.locmem import LocMemCache
from django.core.signals import setting_changed
from django.utils.module_loading import import_string

from django_warpmesh import conf
from django_warpmesh.node import MeshNode, NullNode, process
from django_warpmesh.protocol import OpCode, encodable
from django_warpmesh.store import (
    APPLIERS,
    MAX_FILL_NOTES,
    LocMemStore,
    existing_stores,
    get_store,
    reset_stores_after_fork,
)
from django_warpmesh.tags import normalize


def _build_node() -> MeshNode | NullNode:
    from django_warpmesh.node_factory import build_node

    return build_node()


def _degraded_timeout() -> float | None:
    from django_warpmesh.conf import get_settings

    return get_settings().degraded_timeout


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


_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Wire the cache layer into this process; importing this module does nothing.

    Gives the node layer what it builds a node from (the factory, the stores made so far, the
    degraded cap), resets the stores in a forked child, and forgets the MeshCache locations
    when a test overrides ``CACHES``. Idempotent. Called by the app's ``ready()``, and by the
    first MeshCache (and :func:`invalidate_tags`): a MeshCache also works, the mesh included,
    in a project that does not list ``django_warpmesh`` in ``INSTALLED_APPS``.
    """
    global _installed
    if _installed:
        return
    with _install_lock:
        if _installed:
            return
        process.set_node_factory(_build_node, existing_stores, _degraded_timeout)
        process.on_fork_in_child(reset_stores_after_fork)
        process.install_hooks()
        setting_changed.connect(
            _caches_changed, dispatch_uid="django_warpmesh.cache.caches_changed"
        )
        conf.install()
        _installed = True


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
    install()
    node = process.get_node() if start else process.current_node()
    names = dict.fromkeys((*mesh_locations(), *existing_stores()))
    for name in names:
        store = get_store(name)
        with store.lock:
            store._forget_tags(tags)
            if node is not None:
                node.publish(name, OpCode.TAGS, list(tags))
    if node is not None:
        node.deliver()


# Called unbound, without super(): a read's own cost is what the mesh must not add to.
_locmem_get = LocMemCache.get


class MeshCache(LocMemCache):
    """A ``LocMemCache`` whose mutations invalidate the same cache in every peer process."""

    def __init__(self, name: str, params: dict[str, Any]) -> None:
        super().__init__(name, params)  # Django passes the LOCATION as the name
        install()
        self._location = name
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
        node.publish(self._location, OpCode.DELETE_UNLESS, (key, pickled))

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
            node.publish(self._location, OpCode.DELETE, [key])
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
            node.publish(self._location, OpCode.DELETE, made)
        node.deliver()

    def clear(self) -> None:
        node = process.get_node()
        with self._store.lock:
            self._store._forget_all()
            node.publish(self._location, OpCode.CLEAR, None)
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
            node.publish(self._location, OpCode.PATTERN, full_pattern)
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


__all__ = [
    "APPLIERS",
    "MAX_FILL_NOTES",
    "LocMemStore",
    "MeshCache",
    "add_store_guard",
    "get_store",
    "install",
    "invalidate",
    "invalidate_tags",
]
