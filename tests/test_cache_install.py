"""The cache layer's wiring into the process: ``cache.install()``, explicit and idempotent, done
by the app's ready() and, in a project without the app, by the first MeshCache or invalidation."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from django_warpmesh import cache as mesh_cache
from django_warpmesh.node import process
from django_warpmesh.store import reset_stores_after_fork

_names = itertools.count()


@pytest.fixture
def unwired(monkeypatch: pytest.MonkeyPatch) -> list[Callable[[], None]]:
    """This process as if install() had never run; restored afterwards. The fork callbacks."""
    callbacks = [c for c in process._fork_callbacks if c is not reset_stores_after_fork]
    monkeypatch.setattr(process, "_fork_callbacks", callbacks)
    monkeypatch.setattr(process, "_node_factory", None)
    monkeypatch.setattr(mesh_cache, "_installed", False)
    return callbacks


def assert_wired(callbacks: list[Callable[[], None]]) -> None:
    assert process._node_factory is mesh_cache._build_node
    assert process._existing_stores is mesh_cache.existing_stores
    assert callbacks.count(reset_stores_after_fork) == 1


def test_install_wires_the_process_once(unwired: list[Callable[[], None]]) -> None:
    mesh_cache.install()
    mesh_cache.install()
    assert_wired(unwired)


def test_the_first_meshcache_wires_the_process(unwired: list[Callable[[], None]]) -> None:
    mesh_cache.MeshCache(f"test-cache-install-{next(_names)}", {})
    assert_wired(unwired)
    mesh_cache.MeshCache(f"test-cache-install-{next(_names)}", {})
    assert_wired(unwired)


def test_an_invalidation_wires_the_process(unwired: list[Callable[[], None]]) -> None:
    mesh_cache.invalidate_tags(("s:test-cache-install",), start=False)
    assert_wired(unwired)
