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
import re
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, NamedTuple

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured, ValidationError
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
from django_warpmesh.orm.watched import _row_tags, _Side, selected_models, unknown_labels
from django_warpmesh.tags import conflicts, table_tag

logger = logging.getLogger("django_warpmesh")

# Where pre_save / pre_delete are sent from: the frames a claim belongs to.
_SAVE_BASE = models.Model.save_base.__code__
_CLAIMING_CODE = frozenset({_SAVE_BASE, Collector.delete.__code__})
# Between a claiming frame and a statement, one of these means a signal receiver wrote it.
_SENDING_CODE = frozenset({Signal.send.__code__, Signal.send_robust.__code__})
# The statements Django issues most that write nothing: one string check and they are through.
_READ_PREFIXES = ("SELECT", "SAVEPOINT", "RELEASE SAVEPOINT", "ROLLBACK TO SAVEPOINT")
# First words of statements that change no existing row (WITH and EXPLAIN are looked into).
# CREATE is one: migrations would otherwise invalidate every table they index.
_READS = frozenset(
    {
        *("SELECT", "VALUES", "TABLE", "SHOW", "DESCRIBE", "DESC", "PRAGMA", "SET", "RESET"),
        *("SAVEPOINT", "RELEASE", "ROLLBACK", "BEGIN", "START", "COMMIT", "END", "LOCK"),
        *("ANALYZE", "ANALYSE", "VACUUM", "LISTEN", "UNLISTEN", "NOTIFY", "DISCARD"),
        *("DECLARE", "FETCH", "MOVE", "CLOSE", "DEALLOCATE"),
        *("CREATE", "COMMENT", "GRANT", "REVOKE"),
    }
)
_DML = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE"})
# Verbs whose tables are read from the statement's identifiers alone. After any other verb, the
# statement is searched for every name it might hold, strings and comments included.
_KNOWN_VERBS = frozenset({*_DML, "REPLACE", "TRUNCATE", "ALTER", "DROP"})
# Verbs that may delete rows, and with them (database-level cascades) rows of other tables;
# "" is several statements, or one that could not be read.
_DELETING = frozenset({"DELETE", "TRUNCATE", "REPLACE", "MERGE", ""})
# Leading spaces, comments and parentheses, then the first word.
_HEAD = re.compile(r"(?:\s+|--[^\n]*|/\*.*?\*/|\()*([^\W\d]\w*)?", re.DOTALL)
# The names in a statement: quoted ("", ``) or not (but not the s of a %s); comments and string
# literals are matched only to be passed over.
_NAME = re.compile(
    r"""--[^\n]*|/\*.*?\*/|'[^']*(?:''[^']*)*'|"((?:[^"]|"")*)"|`((?:[^`]|``)*)`"""
    r"""|(?<![%\w$])([^\W\d][\w$]*)""",
    re.DOTALL,
)
_WORD = re.compile(r"[^\W\d][\w$]*")
# Faster than _WORD (Python's re), for tables whose names it matches whole.
_ASCII_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
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


def tables_in(
    sql: str, among: frozenset[str] | None = None, vendor: str | None = None, *, loose: bool = False
) -> set[str]:
    """The tables a statement names, among the watched ones by default.

    Identifiers are matched as ``vendor``'s database reads them: on PostgreSQL, quoted ones
    exactly and unquoted ones folded to lower case; elsewhere (or with no vendor) in any case.
    With ``loose``, or where quoting could be read wrongly (backslash escapes, dollar quoting,
    more than one block comment), every word counts, in strings and comments too: more tables,
    never fewer.
    """
    index = _index(watched._registry.tables if among is None else among)
    if loose or "\\" in sql or "$" in sql or sql.count("/*") > 1:
        names = {word.lower() for word in _WORD.findall(sql)}
        found = {table for name in names & index.folded.keys() for table in index.folded[name]}
        if index.odd:
            lowered = sql.lower()
            found.update(table for table in index.odd if table.lower() in lowered)
        return found
    if not index.odd and "'" not in sql and "--" not in sql and "/*" not in sql:
        # No literal or comment (Django's own statements): every word is a name, quoted or not.
        words = set(_ASCII_WORD.findall(sql))
        if vendor != "postgresql":
            folded = {word.lower() for word in words} & index.folded.keys()
            return {table for name in folded for table in index.folded[name]}
        found = words & index.exact
        # Only quoting tells whether such a word is a table: "Product" is, Product is product.
        if not any(word.lower() in index.exact for word in words - found):
            return found
    # Comments and string literals come out as empty names; a doubled quote inside a quoted
    # name stands for one quote.
    doubled = '""' in sql or "``" in sql
    matches = _NAME.findall(sql)
    if vendor == "postgresql":
        if doubled:
            matches = [(d.replace('""', '"'), b.replace("``", "`"), w) for d, b, w in matches]
        return {word.lower() if word else double or back for double, back, word in matches} & (
            index.exact
        )
    names = {(double or back or word).lower() for double, back, word in matches}
    if doubled:
        names |= {(d.replace('""', '"') or b.replace("``", "`")).lower() for d, b, _ in matches}
    return {table for name in names & index.folded.keys() for table in index.folded[name]}


