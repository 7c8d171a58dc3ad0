"""django-warpmesh: per-process Django caches kept coherent by a peer-to-peer mesh."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def mesh_stats() -> dict[str, Any]:
    """This process's view of the mesh: its node, its peers and its counters."""
    from django_warpmesh.node import NullNode, process

    current = process.current_node()
    if current is None:
        return NullNode("not started: no MeshCache has been used in this process").snapshot()
    return current.snapshot()


_LAZY = {
    "invalidate": "django_warpmesh.cache",
    "cached_as": "django_warpmesh.cached",
    "cached_queryset": "django_warpmesh.cached",
    "no_invalidation": "django_warpmesh.orm",
}


def __getattr__(name: str) -> Any:
    # Imported on first use: these need Django's app registry, this package must not.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__",
    "cached_as",
    "cached_queryset",
    "invalidate",
    "mesh_stats",
    "no_invalidation",
]
