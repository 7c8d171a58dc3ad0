"""``django_warpmesh.contrib.cachalot`` in this process, driving cachalot's own functions.

cachalot is not installed as an app here (its ``ready()`` patches the ORM for good): the tests
call the functions its patches call (``_get_result_or_execute_query`` for a read,
``_invalidate_tables`` and ``post_invalidation`` for a write, ``AtomicCache.commit`` for a
transaction) against a ``CachalotMeshCache``, with a recording node standing in for the mesh.
The same behaviour across real processes is in tests/test_cachalot.py.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("cachalot")

from cachalot.monkey_patch import _get_result_or_execute_query
from cachalot.settings import cachalot_settings
from cachalot.signals import post_invalidation
from cachalot.transaction import AtomicCache
from cachalot.utils import _invalidate_tables, get_table_cache_key
from django.core.checks import Warning

from django_warpmesh import checks
from django_warpmesh.contrib import cachalot as contrib
from django_warpmesh.contrib.cachalot import CachalotMeshCache, cachalot_tag
from django_warpmesh.node import process
from django_warpmesh.protocol import Op, OpCode
from tests.cache_helpers import RecordingNode
from tests.cluster import manage

PRODUCTS = "testapp_product"
CATEGORIES = "testapp_category"
PEERS = "django_warpmesh_peer"
_names = itertools.count()


@pytest.fixture(autouse=True)
def loaded_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """cachalot's settings as its ready() would load them (without patching the ORM)."""
    monkeypatch.setattr(cachalot_settings, "CACHALOT_TABLE_KEYGEN", get_table_cache_key, False)
    monkeypatch.setattr(cachalot_settings, "CACHALOT_DATABASES", frozenset({"default"}), False)
    monkeypatch.setattr(cachalot_settings, "CACHALOT_ADDITIONAL_TABLES", [], False)
    contrib._table_keys.cache_clear()
    yield
    contrib._table_keys.cache_clear()


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> RecordingNode:
    fake = RecordingNode()
    monkeypatch.setattr(process, "_current", fake)
    return fake


def cache() -> CachalotMeshCache:
    return CachalotMeshCache(f"test-contrib-cachalot-{next(_names)}", {})


def table_key(table: str) -> str:
    return get_table_cache_key("default", table)


def read(
    cache: CachalotMeshCache, rows: Any, *tables: str, during: Callable[[], None] | None = None
) -> Any:
    """A cachalot read of a query over ``tables`` whose database answer is ``rows``."""

    def query() -> Any:
        if during is not None:
            during()  # as the node's receiver thread would, while the query runs
        return rows

    key = "query:" + ",".join(tables)
    return _get_result_or_execute_query(query, cache, key, [table_key(t) for t in tables])


def stored(cache: CachalotMeshCache) -> dict[str, tuple[str, ...]]:
    """Each entry this process holds, with its tags."""
    store = cache._store
    return {key: store._key_tags.get(key, ()) for key in store.cache}


def test_a_fill_is_stored_here_only_and_its_table_keys_are_tagged(node: RecordingNode) -> None:
    mesh = cache()
    assert read(mesh, [1, 2], PRODUCTS, CATEGORIES) == [1, 2]
    assert node.published == []
    assert stored(mesh) == {
        f":1:{table_key(PRODUCTS)}": (f"t:{PRODUCTS}", cachalot_tag(PRODUCTS)),
        f":1:{table_key(CATEGORIES)}": (f"t:{CATEGORIES}", cachalot_tag(CATEGORIES)),
        f":1:query:{PRODUCTS},{CATEGORIES}": (),
    }
    # Served from the cache: the database is not asked again.
    assert read(mesh, "not asked", PRODUCTS, CATEGORIES) == [1, 2]


@pytest.mark.parametrize(
    "tag",
    [f"t:{PRODUCTS}", f"r:{PRODUCTS}:7", cachalot_tag(PRODUCTS)],
    ids=["table-write", "row-write", "cachalot-invalidation"],
)
def test_a_result_read_while_its_table_was_invalidated_is_not_stored(
    node: RecordingNode, tag: str
) -> None:
    mesh = cache()
    read(mesh, ["old"], PRODUCTS)
    mesh._store.apply([Op(mesh._location, OpCode.TAGS, [tag])])  # the write, from a peer
    # The next read misses, and another write lands while its query runs: it may have read
    # the rows before that write committed.
    invalidate = [Op(mesh._location, OpCode.TAGS, [tag])]
    result = read(mesh, ["maybe old"], PRODUCTS, during=lambda: mesh._store.apply(invalidate))
    assert result == ["maybe old"]
    # Its table key not stored (what is left of the first read cannot be served without it).
    assert f":1:{table_key(PRODUCTS)}" not in stored(mesh)
    assert read(mesh, ["new"], PRODUCTS) == ["new"]
    assert read(mesh, "not asked", PRODUCTS) == ["new"]


def test_an_invalidation_of_another_table_does_not_block_the_fill(node: RecordingNode) -> None:
    mesh = cache()
    elsewhere = [Op(mesh._location, OpCode.TAGS, [f"t:{CATEGORIES}", cachalot_tag(CATEGORIES)])]
    read(mesh, ["rows"], PRODUCTS, during=lambda: mesh._store.apply(elsewhere))
    assert read(mesh, "not asked", PRODUCTS) == ["rows"]


