"""The receivers of ``post_save``, ``post_delete`` and ``m2m_changed``: they know the rows a
write touched, so they invalidate row tags (which also evict entries tagged with the row's table).

``m2m_changed`` is received from through models of your own only: Django skips its fast
``add()`` while anyone listens to it, and the execute wrapper reads the writes to auto-created
through tables itself.
"""

from __future__ import annotations

from typing import Any

from django.db import models

from django_warpmesh.orm.state import _state
from django_warpmesh.orm.transactions import invalidate_for_write
from django_warpmesh.orm.watched import _row_tags
from django_warpmesh.tags import table_tag


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
