"""Catch every model write and invalidate the cache entries tagged with what it touched.

Two hooks, each doing what it knows best:

- **Signals** (``post_save``, ``post_delete``, ``m2m_changed``), connected per model with
  ``sender=`` so models left out keep Django's fast-delete path. They know the row, so they
  invalidate row tags (which also evict entries tagged with the row's table).
- **An execute wrapper** on every database connection (Django's ``execute_wrappers``): it sees
  the writes that send no signal (``QuerySet.update()``, ``bulk_create``, ``bulk_update``, fast
  deletes, raw SQL through Django's connections) and invalidates the tables they name. Statements
  issued by a ``save()``/``delete()`` whose signal will follow are *claimed* by that signal's
  ``pre_`` twin and skipped here, so a single-row save does not evict every row of its table.
  A claim covers one statement per table and lives only while the ``save_base()`` or
  ``Collector.delete()`` call that made it is on the stack: any other write to the table, even
  one made by a signal receiver during the save, is invalidated table-wide, and a save that fails
  before reaching the database leaves no claim behind.

Inside ``atomic()`` a write invalidates at once (so no other process keeps serving the old value
while the transaction runs) and again when the outermost transaction commits (so nothing read
from the database before the commit survives it). A value the writing thread tags with what it
has itself written, while its transaction is still open, is not stored: a rollback could make it
a lie. All per-thread state is checked lazily against the connection's real transaction state,
so an exception inside ``atomic()`` cannot leave it dirty.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import request_finished, setting_changed
from django.db import connections, models, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created
from django.db.models.deletion import Collector
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete, pre_save

from django_warpmesh.cache import add_store_guard, invalidate_tags
from django_warpmesh.conf import get_settings
from django_warpmesh.tags import conflicts, row_tag, table_tag

logger = logging.getLogger("django_warpmesh")

# Where pre_save / pre_delete are sent from: the frames a claim belongs to.
_CLAIMING_CODE = frozenset({models.Model.save_base.__code__, Collector.delete.__code__})
_WRITE_VERBS = ("INSERT", "UPDATE", "DELETE", "REPLACE", "TRUNCATE", "ALTER", "DROP", "MERGE")
_CTE_WRITE = re.compile(r"\b(INSERT|UPDATE|DELETE|MERGE)\b", re.IGNORECASE)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_DISPATCH = "django_warpmesh.orm"


class _Claim:
    """Statements a save/delete in progress will issue: per table, how many are still owed."""

    __slots__ = ("frame", "owed")

    def __init__(self, frame: FrameType) -> None:
        self.frame = frame
        self.owed: dict[str, int] = {}


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.disabled = 0
        self.claims: list[_Claim] = []
        # Per database alias: tags this thread wrote in its still-open transaction.
        self.dirty: dict[str, set[str]] = {}


_state = _ThreadState()


class _Registry:
    """Which models are watched, and the tables they live in."""

    def __init__(self) -> None:
        self.models: list[type[models.Model]] = []
        self.tables: frozenset[str] = frozenset()
        # For a watched table: its own and its concrete parents' tables (multi-table inheritance).
        self.lineage: dict[type[models.Model], tuple[str, ...]] = {}
        # For a DELETE on a table: tables whose rows a database-level cascade may remove.
        self.referencing: dict[str, frozenset[str]] = {}
        self.through: list[type[models.Model]] = []


_registry = _Registry()


def selected_models() -> list[type[models.Model]]:
    """The concrete models whose writes are caught, after ORM_INCLUDE / ORM_EXCLUDE."""
    config = get_settings()
    chosen = []
    for model in apps.get_models(include_auto_created=False):
        meta = model._meta
        if meta.app_label == "django_warpmesh":
            continue  # The peer table is written by every node every few seconds.
        labels = {meta.app_label, meta.label}
        if config.orm_include and not labels & set(config.orm_include):
            continue
        if labels & set(config.orm_exclude):
            continue
        chosen.append(model)
    return chosen


def unknown_labels() -> list[str]:
    """ORM_INCLUDE / ORM_EXCLUDE entries naming no installed app or model (system check)."""
    config = get_settings()
    known = set()
    for model in apps.get_models():
        known.update({model._meta.app_label, model._meta.label})
    return [label for label in (*config.orm_include, *config.orm_exclude) if label not in known]


def install() -> None:
    """Connect the hooks for the current settings (again, if they changed). Idempotent."""
    uninstall()
    config = get_settings()
    if not config.orm:
        return
    unknown = unknown_labels()
    if unknown:
        raise ImproperlyConfigured(
            f"WARPMESH['ORM_INCLUDE'/'ORM_EXCLUDE'] name no installed app or model: "
            f"{', '.join(unknown)}."
        )
    chosen = selected_models()
    registry = _Registry()
    registry.models = chosen
    tables: set[str] = set()
    for model in chosen:
        # A proxy's rows live in its concrete model's table (and its parents', if any).
        concrete = model._meta.concrete_model or model
        lineage = [concrete._meta.db_table]
        lineage += [parent._meta.db_table for parent in concrete._meta.get_parent_list()]
        registry.lineage[model] = tuple(dict.fromkeys(lineage))
        tables.update(lineage)
        for m2m in model._meta.local_many_to_many:
            through: Any = m2m.remote_field.through
            if (
                isinstance(through, type)
                and issubclass(through, models.Model)
                and (through not in registry.through)
            ):
                registry.through.append(through)
                tables.add(through._meta.db_table)
    referencing: dict[str, set[str]] = {}
    for model in apps.get_models(include_auto_created=True):
        for field in model._meta.concrete_fields:
            target: Any = getattr(field.remote_field, "model", None) if field.is_relation else None
            if (
                isinstance(target, type)
                and issubclass(target, models.Model)
                and (model._meta.db_table in tables)
            ):
                referencing.setdefault(target._meta.db_table, set()).add(model._meta.db_table)
    registry.tables = frozenset(tables)
    registry.referencing = {table: frozenset(refs) for table, refs in referencing.items()}
    global _registry
    _registry = registry
    for model in chosen:
        uid = f"{_DISPATCH}.{model._meta.label}"
        pre_save.connect(_claim, sender=model, dispatch_uid=uid, weak=False)
        pre_delete.connect(_claim, sender=model, dispatch_uid=uid, weak=False)
        post_save.connect(_on_saved, sender=model, dispatch_uid=uid, weak=False)
        post_delete.connect(_on_deleted, sender=model, dispatch_uid=uid, weak=False)
    for through in registry.through:
        uid = f"{_DISPATCH}.{through._meta.label}"
        m2m_changed.connect(_on_m2m_changed, sender=through, dispatch_uid=uid, weak=False)
    connection_created.connect(_on_connection_created, dispatch_uid=_DISPATCH, weak=False)
    for connection in connections.all(initialized_only=True):
        _wrap(connection)
    request_finished.connect(_drop_all_claims, dispatch_uid=_DISPATCH, weak=False)


def uninstall() -> None:
    for model in _registry.models:
        uid = f"{_DISPATCH}.{model._meta.label}"
        for signal in (pre_save, pre_delete, post_save, post_delete):
            signal.disconnect(sender=model, dispatch_uid=uid)
    for through in _registry.through:
        m2m_changed.disconnect(sender=through, dispatch_uid=f"{_DISPATCH}.{through._meta.label}")
    connection_created.disconnect(dispatch_uid=_DISPATCH)
    request_finished.disconnect(dispatch_uid=_DISPATCH)
    _registry.models = []
    _registry.through = []
    _registry.tables = frozenset()


def _reinstall(**kwargs: Any) -> None:
    if kwargs.get("setting") == "WARPMESH" and apps.ready:
        try:
            install()
        except ImproperlyConfigured:
            uninstall()  # Invalid settings: the settings check reports them.


setting_changed.connect(_reinstall, dispatch_uid=f"{_DISPATCH}.reinstall")


@contextlib.contextmanager
def no_invalidation() -> Iterator[None]:
    """Within the block, this thread's model writes invalidate nothing (bulk loads, fixtures).

    The caller takes responsibility: typically ``invalidate(Model)`` or ``cache.clear()`` after.
    """
    _state.disabled += 1
    try:
        yield
    finally:
        _state.disabled -= 1


# -- invalidating ---------------------------------------------------------------------------


def invalidate_for_write(tags: tuple[str, ...], using: str | None) -> None:
    """Invalidate now, and again when the outermost transaction on ``using`` commits."""
    if not tags:
        return
    invalidate_tags(tags)
    alias = using or "default"
    if alias in connections and connections[alias].in_atomic_block:
        _state.dirty.setdefault(alias, set()).update(tags)
        transaction.on_commit(functools.partial(invalidate_tags, tags), using=alias, robust=True)


def _uncommitted_by_this_thread(tags: tuple[str, ...]) -> bool:
    """Store guard: False for a value tagged with what this thread wrote in an open transaction."""
    dirty = _state.dirty
    if not dirty:
        return True
    for alias in list(dirty):
        if not connections[alias].in_atomic_block:
            del dirty[alias]  # Committed or rolled back: either way, over.
        elif conflicts(tags, dirty[alias]):
            return False
    return True


add_store_guard(_uncommitted_by_this_thread)


def _row_tags(model: type[models.Model], pk: object) -> tuple[str, ...]:
    lineage = _registry.lineage.get(model, (model._meta.db_table,))
    return tuple(row_tag(table, pk) for table in lineage)


# -- signals ----------------------------------------------------------------------------------


def _claim(sender: type[models.Model], **kwargs: Any) -> None:
    if _state.disabled:
        return
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code not in _CLAIMING_CODE:
        frame = frame.f_back
    if frame is None:
        return  # Sent by someone else: claim nothing, the wrapper invalidates table-wide.
    claims = _state.claims
    if claims:
        live = _live_frames()
        claims[:] = [claim for claim in claims if id(claim.frame) in live]
    claim = next((c for c in claims if c.frame is frame), None)
    if claim is None:
        claim = _Claim(frame)
        claims.append(claim)
    for table in _registry.lineage.get(sender, ()):
        claim.owed[table] = claim.owed.get(table, 0) + 1


def _on_saved(sender: type[models.Model], instance: models.Model, **kwargs: Any) -> None:
    if _state.disabled:
        return
    invalidate_for_write(_row_tags(sender, instance.pk), kwargs.get("using"))


def _on_deleted(sender: type[models.Model], instance: models.Model, **kwargs: Any) -> None:
    if _state.disabled:
        return
    invalidate_for_write(_row_tags(sender, instance.pk), kwargs.get("using"))


def _on_m2m_changed(
    sender: type[models.Model],
    instance: models.Model,
    action: str,
    model: type[models.Model],
    pk_set: set[Any] | None,
    **kwargs: Any,
) -> None:
    if _state.disabled or not action.startswith("post_"):
        return
    tags = [*_row_tags(type(instance), instance.pk), table_tag(sender._meta.db_table)]
    if pk_set is None:
        # clear(): which related rows lost the relation is unknown; their table covers them.
        tags.append(table_tag(model._meta.db_table))
    else:
        tags.extend(tag for pk in pk_set for tag in _row_tags(model, pk))
    invalidate_for_write(tuple(dict.fromkeys(tags)), kwargs.get("using"))


def _drop_all_claims(**kwargs: Any) -> None:
    # A claim's frame keeps that frame's locals alive: let go of them at the end of a request.
    _state.claims.clear()


# -- the execute wrapper ----------------------------------------------------------------------


def _on_connection_created(connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    _wrap(connection)


def _wrap(connection: BaseDatabaseWrapper) -> None:
    if _execute_wrapper not in connection.execute_wrappers:
        connection.execute_wrappers.append(_execute_wrapper)


def tables_in(sql: str, among: frozenset[str] | None = None) -> set[str]:
    """The tables a statement names (quoted or not), among the watched ones by default."""
    known = _registry.tables if among is None else among
    return {word for word in _IDENTIFIER.findall(sql) if word in known}


@functools.lru_cache(maxsize=1)
def all_tables() -> frozenset[str]:
    """Every installed model's table, m2m tables included."""
    return frozenset(m._meta.db_table for m in apps.get_models(include_auto_created=True))


