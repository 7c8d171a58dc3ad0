"""A first look at a statement: whether it writes (its verb), and which tables it names.

The execute wrapper asks this of every statement that does not start as a plain read (and
``cached_queryset`` asks which tables a query names), so the common cases are the cheap ones:
Django's own statements (no literal, no comment) are read by their words alone. Where the text
could be read more than one way, more tables count, never fewer.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

from django.apps import apps

from django_warpmesh.orm import watched
from django_warpmesh.orm.sql_lexer import _OPEN, _SEMICOLON, _lex, _Token

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
