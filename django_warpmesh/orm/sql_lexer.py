"""Statements as tokens: just enough of SQL to read the statements Django writes.

The lexer knows quoted names, string literals, comments and ``%s`` placeholders, and gives up
(None) where a database could read the text otherwise: backslash escapes, dollar quoting,
nested block comments, an unclosed quote. The readers built on it raise _NotUnderstood at
anything in a shape they do not know, and their callers then assume the worst.
"""

from __future__ import annotations

import re

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


def _words(tokens: list[_Token], at: int, *keywords: str) -> bool:
    """Whether ``keywords`` follow one another from ``at``."""
    following = tokens[at : at + len(keywords)]
    return len(following) == len(keywords) and all(
        _word(token, keyword) for token, keyword in zip(following, keywords, strict=True)
    )
