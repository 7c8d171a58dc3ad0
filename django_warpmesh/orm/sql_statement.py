"""Reading one statement: the table it writes, and the rows its WHERE clause or VALUES name.

Enough for the statements Django writes for a save, a delete and a many-to-many change. Anything
in another shape raises _NotUnderstood (or IndexError, where a statement ends before a token the
reader looks ahead to), and the caller assumes the worst.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.core.exceptions import ValidationError
from django.db import models

from django_warpmesh.orm.sql_lexer import (
    _CLOSE,
    _COLON,
    _COMMA,
    _DOT,
    _END,
    _OPEN,
    _SEMICOLON,
    _identifier,
    _names,
    _NotUnderstood,
    _Token,
    _word,
    _words,
)
from django_warpmesh.orm.watched import _Side

_WHERE_ENDS = frozenset({"RETURNING", "ORDER", "LIMIT"})
_IGNORING = ((), ("OR", "IGNORE"), ("IGNORE",))  # INSERT modifiers that change no other row


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
    tokens = statement.tokens
    columns, at = _insert_columns(tokens, statement.body, sides, vendor)
    per_column: list[list[Any]]
    if _word(tokens[at], "VALUES"):
        per_column, at = _values(statement, at + 1, len(columns), params, many)
    elif _unnest(tokens, at):
        per_column, at = _unnested(statement, at + 5, len(columns), params, many)
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


def _insert_columns(
    tokens: list[_Token], at: int, sides: tuple[_Side, ...], vendor: str
) -> tuple[list[_Side | None], int]:
    """The side each column of an INSERT's ``(a, b)`` list names (None: no foreign key read
    here), and where what follows the list starts."""
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
    return columns, at + 1


def _values(
    statement: _Statement, at: int, width: int, params: Any, many: bool
) -> tuple[list[list[Any]], int]:
    """Past ``VALUES`` at ``at``: the values of each column, ``(%s, %s), ...`` row after row,
    and where what follows the rows starts."""
    tokens = statement.tokens
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
    return [[row[i] for row in matrix] for i in range(width)], at


def _unnested(
    statement: _Statement, at: int, width: int, params: Any, many: bool
) -> tuple[list[list[Any]], int]:
    """Past ``SELECT * FROM UNNEST(`` at ``at``: the values of each column, an array each, and
    where what follows the ``UNNEST(...)`` starts."""
    at = _after_unnest(statement.tokens, at, width)
    arrays = statement.positional(params)
    if many or not all(isinstance(array, (list, tuple)) for array in arrays):
        raise _NotUnderstood
    return [list(array) for array in arrays], at


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