class _Index(NamedTuple):
    exact: frozenset[str]
    folded: dict[str, tuple[str, ...]]  # lower case -> the tables spelt so in any case
    odd: tuple[str, ...]  # names that are not one ASCII word


@functools.lru_cache(maxsize=8)
def _index(tables: frozenset[str]) -> _Index:
    folded: dict[str, tuple[str, ...]] = {}
    for table in sorted(tables):
        folded[table.lower()] = (*folded.get(table.lower(), ()), table)
    odd = tuple(sorted(table for table in tables if not _ASCII_WORD.fullmatch(table)))
    return _Index(tables, folded, odd)


@functools.lru_cache(maxsize=1)
def all_tables() -> frozenset[str]:
    """Every installed model's table, m2m tables included."""
    return frozenset(m._meta.db_table for m in apps.get_models(include_auto_created=True))


def _verb(text: str) -> str | None:
    """The verb a statement may write with, upper case ("" for several statements or one that
    cannot be read), or None when it writes nothing."""
    if ";" not in text and text.lstrip()[:6].upper() == "SELECT":
        return None  # Spared the regular expression: raw reads are mostly spelt so.
    match = _HEAD.match(text)
    word = (match.group(1) or "").upper() if match else ""
    if ";" not in text:
        if word in _READS:
            return None
        if word not in ("WITH", "EXPLAIN"):
            return word
    tokens = _lex(text)
    if tokens is None:
        return ""
    verbs = []
    start = 0
    for at, token in enumerate([*tokens, _SEMICOLON]):
        if token == _SEMICOLON:
            if at > start:
                verbs.append(_statement_verb(tokens[start:at]))
            start = at + 1
    writes = [verb for verb in verbs if verb is not None]
    if not writes:
        return None
    return writes[0] if len(writes) == 1 else ""


def _statement_verb(tokens: list[_Token]) -> str | None:
    at = 0
    while at < len(tokens) - 1 and tokens[at] == _OPEN:
        at += 1
    word = tokens[at][1].upper() if tokens[at][0] == "word" else ""
    if word in _READS:
        return None
    if word in ("WITH", "EXPLAIN"):
        # A data-modifying WITH, or EXPLAIN ANALYZE, which runs the statement it explains: the
        # verb of what it writes ("" for several kinds).
        analysed = word == "WITH"
        previous = ""
        inner = set()
        for kind, value in tokens:
            current = value.upper() if kind == "word" else ""
            analysed = analysed or current in ("ANALYZE", "ANALYSE")
            if current in _DML and previous not in ("FOR", "KEY"):
                inner.add(current)  # FOR [NO KEY] UPDATE locks rows, it does not write them.
            previous = current
        if not (inner and analysed):
            return None
        return inner.pop() if len(inner) == 1 else ""
    return word


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


# -- reading statements -------------------------------------------------------------------------
#
# Just enough of SQL to read the statements Django writes for many-to-many changes and the rows
# they touch. Anything in another shape raises _NotUnderstood, and the caller assumes the worst.

