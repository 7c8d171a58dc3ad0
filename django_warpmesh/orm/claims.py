"""Claims: the statements a ``save()`` or ``delete()`` issues itself, which its own post_ signal
will invalidate by row, so the execute wrapper lets them through.

Without them a single-row save would evict every row of its table. A claim is made by the
signal's ``pre_`` twin and names the rows (by primary key) a ``save_base()`` will UPDATE or a
``Collector.delete()`` will DELETE (or UPDATE first), and for a save one INSERT per table; the
statements it expects consume the rows they cover. It serves only statements that call issues
itself while it runs, not those of a receiver of its signals, and whose WHERE clause names
claimed rows only: any other write to the table is invalidated table-wide, and a save that fails
before reaching the database leaves nothing claimed behind.

Claims belong to frames: the save or delete is found by walking the stack to its code.
"""

from __future__ import annotations

import contextlib
import sys
from types import FrameType
from typing import Any

from django.db import models
from django.db.models.deletion import Collector
from django.dispatch import Signal

from django_warpmesh.orm import watched
from django_warpmesh.orm.sql_lexer import _names, _NotUnderstood, _tokens
from django_warpmesh.orm.sql_statement import _side_of, _Statement, _to_python, _Where
from django_warpmesh.orm.state import _state

# Where pre_save / pre_delete are sent from: the frames a claim belongs to.
_SAVE_BASE = models.Model.save_base.__code__
_CLAIMING_CODE = frozenset({_SAVE_BASE, Collector.delete.__code__})
# Between a claiming frame and a statement, one of these means a signal receiver wrote it.
_SENDING_CODE = frozenset({Signal.send.__code__, Signal.send_robust.__code__})


class _Claim:
    """What a save or delete in progress will write itself, per table: the rows (primary keys) a
    save will UPDATE or a delete will DELETE, and the tables a save may INSERT one row into."""

    __slots__ = ("frame", "inserts", "rows", "saving")

    def __init__(self, frame: FrameType) -> None:
        self.frame = frame
        self.saving = frame.f_code is _SAVE_BASE
        self.rows: dict[str, set[Any]] = {}
        self.inserts: set[str] = set()


def _claim(sender: type[models.Model], instance: models.Model | None = None, **kwargs: Any) -> None:
    """Receiver of pre_save and pre_delete: claim the row for the save or delete sending it."""
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


def _drop_all_claims(**kwargs: Any) -> None:
    # A claim's frame keeps that frame's locals alive: let go of them at the end of a request.
    _state.claims.clear()


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
    return _take_claimed_rows(claim, statement, table, params, vendor)


def _take_claimed_rows(
    claim: _Claim, statement: _Statement, table: str, params: Any, vendor: str
) -> str | None:
    """``table``, for an UPDATE or DELETE whose WHERE clause names rows ``claim`` holds only
    (those rows consumed by the statements the claim expects), else None."""
    # A save expects its UPDATEs; a delete its DELETEs, and also UPDATEs of the rows it is
    # about to delete (where constraint checks cannot be deferred, as on MySQL, Django first
    # sets their nullable foreign keys to NULL): post_delete will name those rows.
    expected = "UPDATE" if claim.saving else "DELETE"
    rows = claim.rows.get(table)
    key = watched._registry.primary_keys.get(table)
    where = statement.where()
    if statement.verb not in (expected, "UPDATE") or not rows or not key or not where:
        return None
    try:
        allowed = _Where(
            statement.tokens,
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
