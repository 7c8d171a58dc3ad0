"""Catch every model write and invalidate the cache entries tagged with what it touched.

Two hooks, each doing what it knows best:

- **Signals** (``post_save``, ``post_delete``, ``m2m_changed``; ``receivers.py``), connected per
  model. They know the row, so they invalidate row tags.
- **An execute wrapper** on every database connection (``execute_wrapper.py``): it sees the
  writes that send no signal (``QuerySet.update()``, bulk operations, fast deletes, raw SQL) and
  invalidates the tables they name, and the rows of many-to-many writes it can read. Statements
  a ``save()``/``delete()`` issues itself are *claimed* (``claims.py``) and left to its signal,
  so a single-row save does not evict every row of its table.

The rest: ``watched.py`` chooses the models (ORM_INCLUDE / ORM_EXCLUDE) and records their
tables; ``hooks.py`` connects it all (``install()``) and disconnects it (``uninstall()``);
``transactions.py`` invalidates again at commit and keeps a thread's uncommitted writes out of
the cache; ``state.py`` is the per-thread state (``no_invalidation()``, claims, uncommitted
tags); ``sql_scan.py``, ``sql_lexer.py`` and ``sql_statement.py`` read statements: whether one
writes and which tables it names, then its tokens, the table it writes and the rows it names.

Names with a leading underscore are the package's own; what this module exports is its API.
"""

from __future__ import annotations

from django_warpmesh.orm.claims import _claim as _claim
from django_warpmesh.orm.execute_wrapper import _execute_wrapper as _execute_wrapper
from django_warpmesh.orm.hooks import install, uninstall
from django_warpmesh.orm.receivers import _on_saved as _on_saved
from django_warpmesh.orm.sql_scan import all_tables, tables_in
from django_warpmesh.orm.state import no_invalidation
from django_warpmesh.orm.transactions import invalidate_for_write
from django_warpmesh.orm.watched import selected_models, unknown_labels

# _claim, _execute_wrapper and _on_saved above: benchmarks/orm_overhead.py times each hook on
# its own, as orm._claim, orm._execute_wrapper and orm._on_saved.

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
