"""django-cachalot on MeshCache: name :class:`CachalotMeshCache` as the backend of the cache
``CACHALOT_CACHE`` points at. See docs/cachalot.md.

cachalot keeps, per table, the time it was last invalidated (a *table key*) and, per query,
``(time, rows)``; it serves a result when every table the query read has a table key no newer
than the result. On a miss it stores the current time in each table key it did not find. Those
times differ from process to process, so on a plain ``MeshCache`` each fill evicts every other
process's copies (a peer keeps a key only if it holds the same value), and two processes that
take turns reading the same queryset never hit. This backend:

- keeps cachalot's fills in this process: stored here only, and only if nothing the query read
  was invalidated, here or by a peer, while it ran (the fill race, checked as ``get_or_set``
  checks it);
- tags each table key with its table (``t:<table>``: MeshCache's ORM hooks invalidate that on
  every process after each write, and again at commit) and with ``s:cachalot:<table>``, which it
  invalidates here and on every peer whenever cachalot sends ``post_invalidation`` (ORM writes,
  raw SQL, ``cachalot.api.invalidate()``, the commit of a transaction that wrote, ``migrate``);
- stores a table key in no other way. cachalot's own invalidation writes the new time into the
  table keys, and the signal that follows evicts them here and everywhere (a miss, then a fill);
  the commit of a transaction writes the times at which its reads ran, which nothing can check
  against what arrived since;
- leaves django_warpmesh's own tables alone: discovery must read the database, and a node's exit
  (which deletes its peer row) must not write to a cache.

Calls that do not come from cachalot's own code (the application's, on the same alias) are
MeshCache's, unchanged.
"""

from __future__ import annotations

import logging
import pickle
import sys
import threading
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from cachalot import settings as cachalot_settings_module
from cachalot.settings import cachalot_settings
from cachalot.signals import post_invalidation
from django.apps import apps
from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.core.signals import setting_changed

from django_warpmesh.cache import MeshCache, invalidate_tags
from django_warpmesh.conf import running_migration_command
from django_warpmesh.node import process
from django_warpmesh.tags import NAMED, table_tag

BACKEND = "django_warpmesh.contrib.cachalot.CachalotMeshCache"
# The named tag a table's cachalot invalidation sends ("s:cachalot:<table>" on the wire).
TAG_PREFIX = "cachalot:"
# Tables cachalot must not cache through this backend: the mesh's own.
OWN_APP = "django_warpmesh"

logger = logging.getLogger("django_warpmesh")


def cachalot_tag(table: str) -> str:
    """The wire tag this backend invalidates when cachalot invalidates ``table``."""
    return f"{NAMED}{TAG_PREFIX}{table}"


def _from_cachalot() -> bool:
    """Whether the caller of our caller is cachalot's own code (not the application's)."""
    return str(sys._getframe(2).f_globals.get("__name__", "")).startswith("cachalot.")


@lru_cache(maxsize=1)
def _table_keys() -> dict[str, tuple[str, bool]]:
    """cachalot's table key -> (its table, whether the table is one of the mesh's own).

    Every model table (managed or not, auto-created through tables included) and
    ``CACHALOT_ADDITIONAL_TABLES``, for every database cachalot caches. A table key found nowhere
    here (a table named only in ``extra(tables=...)``) is never stored: no invalidation could be
    sure to reach it, so such queries are not cached (a miss each time, never stale).
    """
    keygen = cachalot_settings.CACHALOT_TABLE_KEYGEN
    databases = cachalot_settings.CACHALOT_DATABASES
    tables: dict[str, bool] = {}
    for model in apps.get_models(include_auto_created=True):
        tables[model._meta.db_table] = model._meta.app_label == OWN_APP
    for table in cachalot_settings.CACHALOT_ADDITIONAL_TABLES:
        tables.setdefault(table, False)
    return {
        keygen(database, table): (table, own)
        for database in databases
        for table, own in tables.items()
    }


def _settings_changed(**kwargs: object) -> None:
    setting = str(kwargs.get("setting", ""))
    if setting.startswith("CACHALOT_") or setting in {"INSTALLED_APPS", "DATABASES"}:
        _table_keys.cache_clear()


class _OpenFill(threading.local):
    """The fill this thread began with its last cachalot miss: (store, query key, began, tags)."""

    def __init__(self) -> None:
        self.fill: tuple[Any, str, int, tuple[str, ...]] | None = None


_open = _OpenFill()


def _close_abandoned() -> None:
    # A query that raised never reaches set_many: close its fill at this thread's next miss, so
    # the store stops remembering invalidations for it.
    fill, _open.fill = _open.fill, None
    if fill is not None:
        store, key, began, tags = fill
        store.end_fill(began, key, tags)


def _is_hit(keys: list[Any], found: dict[Any, Any]) -> bool:
    """cachalot's own test (``_get_result_or_execute_query``): every table key and the result
    found, the result no older than any table key."""
    if len(found) != len(keys) or len(keys) < 2:
        return False
    *tables, query = keys
    try:
        stamp, _ = found[query]
        return bool(stamp >= max(found[table] for table in tables))
    except (TypeError, ValueError, KeyError):
        return False