def test_cachalots_invalidation_reaches_every_process(node: RecordingNode) -> None:
    mesh = cache()
    read(mesh, ["old"], PRODUCTS)
    read(mesh, ["categories"], CATEGORIES)
    # What cachalot's write path does: new times in the table keys, then the signal.
    _invalidate_tables(mesh, "default", [PRODUCTS])
    assert node.published == []  # the new times stay here, and are not even stored
    post_invalidation.send(PRODUCTS, db_alias="default")
    assert (mesh._location, OpCode.TAGS, [cachalot_tag(PRODUCTS)]) in node.published
    assert read(mesh, ["new"], PRODUCTS) == ["new"]
    assert read(mesh, "not asked", CATEGORIES) == ["categories"]


def test_a_committed_transaction_keeps_its_results_not_its_table_keys(
    node: RecordingNode,
) -> None:
    mesh = cache()
    read(mesh, ["products"], PRODUCTS)
    atomic = AtomicCache(mesh, "default")
    # Inside the transaction: a read of a table not cached yet, and a write.
    assert read(atomic, ["categories"], CATEGORIES) == ["categories"]
    _invalidate_tables(atomic, "default", [PRODUCTS])
    atomic.commit()
    post_invalidation.send(PRODUCTS, db_alias="default")
    held = stored(mesh)
    assert f":1:query:{CATEGORIES}" in held
    # The times at which the transaction read cannot be checked against what arrived since.
    assert f":1:{table_key(CATEGORIES)}" not in held
    assert f":1:{table_key(PRODUCTS)}" not in held
    assert (mesh._location, OpCode.TAGS, [cachalot_tag(PRODUCTS)]) in node.published
    assert {code for _, code, _ in node.published} == {OpCode.TAGS}
    assert read(mesh, ["categories again"], CATEGORIES) == ["categories again"]


def test_the_applications_own_writes_on_the_alias_are_meshcaches(node: RecordingNode) -> None:
    mesh = cache()
    mesh.set_many({"a": 1.5, "b": (2.5, "rows")})
    assert [code for _, code, _ in node.published] == [OpCode.DELETE_UNLESS] * 2
    assert mesh.get_many(["a", "b"]) == {"a": 1.5, "b": (2.5, "rows")}


def test_the_mesh_own_tables_are_not_cached_and_start_no_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A node's exit deletes its peer row through the ORM, after it stopped: cachalot's
    # invalidation of that table must not start a node again.
    monkeypatch.setattr(process, "_current", None)
    mesh = cache()
    read(mesh, ["peers"], PEERS)
    _invalidate_tables(mesh, "default", [PEERS])
    post_invalidation.send(PEERS, db_alias="default")
    assert process.current_node() is None
    assert stored(mesh) == {}


def test_a_migration_command_starts_no_node(
    node: RecordingNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    mesh = cache()
    read(mesh, ["old"], PRODUCTS)
    # `manage.py migrate` in a process whose node is not running: cachalot invalidates every
    # table of each migrated app (post_migrate), and data migrations read through it.
    monkeypatch.setattr(process, "_current", None)
    monkeypatch.setattr(sys, "argv", ["manage.py", "migrate"])
    post_invalidation.send(PRODUCTS, db_alias="default")
    assert read(mesh, ["new"], PRODUCTS) == ["new"]
    assert process.current_node() is None
    # Applied here all the same, and nothing stored that no node would keep coherent.
    assert f":1:{table_key(PRODUCTS)}" not in stored(mesh)
    assert node.published == []


# -- the checks --------------------------------------------------------------------------------


def cachalot_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Not through INSTALLED_APPS: cachalot's ready() would patch the ORM of this process.
    installed = checks.apps.is_installed
    monkeypatch.setattr(
        checks.apps, "is_installed", lambda name: name == "cachalot" or installed(name)
    )


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        ("django_warpmesh.cache.MeshCache", ["warpmesh.W008"]),
        ("django_warpmesh.contrib.cachalot.CachalotMeshCache", []),
        ("django.core.cache.backends.locmem.LocMemCache", []),
    ],
)
def test_w008_cachalot_on_a_plain_mesh_cache(
    settings: Any, monkeypatch: pytest.MonkeyPatch, backend: str, expected: list[str]
) -> None:
    settings.CACHES = {**settings.CACHES, "orm": {"BACKEND": backend, "LOCATION": "orm"}}
    settings.CACHALOT_CACHE = "orm"
    assert checks.check_cachalot() == []  # cachalot not installed: nothing to say
    cachalot_installed(monkeypatch)
    messages = checks.check_cachalot()
    assert [message.id for message in messages] == expected
    for message in messages:
        assert isinstance(message, Warning)
        assert "'django_warpmesh.contrib.cachalot.CachalotMeshCache'" in (message.hint or "")


@pytest.mark.parametrize(
    ("backend", "raised"),
    [
        ("django_warpmesh.cache.MeshCache", {"warpmesh.W008", "cachalot.W001"}),
        ("django_warpmesh.contrib.cachalot.CachalotMeshCache", set()),
    ],
)
def test_manage_check_with_cachalot_installed(backend: str, raised: set[str]) -> None:
    # In a process of its own, with cachalot in INSTALLED_APPS: cachalot's own check (W001, a
    # backend it does not list) is not raised for the backend made for it.
    result = manage(
        "check",
        "--tag",
        "warpmesh",
        "--tag",
        "caches",
        env={
            "DJANGO_SETTINGS_MODULE": "tests.settings_cachalot",
            "WARPMESH_CACHALOT_BACKEND": backend,
            "WARPMESH_ENABLED": "false",
        },
    )
    output = result.stdout + result.stderr
    for check_id in ("warpmesh.W008", "cachalot.W001"):
        assert (f"({check_id})" in output) == (check_id in raised), output
