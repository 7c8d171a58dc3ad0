"""Catch every model write and invalidate the cache entries tagged with what it touched.

Two hooks, each doing what it knows best:

- **Signals** (``post_save``, ``post_delete``), connected per model with ``sender=`` so models
  left out keep Django's fast-delete path. They know the row, so they invalidate row tags (which
  also evict entries tagged with the row's table).
- **An execute wrapper** on every database connection (Django's ``execute_wrappers``): it sees the
  writes that send no signal (``QuerySet.update()``, ``bulk_create``, ``bulk_update``, fast deletes,
  raw SQL through Django's connections) and invalidates the tables they name, read as the database
  reads them (and every name they might hold, when in doubt). It also reads the many-to-many writes:
  which rows an INSERT into or a DELETE from an auto-created through table names (Django skips its
  fast ``add()`` while anyone listens to ``m2m_changed``, so only through models of your own still
  get that signal). Statements issued by a ``save()``/``delete()`` whose signal will follow are
  *claimed* by that signal's ``pre_`` twin and skipped here, so a single-row save does not evict
  every row of its table. A claim names the rows (by primary key) a ``save_base()`` will UPDATE or a
  ``Collector.delete()`` will DELETE (or UPDATE first), and for a save one INSERT per table; the
  statements it expects consume the rows they cover. It serves only statements that call issues
  itself while it runs, not those of a receiver of its signals, and whose WHERE clause names claimed
  rows only: any other write to the table is invalidated table-wide, and a save that fails before
  reaching the database leaves nothing claimed behind.

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
import sys
import threading
from collections.abc import Callable, Iterator
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
from django.dispatch import Signal

from django_warpmesh.cache import add_store_guard, invalidate_tags
from django_warpmesh.conf import get_settings, running_migration_command
from django_warpmesh.orm import watched
from django_warpmesh.orm.sql_lexer import (
    _names,
    _NotUnderstood,
    _tokens,
)
from django_warpmesh.orm.sql_scan import (
    _DELETING,
    _KNOWN_VERBS,
    _READ_PREFIXES,
    _verb,
    all_tables,
    tables_in,
)
from django_warpmesh.orm.sql_statement import (
    _deleted,
    _inserted,
    _side_of,
    _Statement,
    _to_python,
    _Where,
)
from django_warpmesh.orm.watched import _row_tags, selected_models, unknown_labels
from django_warpmesh.tags import conflicts, table_tag

__all__ = [
    "all_tables",
    "install",
    "invalidate_for_write",
    "no_invalidation",
    "selected_models",
    "tables_in",
    "uninstall",
    "unknown_labels",
]

logger = logging.getLogger("django_warpmesh")

# Where pre_save / pre_delete are sent from: the frames a claim belongs to.
_SAVE_BASE = models.Model.save_base.__code__
_CLAIMING_CODE = frozenset({_SAVE_BASE, Collector.delete.__code__})
# Between a claiming frame and a statement, one of these means a signal receiver wrote it.
_SENDING_CODE = frozenset({Signal.send.__code__, Signal.send_robust.__code__})
_DISPATCH = "django_warpmesh.orm"


class _Claim:
    """What a save or delete in progress will write itself, per table: the rows (primary keys) a
    save will UPDATE or a delete will DELETE, and the tables a save may INSERT one row into."""

    __slots__ = ("frame", "inserts", "rows", "saving")

    def __init__(self, frame: FrameType) -> None:
        self.frame = frame
        self.saving = frame.f_code is _SAVE_BASE
        self.rows: dict[str, set[Any]] = {}
        self.inserts: set[str] = set()


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.disabled = 0
        self.claims: list[_Claim] = []
        # Per database alias: tags this thread wrote in its still-open transaction.
        self.dirty: dict[str, set[str]] = {}


_state = _ThreadState()


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
    registry = watched._build_registry(chosen)
    watched._registry = registry
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
    for model in watched._registry.models:
        uid = f"{_DISPATCH}.{model._meta.label}"
        for signal in (pre_save, pre_delete, post_save, post_delete):
            signal.disconnect(sender=model, dispatch_uid=uid)
    for through in watched._registry.through:
        m2m_changed.disconnect(sender=through, dispatch_uid=f"{_DISPATCH}.{through._meta.label}")
    connection_created.disconnect(dispatch_uid=_DISPATCH)
    request_finished.disconnect(dispatch_uid=_DISPATCH)
    watched._registry.models = []
    watched._registry.through = []
    watched._registry.auto_through = {}
    watched._registry.primary_keys = {}
    watched._registry.tables = frozenset()


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
    # A migration command's schema work (and SQLite's table remakes) must not make it join the
    # mesh: it applies here, and through a node only if something else already started one.
    start = not running_migration_command()
    invalidate_tags(tags, start=start)
    alias = using or "default"
    if alias in connections and connections[alias].in_atomic_block:
        _state.dirty.setdefault(alias, set()).update(tags)
        transaction.on_commit(
            functools.partial(invalidate_tags, tags, start=start), using=alias, robust=True
        )


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


# -- signals ----------------------------------------------------------------------------------


def _claim(sender: type[models.Model], instance: models.Model | None = None, **kwargs: Any) -> None:
    if _state.disabled:
        return
    frame = sys._getframe(1)
    if frame.f_code in _SENDING_CODE and frame.f_back is not None:
        frame = frame.f_back
    if frame.f_code not in _CLAIMING_CODE:
        return  # Sent by someone else: claim nothing, the wrapper invalidates table-wide.
    claims = _state.claims
    # A delete sends one pre_delete per row from the same frame: its claim is usually the last.
    claim = claims[-1] if claims and claims[-1].frame is frame else None
    if claim is None:
        claim = next((c for c in claims if c.frame is frame), None)
    if claim is None:
        live = _stack(frame)
        claims[:] = [c for c in claims if id(c.frame) in live]
        claim = _Claim(frame)
        claims.append(claim)
    pk = None if instance is None else instance.pk
    for table in watched._registry.lineage.get(sender, ()):
        if claim.saving:
            claim.inserts.add(table)
        key = watched._registry.primary_keys.get(table)
        if pk is not None and key is not None:
            # A pk the field cannot read claims nothing: its statements invalidate table-wide.
            with contextlib.suppress(_NotUnderstood):
                claim.rows.setdefault(table, set()).add(_to_python(key.field, pk))


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


def _text_of(sql: Any, context: dict[str, Any]) -> tuple[str, bool]:
    """A statement given as something other than a str, as text, and whether that is its text
    (False: a description of it, such as its repr, which may name its tables)."""
    if isinstance(sql, (bytes, bytearray, memoryview)):
        return bytes(sql).decode("utf-8", "replace"), True
    as_string = getattr(sql, "as_string", None)
    if callable(as_string):
        # psycopg's sql.Composed renders for a connection or cursor of its own: the driver's
        # cursor under Django's, else none at all (psycopg 3 then assumes UTF-8).
        for adapt_context in (getattr(context.get("cursor"), "cursor", None), None):
            with contextlib.suppress(Exception):
                text = as_string(adapt_context)
                if isinstance(text, str):
                    return text, True
    return str(sql), False


def _execute_wrapper(
    execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: dict[str, Any]
) -> Any:
    if _state.disabled or not watched._registry.tables:
        return execute(sql, params, many, context)
    if isinstance(sql, str):
        if sql.startswith(_READ_PREFIXES) and ";" not in sql:
            return execute(sql, params, many, context)
        text, sure = sql, True
    else:
        text, sure = _text_of(sql, context)
    verb = _verb(text) if sure else ""
    if verb is None:
        return execute(sql, params, many, context)
    connection = context["connection"]
    vendor = connection.vendor
    tables = tables_in(text, vendor=vendor, loose=not sure or verb not in _KNOWN_VERBS)
    if not tables:
        return execute(sql, params, many, context)
    claimed = None
    if _state.claims and verb in ("INSERT", "UPDATE", "DELETE"):
        claimed = _take_claim(text, params, many, tables, vendor)
    try:
        result = execute(sql, params, many, context)
    except Exception:
        if claimed is not None:
            # The save fails, so its post_ signal never comes; assume the statement did
            # something rather than leave anything stale.
            invalidate_for_write((table_tag(claimed),), connection.alias)
        raise
    if claimed is not None:
        tables.discard(claimed)
    tags = _write_tags(text, params, many, tables, vendor, deleting=verb in _DELETING)
    invalidate_for_write(tags, connection.alias)
    return result


def _write_tags(
    text: str, params: Any, many: bool, tables: set[str], vendor: str, *, deleting: bool
) -> tuple[str, ...]:
    """What a write naming ``tables`` (none of them claimed by a save or delete) invalidates."""
    if not tables:
        return ()
    through = watched._registry.auto_through.keys()
    if not deleting and through.isdisjoint(tables):
        return tuple(table_tag(table) for table in sorted(tables))
    cascaded: set[str] = set()
    if deleting:
        for table in tables:
            cascaded |= watched._registry.referencing.get(table, frozenset())
        cascaded -= tables
    tags = [table_tag(table) for table in sorted((tables | cascaded) - through)]
    named = sorted(tables & through)
    if named:
        tokens = _tokens(text)
        statement = None if tokens is None else _Statement(tokens)
        for table in named:
            tags.extend(_m2m_tags(statement, table, params, many, vendor))
    for table in sorted(cascaded & through):
        tags.extend(_m2m_tags(None, table, params, many, vendor))
    return tuple(dict.fromkeys(tags))


def _m2m_tags(
    statement: _Statement | None, table: str, params: Any, many: bool, vendor: str
) -> list[str]:
    """Tags for a statement naming an auto-created through table: the rows of both sides it
    writes where the statement says which, else (never less than that) their whole tables."""
    sides = watched._registry.auto_through[table]
    tags = [table_tag(table)]
    target = None if statement is None else statement.target
    if target is not None and not _names(target, table, vendor):
        return tags  # Another table is written; this one is only read.
    allowed: dict[str, set[Any]] = {}
    named: dict[str, set[Any]] = {}
    # IndexError: a statement cut short where the reader looks ahead.
    with contextlib.suppress(_NotUnderstood, IndexError):
        if statement is None or statement.target is None:
            raise _NotUnderstood
        if statement.verb == "INSERT":
            allowed = named = _inserted(statement, sides, params, many, vendor)
        elif statement.verb == "DELETE" and not many:
            allowed, named = _deleted(statement, table, sides, params, vendor)
    for side in sides:
        rows = allowed.get(side.column)
        if rows is None:
            tags.append(table_tag(side.model._meta.db_table))
            # The table covers its own rows, not a child model's parent rows: those named (the
            # instance a clear() starts from) still get their row tags, as m2m_changed gave them.
            rows = named.get(side.column, set())
        tags.extend(tag for pk in rows for tag in _row_tags(side.model, pk))
    return tags


def _take_claim(text: str, params: Any, many: bool, tables: set[str], vendor: str) -> str | None:
    """The table this statement writes for the save or delete that claimed it (that part of the
    claim consumed), or None: the statement is then invalidated as any other."""
    claim = _claim_in_charge()
    if claim is None or many:
        return None
    tokens = _tokens(text)
    if tokens is None:
        return None
    statement = _Statement(tokens)
    target = statement.target
    table = None if target is None else next((t for t in tables if _names(target, t, vendor)), None)
    if table is None:
        return None
    if statement.verb == "INSERT":
        if claim.saving and table in claim.inserts:
            claim.inserts.discard(table)
            return table
        return None
    # A save expects its UPDATEs; a delete its DELETEs, and also UPDATEs of the rows it is
    # about to delete (where constraint checks cannot be deferred, as on MySQL, Django first
    # sets their nullable foreign keys to NULL): post_delete will name those rows.
    expected = "UPDATE" if claim.saving else "DELETE"
    rows, key, where = (
        claim.rows.get(table),
        watched._registry.primary_keys.get(table),
        statement.where(),
    )
    if statement.verb not in (expected, "UPDATE") or not rows or not key or not where:
        return None
    try:
        allowed = _Where(
            tokens,
            where[0],
            statement.positional(params),
            where[1],
            lambda path: _side_of(path, table, (key,), vendor),
        ).read()
    except (_NotUnderstood, IndexError):
        return None
    pks = allowed.get(key.column)
    if not pks or not pks <= rows:
        return None  # Rows the signals will not name.
    if statement.verb == expected:
        rows -= pks
    return table


def _claim_in_charge() -> _Claim | None:
    """The claim of the save or delete issuing the current statement itself, not through a
    receiver of its signals (whose writes are never the ones a claim expects)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code in _CLAIMING_CODE:
            return next((c for c in reversed(_state.claims) if c.frame is frame), None)
        if code in _SENDING_CODE:
            return None
        frame = frame.f_back
    _state.claims.clear()  # No save or delete is running: every claim is over.
    return None


def _stack(frame: FrameType | None) -> set[int]:
    """``frame`` and its callers."""
    frames = set()
    while frame is not None:
        frames.add(id(frame))
        frame = frame.f_back
    return frames
