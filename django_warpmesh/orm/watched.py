"""Which models' writes are caught (ORM_INCLUDE / ORM_EXCLUDE), and the tables they live in.

``install()`` builds a new registry and rebinds ``_registry`` to it: read it as
``watched._registry`` at the time of use, never ``from ... import _registry`` (that copy would
keep the registry of whichever install came before).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from django.apps import apps
from django.db import models

from django_warpmesh.conf import get_settings
from django_warpmesh.tags import row_tag


class _Side(NamedTuple):
    """A column holding primary keys of ``model``: a foreign key of an auto-created through
    table, or a table's own primary key."""

    column: str
    model: type[models.Model]
    field: models.Field[Any, Any]


class _Registry:
    """Which models are watched, and the tables they live in."""

    def __init__(self) -> None:
        self.models: list[type[models.Model]] = []
        self.tables: frozenset[str] = frozenset()
        # For a watched table: its own and its concrete parents' tables (multi-table inheritance).
        self.lineage: dict[type[models.Model], tuple[str, ...]] = {}
        # For a DELETE on a table: tables whose rows a database-level cascade may remove.
        self.referencing: dict[str, frozenset[str]] = {}
        # For a watched model's table (and its parents'): its primary key, which claims name.
        self.primary_keys: dict[str, _Side] = {}
        # Through models of your own: m2m_changed (Django never bulk-adds to them quietly).
        self.through: list[type[models.Model]] = []
        # Auto-created through tables: the execute wrapper reads their rows, both sides.
        self.auto_through: dict[str, tuple[_Side, ...]] = {}


_registry = _Registry()


def selected_models() -> list[type[models.Model]]:
    """The concrete models whose writes are caught, after ORM_INCLUDE / ORM_EXCLUDE."""
    config = get_settings()
    chosen = []
    for model in apps.get_models(include_auto_created=False):
        meta = model._meta
        if meta.app_label == "django_warpmesh":
            continue  # The peer table is written by every node every few seconds.
        labels = {meta.app_label, meta.label}
        if config.orm_include and not labels & set(config.orm_include):
            continue
        if labels & set(config.orm_exclude):
            continue
        chosen.append(model)
    return chosen


def unknown_labels() -> list[str]:
    """ORM_INCLUDE / ORM_EXCLUDE entries naming no installed app or model (system check)."""
    config = get_settings()
    known = set()
    for model in apps.get_models():
        known.update({model._meta.app_label, model._meta.label})
    return [label for label in (*config.orm_include, *config.orm_exclude) if label not in known]


def _build_registry(chosen: list[type[models.Model]]) -> _Registry:
    """The registry watching ``chosen``: their tables, primary keys and through tables."""
    registry = _Registry()
    registry.models = chosen
    tables: set[str] = set()
    for model in chosen:
        tables |= _watch(registry, model)
    registry.tables = frozenset(tables)
    registry.referencing = _referencing(tables)
    return registry


def _watch(registry: _Registry, model: type[models.Model]) -> set[str]:
    """Enter ``model``'s tables, primary keys and through tables; the tables its writes touch."""
    # A proxy's rows live in its concrete model's table (and its parents', if any).
    concrete = model._meta.concrete_model or model
    lineage = [concrete._meta.db_table]
    lineage += [parent._meta.db_table for parent in concrete._meta.get_parent_list()]
    registry.lineage[model] = tuple(dict.fromkeys(lineage))
    tables = set(lineage)
    for owner in (concrete, *concrete._meta.get_parent_list()):
        key = owner._meta.pk
        if key is not None and key.column:
            registry.primary_keys[owner._meta.db_table] = _Side(key.column, owner, key)
    for m2m in model._meta.local_many_to_many:
        through: Any = m2m.remote_field.through
        if not (isinstance(through, type) and issubclass(through, models.Model)):
            continue
        tables.add(through._meta.db_table)
        if through._meta.auto_created:
            registry.auto_through[through._meta.db_table] = _sides(through)
        elif through not in registry.through:
            registry.through.append(through)
    return tables


def _referencing(tables: set[str]) -> dict[str, frozenset[str]]:
    """Per table: the watched ``tables`` holding a foreign key to it, which a database-level
    cascade of a DELETE on it may remove rows from."""
    referencing: dict[str, set[str]] = {}
    for model in apps.get_models(include_auto_created=True):
        for field in model._meta.concrete_fields:
            target: Any = getattr(field.remote_field, "model", None) if field.is_relation else None
            if (
                isinstance(target, type)
                and issubclass(target, models.Model)
                and (model._meta.db_table in tables)
            ):
                referencing.setdefault(target._meta.db_table, set()).add(model._meta.db_table)
    return {table: frozenset(refs) for table, refs in referencing.items()}


def _sides(through: type[models.Model]) -> tuple[_Side, ...]:
    sides = []
    for field in through._meta.concrete_fields:
        target: Any = getattr(field.remote_field, "model", None) if field.is_relation else None
        if isinstance(target, type) and issubclass(target, models.Model) and field.column:
            sides.append(_Side(field.column, target, field))
    return tuple(sides)


def _row_tags(model: type[models.Model], pk: object) -> tuple[str, ...]:
    lineage = _registry.lineage.get(model, (model._meta.db_table,))
    return tuple(row_tag(table, pk) for table in lineage)
