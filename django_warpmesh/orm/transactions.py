"""Invalidating a write at once and again when its transaction commits, and not storing what
this thread wrote in a transaction still open.

Inside ``atomic()`` a write invalidates at once (so no other process keeps serving the old value
while the transaction runs) and again when the outermost transaction commits (so nothing read
from the database before the commit survives it). A value the writing thread tags with what it
has itself written, while its transaction is still open, is not stored: a rollback could make it
a lie.
"""

from __future__ import annotations

import functools

from django.db import connections, transaction

from django_warpmesh.cache import invalidate_tags
from django_warpmesh.conf import running_migration_command
from django_warpmesh.orm.state import _state
from django_warpmesh.tags import conflicts


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
    """Store guard (``install()`` adds it): False for a value tagged with what this thread wrote
    in an open transaction."""
    dirty = _state.dirty
    if not dirty:
        return True
    for alias in list(dirty):
        if not connections[alias].in_atomic_block:
            del dirty[alias]  # Committed or rolled back: either way, over.
        elif conflicts(tags, dirty[alias]):
            return False
    return True
