"""Tags: what a cached value depends on, as strings that travel on the wire.

Three kinds, one namespace:

- a **table** tag (``t:<db_table>``), for a model class: the value depends on the whole table;
- a **row** tag (``r:<db_table>:<pk>``), for a saved model instance: it depends on that row;
- a **named** tag (``s:<text>``), for a plain string chosen by the application.

Invalidating a row tag evicts the entries tagged with that row *and* with its table (a list
of products depends on every product); invalidating a table tag evicts the entries tagged with
the table and with any of its rows (a write whose rows are unknown, such as ``QuerySet.update()``).
The two functions at the bottom encode that relation for the fill race: what an invalidation
marks, and which marks a pending entry must watch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

TABLE = "t:"
ROW = "r:"
NAMED = "s:"
# Marks "some row of this table was written": watched by table-tagged entries being filled.
ROW_WRITTEN = "w:"


def table_tag(db_table: str) -> str:
    return TABLE + db_table


def row_tag(db_table: str, pk: object) -> str:
    return f"{ROW}{db_table}:{pk}"


def table_of(tag: str) -> str | None:
    """The table tag a row tag belongs to (None for table and named tags)."""
    if tag.startswith(ROW):
        table, _, _ = tag[len(ROW) :].partition(":")
        return TABLE + table
    return None


def tag_for(obj: Any) -> str:
    """Normalise a tag given by the user: a model class, a saved instance, or a string."""
    from django.db.models import Model

    if isinstance(obj, str):
        return NAMED + obj
    if isinstance(obj, type) and issubclass(obj, Model):
        return table_tag(obj._meta.db_table)
    if isinstance(obj, Model):
        if obj.pk is None:
            raise ValueError(f"Cannot tag with an unsaved {type(obj).__name__} (its pk is None).")
        return row_tag(obj._meta.db_table, obj.pk)
    raise TypeError(
        f"A tag must be a model class, a model instance or a string, not {type(obj).__name__}."
    )


class Normalized(tuple[str, ...]):
    """Tags already in wire form: passing them on does not normalise them twice."""

    __slots__ = ()


def normalize(tags: Iterable[Any] | None) -> Normalized:
    if isinstance(tags, Normalized):
        return tags
    if not tags:
        return Normalized()
    if isinstance(tags, str):
        raise TypeError("tags must be a list of tags, not a single string.")
    return Normalized(dict.fromkeys(tag_for(tag) for tag in tags))


def marks(invalidated: str) -> tuple[str, ...]:
    """What an invalidation of ``invalidated`` marks as changed, for fills in progress."""
    table = table_of(invalidated)
    if table is not None:
        return (invalidated, ROW_WRITTEN + table[len(TABLE) :])
    return (invalidated,)


def watches(entry_tag: str) -> tuple[str, ...]:
    """The marks that make a value tagged ``entry_tag`` stale."""
    table = table_of(entry_tag)
    if table is not None:
        return (entry_tag, table)
    if entry_tag.startswith(TABLE):
        return (entry_tag, ROW_WRITTEN + entry_tag[len(TABLE) :])
    return (entry_tag,)


def conflicts(entry_tags: Iterable[str], invalidated: Iterable[str]) -> bool:
    """Whether invalidating any of ``invalidated`` would evict an entry tagged ``entry_tags``."""
    marked = {mark for tag in invalidated for mark in marks(tag)}
    return any(watch in marked for tag in entry_tags for watch in watches(tag))