def _is_write(sql: str) -> bool:
    head = sql.lstrip()[:9].upper()
    if head.startswith(_WRITE_VERBS):
        return True
    return head.startswith("WITH") and _CTE_WRITE.search(sql) is not None


def _execute_wrapper(
    execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: dict[str, Any]
) -> Any:
    text = sql if isinstance(sql, str) else str(sql)
    if _state.disabled or not _registry.tables or not _is_write(text):
        return execute(sql, params, many, context)
    tables = tables_in(text)
    if not tables:
        return execute(sql, params, many, context)
    claimed = _take_claims(tables) if _state.claims else set()
    alias = context["connection"].alias
    try:
        result = execute(sql, params, many, context)
    except Exception:
        if claimed:
            # The save fails, so its post_ signal never comes; assume the statement did
            # something rather than leave anything stale.
            invalidate_for_write(tuple(table_tag(t) for t in sorted(claimed)), alias)
        raise
    unclaimed = tables - claimed
    if unclaimed:
        if text.lstrip()[:8].upper().startswith(("DELETE", "TRUNCATE")):
            for table in list(unclaimed):
                unclaimed |= _registry.referencing.get(table, frozenset())
        invalidate_for_write(tuple(table_tag(t) for t in sorted(unclaimed)), alias)
    return result


def _take_claims(tables: Iterable[str]) -> set[str]:
    """Tables this statement is owed to a save/delete still running; consume those claims."""
    live = _live_frames()
    claims = [claim for claim in _state.claims if id(claim.frame) in live]
    _state.claims = claims
    taken = set()
    for table in tables:
        for claim in reversed(claims):  # The innermost save first.
            owed = claim.owed.get(table, 0)
            if owed:
                claim.owed[table] = owed - 1
                taken.add(table)
                break
    return taken


def _live_frames() -> set[int]:
    frames = set()
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        frames.add(id(frame))
        frame = frame.f_back
    return frames