_Token = tuple[str, str]  # (kind, text)
_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
    |(?P<comment>--[^\n]*|/\*.*?\*/)
    |(?P<marks>\(\s*%s(?:\s*,\s*%s)*\s*\))
    |(?P<mark>%s)
    |(?P<string>'[^']*(?:''[^']*)*')
    |(?P<quoted>"[^"]*(?:""[^"]*)*"|`[^`]*(?:``[^`]*)*`)
    |(?P<word>[^\W\d][\w$]*)
    |(?P<number>\d[\w.]*)
    |(?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_END: _Token = ("end", "")
_OPEN: _Token = ("other", "(")
_CLOSE: _Token = ("other", ")")
_COMMA: _Token = ("other", ",")
_DOT: _Token = ("other", ".")
_COLON: _Token = ("other", ":")
_SEMICOLON: _Token = ("other", ";")
_WHERE_ENDS = frozenset({"RETURNING", "ORDER", "LIMIT"})
_IGNORING = ((), ("OR", "IGNORE"), ("IGNORE",))  # INSERT modifiers that change no other row


class _NotUnderstood(Exception):
    """The statement is not in a shape read here."""


def _tokens(text: str) -> list[_Token] | None:
    """One statement's tokens, ending in ``_END``; None if unsure or if there are several."""
    tokens = _lex(text)
    if tokens is None:
        return None
    if tokens and tokens[-1] == _SEMICOLON:
        tokens.pop()
    if _SEMICOLON in tokens:
        return None
    tokens.append(_END)
    return tokens


def _lex(text: str) -> list[_Token] | None:
    """The tokens of a text without comments and spaces; None where the lexing is unsure."""
    tokens = []
    for match in _TOKEN.finditer(text):
        kind, value = match.lastgroup or "other", match.group()
        if kind == "space":
            continue
        if kind == "comment":
            if "/*" in value[2:]:
                return None  # PostgreSQL nests block comments, this lexer does not.
            continue
        if (kind == "string" and "\\" in value) or (kind == "other" and value in "'\"`$"):
            return None  # Backslash escapes, dollar quoting, an unclosed quote: not this lexer's.
        tokens.append((kind, value))
    return tokens


def _word(token: _Token, keyword: str) -> bool:
    return token[0] == "word" and token[1].upper() == keyword


def _identifier(token: _Token) -> tuple[str, bool] | None:
    """An identifier token's name, and whether it was quoted."""
    kind, value = token
    if kind == "word":
        return value, False
    if kind == "quoted":
        quote = value[0]
        return value[1:-1].replace(quote * 2, quote), True
    return None


def _names(name: tuple[str, bool], actual: str, vendor: str) -> bool:
    """Whether an identifier, as written, designates the table or column ``actual``."""
    written, quoted = name
    if vendor == "postgresql":
        # Unquoted names are folded to lower case; quoted ones are taken as they are.
        return written == actual if quoted else written.lower() == actual
    # SQLite ignores case; MySQL does for columns, and for tables as lower_case_table_names
    # says. Where a database tells cases apart, matching more names only invalidates more.
    return written.lower() == actual.lower()


class _Statement:
    """A statement's head: its verb, the table it writes and where what follows that starts."""

    __slots__ = ("body", "marks", "modifiers", "target", "tokens", "verb")

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.verb = tokens[0][1].upper() if tokens[0][0] == "word" else ""
        self.marks = sum(1 if k == "mark" else v.count("%s") for k, v in tokens if "mark" in k)
        self.modifiers: tuple[str, ...] = ()
        self.target: tuple[str, bool] | None = None
        self.body = 0
        at = 1
        if self.verb == "INSERT":
            modifiers = []
            while tokens[at][0] == "word" and not _word(tokens[at], "INTO"):
                modifiers.append(tokens[at][1].upper())
                at += 1
            if not _word(tokens[at], "INTO"):
                return
            self.modifiers = tuple(modifiers)
            at += 1
        elif self.verb == "DELETE":
            if not _word(tokens[at], "FROM"):
                return  # MySQL's multi-table DELETE, among others.
            at += 1
        elif self.verb != "UPDATE":
            return
        name = _identifier(tokens[at])
        if name is None:
            return
        at += 1
        while tokens[at] == _DOT and (part := _identifier(tokens[at + 1])) is not None:
            name = part  # schema.table: the table is the last part
            at += 2
        follows = tokens[at]
        if self.verb == "UPDATE" and not _word(follows, "SET"):
            return  # An alias or MySQL's multi-table UPDATE.
        if self.verb == "DELETE" and not (
            follows in (_END, _SEMICOLON) or _word(follows, "WHERE") or _word(follows, "RETURNING")
        ):
            return  # USING, an alias.
        self.target = name
        self.body = at

    def where(self) -> tuple[int, int] | None:
        """Where the condition of an UPDATE's or DELETE's WHERE clause starts, and how many
        ``%s`` come before it."""
        if self.target is None or self.verb not in ("UPDATE", "DELETE"):
            return None
        depth = marks = 0
        for at in range(self.body, len(self.tokens)):
            kind, value = self.tokens[at]
            if kind == "other":
                depth += (value == "(") - (value == ")")
            elif kind == "mark":
                marks += 1
            elif kind == "marks":
                marks += value.count("%s")
            elif depth == 0 and _word((kind, value), "WHERE"):
                return at + 1, marks
        return None

    def positional(self, params: Any) -> list[Any] | tuple[Any, ...]:
        """``params`` as one value per ``%s`` of the statement."""
        if params is None and not self.marks:
            return ()
        if not isinstance(params, (list, tuple)) or len(params) != self.marks:
            raise _NotUnderstood
        return params


def _to_python(field: models.Field[Any, Any], value: Any) -> Any:
    """A parameter as the model holds it (a row tag's pk), e.g. a UUID SQLite was given as hex."""
    try:
        value = field.to_python(value)
        hash(value)
    except (ValidationError, TypeError, ValueError):
        raise _NotUnderstood from None
    return value


class _Where:
    """Which values a WHERE clause allows in the columns ``column`` knows.

    Read: ``AND``, ``OR``, parentheses, ``column = %s``, ``column IN (%s, ...)`` and
    ``column IN (subquery)``; a column missing from the answer may hold anything in the rows the
    clause selects. Anything else raises _NotUnderstood.
    """

    def __init__(
        self,
        tokens: list[_Token],
        at: int,
        params: list[Any] | tuple[Any, ...],
        mark: int,
        column: Callable[[list[tuple[str, bool]]], _Side | None],
    ) -> None:
        self.tokens = tokens
        self.at = at
        self.params = params
        self.mark = mark  # the parameter of the next %s
        self.column = column
        # Every value compared with a known column, wherever in the clause.
        self.named: dict[str, set[Any]] = {}

    def read(self) -> dict[str, set[Any]]:
        values = self._any()
        follows = self.tokens[self.at]
        if follows in (_END, _SEMICOLON) or (
            follows[0] == "word" and follows[1].upper() in _WHERE_ENDS
        ):
            return values
        raise _NotUnderstood

    def _any(self) -> dict[str, set[Any]]:
        values = self._all()
        while _word(self.tokens[self.at], "OR"):
            self.at += 1
            other = self._all()
            # A row of either branch: a column is known only where both branches know it.
            values = {c: values[c] | other[c] for c in values.keys() & other.keys()}
        return values

    def _all(self) -> dict[str, set[Any]]:
        values = self._one()
        while _word(self.tokens[self.at], "AND"):
            self.at += 1
            for column, allowed in self._one().items():
                values[column] = values[column] & allowed if column in values else allowed
        return values

    def _one(self) -> dict[str, set[Any]]:
        tokens = self.tokens
        if tokens[self.at] == _OPEN:
            self.at += 1
            values = self._any()
            self._expect(_CLOSE)
            return values
        path = []
        while (name := _identifier(tokens[self.at])) is not None:
            path.append(name)
            self.at += 1
            if tokens[self.at] != _DOT:
                break
            self.at += 1
        if not path:
            raise _NotUnderstood
        kind, value = tokens[self.at]
        self.at += 1
        if (kind, value) == ("other", "="):
            kind, value = tokens[self.at]
            self.at += 1
            if kind not in ("mark", "marks") or value.count("%s") != 1:
                raise _NotUnderstood
            count = 1
        elif kind == "word" and value.upper() == "IN":
            kind, value = tokens[self.at]
            self.at += 1
            if kind == "marks":
                count = value.count("%s")
            elif (kind, value) == _OPEN:
                self._skip_group()
                return {}  # A subquery: the column is not known.
            else:
                raise _NotUnderstood
        else:
            raise _NotUnderstood
        first, self.mark = self.mark, self.mark + count
        side = self.column(path)
        if side is None:
            return {}
        allowed = {_to_python(side.field, value) for value in self.params[first : self.mark]}
        self.named.setdefault(side.column, set()).update(allowed)
        return {side.column: allowed}

    def _skip_group(self) -> None:
        depth = 1
        while depth:
            kind, value = self.tokens[self.at]
            self.at += 1
            if kind == "end":
                raise _NotUnderstood
            if kind == "other":
                depth += (value == "(") - (value == ")")
            elif kind == "mark":
                self.mark += 1
            elif kind == "marks":
                self.mark += value.count("%s")

    def _expect(self, token: _Token) -> None:
        if self.tokens[self.at] != token:
            raise _NotUnderstood
        self.at += 1


def _side_of(
    path: list[tuple[str, bool]], table: str, sides: tuple[_Side, ...], vendor: str
) -> _Side | None:
    """The through table's foreign key a column reference (``col``, ``table.col``) names."""
    if len(path) > 1 and not _names(path[-2], table, vendor):
        return None
    return next((side for side in sides if _names(path[-1], side.column, vendor)), None)


def _deleted(
    statement: _Statement, table: str, sides: tuple[_Side, ...], params: Any, vendor: str
) -> tuple[dict[str, set[Any]], dict[str, set[Any]]]:
    """Per foreign key of a through table: the values the rows a DELETE removes may hold (a key
    missing: any), and every value its WHERE clause names."""
    tokens, at = statement.tokens, statement.body
    if not _word(tokens[at], "WHERE"):
        return {}, {}  # Every row.
    where = _Where(
        tokens,
        at + 1,
        statement.positional(params),
        0,
        lambda path: _side_of(path, table, sides, vendor),
    )
    return where.read(), where.named


def _inserted(
    statement: _Statement, sides: tuple[_Side, ...], params: Any, many: bool, vendor: str
) -> dict[str, set[Any]]:
    """Per foreign key of a through table, the values an INSERT writes.

    Django's bulk insert: ``INSERT [OR IGNORE | IGNORE] INTO t (a, b) VALUES (%s, %s), ...``
    (parameters row after row, or one row per parameter list with ``many``), or on PostgreSQL
    ``... SELECT * FROM UNNEST((%s)::bigint[], (%s)::bigint[])`` (one array per column).
    """
    if statement.modifiers not in _IGNORING:
        raise _NotUnderstood  # OR REPLACE may delete other rows.
    tokens, at = statement.tokens, statement.body
    if tokens[at] != _OPEN:
        raise _NotUnderstood
    columns: list[_Side | None] = []
    while tokens[at] in (_OPEN, _COMMA):
        name = _identifier(tokens[at + 1])
        if name is None:
            raise _NotUnderstood
        columns.append(next((s for s in sides if _names(name, s.column, vendor)), None))
        at += 2
    if tokens[at] != _CLOSE:
        raise _NotUnderstood
    at += 1
    width = len(columns)
    per_column: list[list[Any]]
    if _word(tokens[at], "VALUES"):
        at += 1
        rows = 0
        while tokens[at][0] == "marks" and tokens[at][1].count("%s") == width:
            rows += 1
            at += 1
            if tokens[at] != _COMMA:
                break
            at += 1
        if not rows or tokens[at - 1] == _COMMA:
            raise _NotUnderstood
        if many:
            if rows != 1 or not isinstance(params, (list, tuple)):
                raise _NotUnderstood  # An iterator: reading it here would use it up.
            matrix = [statement.positional(row) for row in params]
        else:
            flat = statement.positional(params)
            matrix = [flat[i : i + width] for i in range(0, len(flat), width)]
        per_column = [[row[i] for row in matrix] for i in range(width)]
    elif _unnest(tokens, at):
        at = _after_unnest(tokens, at + 5, width)
        arrays = statement.positional(params)
        if many or not all(isinstance(array, (list, tuple)) for array in arrays):
            raise _NotUnderstood
        per_column = [list(array) for array in arrays]
    else:
        raise _NotUnderstood
    if _word(tokens[at], "ON"):
        if not _words(tokens, at + 1, "CONFLICT", "DO", "NOTHING"):
            raise _NotUnderstood  # DO UPDATE rewrites rows already there.
        at += 4
    if not (tokens[at] in (_END, _SEMICOLON) or _word(tokens[at], "RETURNING")):
        raise _NotUnderstood
    return {
        side.column: {_to_python(side.field, value) for value in values}
        for side, values in zip(columns, per_column, strict=True)
        if side is not None
    }


def _words(tokens: list[_Token], at: int, *keywords: str) -> bool:
    """Whether ``keywords`` follow one another from ``at``."""
    following = tokens[at : at + len(keywords)]
    return len(following) == len(keywords) and all(
        _word(token, keyword) for token, keyword in zip(following, keywords, strict=True)
    )


def _unnest(tokens: list[_Token], at: int) -> bool:
    """Whether ``SELECT * FROM UNNEST(`` starts at ``at``."""
    return (
        _word(tokens[at], "SELECT")
        and tokens[at + 1] == ("other", "*")
        and _words(tokens, at + 2, "FROM", "UNNEST")
        and tokens[at + 4] == _OPEN
    )


def _after_unnest(tokens: list[_Token], at: int, width: int) -> int:
    """Past ``(%s)::type[], ...)``: one array per column."""
    for column in range(width):
        if column and tokens[at] != _COMMA:
            raise _NotUnderstood
        at += bool(column)
        if tokens[at][0] != "marks" or tokens[at][1].count("%s") != 1:
            raise _NotUnderstood
        if tokens[at + 1] != _COLON or tokens[at + 2] != _COLON:
            raise _NotUnderstood
        at += 3
        depth = 0
        while depth or tokens[at] not in (_COMMA, _CLOSE):
            kind, value = tokens[at]
            if kind == "end" or "mark" in kind:
                raise _NotUnderstood
            if kind == "other":
                depth += (value == "(") - (value == ")")
            at += 1
    if tokens[at] != _CLOSE:
        raise _NotUnderstood
    return at + 1
