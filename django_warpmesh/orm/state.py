"""What each thread carries: how deep in ``no_invalidation()`` it is, the claims of its saves and
deletes in progress, and the tags it wrote in transactions still open.

Checked lazily against the connection's real transaction state (``transactions.py``), so an
exception inside ``atomic()`` cannot leave it dirty.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from django_warpmesh.orm.claims import _Claim


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.disabled = 0
        self.claims: list[_Claim] = []
        # Per database alias: tags this thread wrote in its still-open transaction.
        self.dirty: dict[str, set[str]] = {}


_state = _ThreadState()


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
