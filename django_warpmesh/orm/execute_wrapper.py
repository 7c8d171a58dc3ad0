"""The execute wrapper on every database connection (Django's ``execute_wrappers``).

It sees the writes that send no signal (``QuerySet.update()``, ``bulk_create``, ``bulk_update``,
fast deletes, raw SQL through Django's connections) and invalidates the tables they name, read
as the database reads them (and every name they might hold, when in doubt). It also reads the
many-to-many writes: which rows an INSERT into or a DELETE from an auto-created through table
names. Statements a save or delete has claimed (``claims.py``) are left to its post_ signal.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper

from django_warpmesh.orm import watched
from django_warpmesh.orm.claims import _take_claim
from django_warpmesh.orm.sql_lexer import _names, _NotUnderstood, _tokens
from django_warpmesh.orm.sql_scan import _DELETING, _KNOWN_VERBS, _READ_PREFIXES, _verb, tables_in
from django_warpmesh.orm.sql_statement import _deleted, _inserted, _Statement
from django_warpmesh.orm.state import _state
from django_warpmesh.orm.transactions import invalidate_for_write
from django_warpmesh.orm.watched import _row_tags
from django_warpmesh.tags import table_tag


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
    """Run a statement, then invalidate what it may have written (what a claim covers aside)."""
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