class CachalotMeshCache(MeshCache):
    """A ``MeshCache`` for ``CACHALOT_CACHE``: cachalot's fills stay in this process, its
    invalidations reach every process. Any other use of the alias is MeshCache's."""

    # Set once an instance exists in this process: cachalot has used this backend here, so its
    # invalidations have entries of ours to evict (see _invalidated).
    in_use = False

    def __init__(self, name: str, params: dict[str, Any]) -> None:
        super().__init__(name, params)
        install()
        if not CachalotMeshCache.in_use and not apps.is_installed(OWN_APP):
            # cachalot invalidates before each write: a peer reading in between caches the old
            # rows again. The ORM hooks invalidate again after the write (and at commit).
            logger.warning(
                "mesh: %s without '%s' in INSTALLED_APPS: a query another process runs while a "
                "write is under way can cache the rows from before it (see docs/cachalot.md)",
                BACKEND,
                OWN_APP,
            )
        CachalotMeshCache.in_use = True

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        found = super().get_many(keys, version=version)
        if not isinstance(keys, list) or not _from_cachalot():
            # cachalot reads a query as a list (its table keys, then the query's key); the sets
            # its transaction layer reads are not followed by a fill of ours.
            return found
        _close_abandoned()
        if _is_hit(keys, found):
            return found
        # A miss: the query runs after we return. An invalidation that lands from now until
        # its result is stored means the result may predate a write: it is not stored.
        known = _table_keys()
        tags = tuple(
            tag
            for key in keys[:-1]
            if key in known
            for tag in (table_tag(known[key][0]), cachalot_tag(known[key][0]))
        )
        store = self._store
        _open.fill = (store, self.make_key(keys[-1], version=version), store.begin_fill(), tags)
        return found

    def set_many(
        self,
        data: dict[Any, Any],
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[Any] | None = None,
        *,
        local: bool = False,
    ) -> list[Any]:
        if local or tags or not _from_cachalot():
            return super().set_many(data, timeout, version=version, tags=tags, local=local)
        fill, _open.fill = _open.fill, None
        known = _table_keys()
        made = {self.make_and_validate_key(key, version=version): key for key in data}
        if fill is not None and fill[1] not in made:
            fill[0].end_fill(fill[2], fill[1], fill[3])
            fill = None
        if fill is not None:
            # The fill of a miss: its result, and the table keys it did not find (never those
            # of a table no invalidation could be sure to reach).
            keep = {full: key for full, key in made.items() if full == fill[1] or key in known}
        else:
            # cachalot's invalidation (post_invalidation follows) or a transaction's commit:
            # results may be kept, never table keys (see the module's docstring).
            keep = {
                full: key
                for full, key in made.items()
                if key not in known and isinstance(data[key], tuple)
            }
        if any(known[key][1] for key in keep.values() if key in known):
            # A read of the mesh's own tables (discovery): not cached, as no invalidation of
            # them is sent either.
            keep = {}
        self._store_fill(data, keep, timeout, fill, known)
        return []

    def _store_fill(
        self,
        data: dict[Any, Any],
        keep: dict[str, Any],
        timeout: float | None,
        fill: tuple[Any, str, int, tuple[str, ...]] | None,
        known: dict[str, tuple[str, bool]],
    ) -> None:
        store = self._store
        if not keep or (running_migration_command() and process.current_node() is None):
            # Nothing to keep; or a migration command, which must not join the mesh through
            # cachalot's reads: not stored (a miss, in a process about to exit), as no node
            # would hear what the peers send.
            if fill is not None:
                store.end_fill(fill[2], fill[1], fill[3])
            return
        # Pickled inside the fill, as get_or_set does: an invalidation landing meanwhile counts.
        pickled = {
            full: pickle.dumps(data[key], self.pickle_protocol) for full, key in keep.items()
        }
        node = process.get_node()
        with store.lock:
            if fill is not None and not store.close_fill(fill[2], fill[1], fill[3]):
                return  # Something the query read was invalidated while it ran.
            expiry = self._expiry(timeout, node.max_timeout)
            for full, key in keep.items():
                if not node.ready:
                    # The start-up window: this node may have missed invalidations.
                    store._forget(full)
                    continue
                entry = known.get(key)
                entry_tags = (table_tag(entry[0]), cachalot_tag(entry[0])) if entry else ()
                self._put(full, pickled[full], expiry, entry_tags)


def _invalidated(sender: str, **kwargs: Any) -> None:
    """cachalot's ``post_invalidation``: evict the table's keys here and on every peer."""
    table = str(sender)
    if not CachalotMeshCache.in_use or table in _own_tables():
        return
    # Through the node if one runs, without starting one in a migration command (as the ORM
    # hooks do): migrate must not join the mesh.
    invalidate_tags((cachalot_tag(table),), start=not running_migration_command())


@lru_cache(maxsize=1)
def _own_tables() -> frozenset[str]:
    if not apps.is_installed(OWN_APP):
        return frozenset()
    return frozenset(model._meta.db_table for model in apps.get_app_config(OWN_APP).get_models())


def install() -> None:
    """Listen to cachalot's invalidations and to setting changes. Idempotent (the dispatch
    uids); called by the app's ``ready()`` when cachalot is installed, and by the first
    :class:`CachalotMeshCache`."""
    setting_changed.connect(_settings_changed, dispatch_uid="django_warpmesh.contrib.cachalot")
    post_invalidation.connect(_invalidated, dispatch_uid="django_warpmesh.contrib.cachalot")


# cachalot's check (cachalot.W001) warns about any backend not in its list; this one is made for
# it. Subclasses under another path: add "cachalot.W001" to SILENCED_SYSTEM_CHECKS.
cachalot_settings_module.SUPPORTED_CACHE_BACKENDS.add(BACKEND)

__all__ = ["BACKEND", "CachalotMeshCache", "cachalot_tag"]
