"""Caching what is derived from models: a decorator and a queryset helper, both tag-aware.

Both fill through ``MeshCache.get_or_set`` with tags, so a value computed from reads that began
before an invalidation of one of its tags arrived (locally or from a peer) is returned but not
stored.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, TypeVar

from django.core.cache import caches
from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.core.exceptions import EmptyResultSet
from django.db import connections
from django.db.models import Model, QuerySet

from django_warpmesh.cache import MeshCache
from django_warpmesh.orm import all_tables, tables_in
from django_warpmesh.tags import Normalized, normalize, table_tag

P = ParamSpec("P")
R = TypeVar("R")
M = TypeVar("M", bound=Model)


def _mesh_cache(alias: str) -> MeshCache:
    cache = caches[alias]
    if not isinstance(cache, MeshCache):
        raise TypeError(
            f"Cache {alias!r} is a {type(cache).__name__}; tags need a "
            "django_warpmesh.cache.MeshCache."
        )
    return cache


def _digest(*parts: object) -> str:
    try:
        data = pickle.dumps(parts, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise TypeError(f"Cannot build a cache key from these arguments: {exc}") from exc
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def cached_as(
    *tags: Any,
    timeout: float | None = DEFAULT_TIMEOUT,
    cache: str = "default",
    key_prefix: str | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Cache a function's result per arguments, evicted when any of ``tags`` is invalidated.

    ``tags`` are model classes, saved instances or strings. The key is built from the function's
    qualified name and its (picklable) arguments. ``wrapper.invalidate()`` evicts every result
    of the function (it is also tagged with its own name).
    """
    normalized = normalize(tags)

    def decorator(func: Callable[P, R]) -> Callable[P, R]:
        name = key_prefix or f"{func.__module__}.{func.__qualname__}"
        own_tag = f"cached_as:{name}"
        all_tags = Normalized((*normalized, *normalize([own_tag])))

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            key = f"warpmesh:fn:{name}:{_digest(args, sorted(kwargs.items()))}"
            return _mesh_cache(cache).get_or_set(  # type: ignore[no-any-return]
                key, lambda: func(*args, **kwargs), timeout, tags=all_tags
            )

        def invalidate() -> None:
            from django_warpmesh.cache import invalidate as invalidate_tags

            invalidate_tags(own_tag)

        wrapper.invalidate = invalidate  # type: ignore[attr-defined]
        return wrapper

    return decorator


def _tables_of(queryset: QuerySet[Any], sql: str) -> set[str]:
    return {queryset.model._meta.db_table} | tables_in(sql, all_tables())


def cached_queryset(
    queryset: QuerySet[M],
    timeout: float | None = DEFAULT_TIMEOUT,
    *,
    cache: str = "default",
    tags: Iterable[Any] = (),
    key: str | None = None,
) -> list[M]:
    """The queryset's results as a list, cached and tagged with every table the query reads.

    Any write to one of those tables (on any instance of the mesh) evicts it. Without ``key``,
    the key is the query's SQL and parameters on its database, so equal querysets share one
    entry, and every call compiles the query (Django's compiler: a few hundred microseconds).
    With ``key`` (which must then identify the query), a hit is a plain cache read and the query
    is compiled only to fill.
    """
    mesh = _mesh_cache(cache)
    if key is not None:
        hit = mesh.get(key, _MISSING)
        if hit is not _MISSING:
            return hit  # type: ignore[no-any-return]
    try:
        sql, params = queryset.query.get_compiler(using=queryset.db).as_sql()
    except EmptyResultSet:
        return []  # .none() or an impossible filter: no query, nothing to cache.
    if key is None:
        vendor = connections[queryset.db].vendor
        key = f"warpmesh:qs:{_digest(queryset.db, vendor, sql, tuple(map(repr, params)))}"
    all_tags = Normalized(
        (*(table_tag(table) for table in sorted(_tables_of(queryset, sql))), *normalize(tags))
    )
    result: list[M] = mesh.get_or_set(
        # A clone each time: a QuerySet caches its own results once evaluated.
        key,
        lambda: list(queryset.all()),
        timeout,
        tags=all_tags,
    )
    return result


_MISSING = object()
