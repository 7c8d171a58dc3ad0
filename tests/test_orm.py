"""ORM integration on a real database: every write path invalidates, transactions, the fill race.

Runs on SQLite and on PostgreSQL (``-m database``), with real transactions
(``transactional_db``) and, where a test needs concurrency, a second thread with its own
database connection.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core.cache import cache, caches
from django.db import connection, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from django_warpmesh import cached_as, cached_queryset, invalidate, no_invalidation
from django_warpmesh.cache import get_store
from django_warpmesh.protocol import Op, OpCode
from django_warpmesh.tags import row_tag, table_tag
from tests.testapp.models import Category, Node, Place, Product, Restaurant, Tag

pytestmark = [pytest.mark.database, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    cache.clear()
    yield
    cache.clear()


def stored(key: str) -> bool:
    return cache.make_key(key) in get_store("default").cache


def in_other_thread(func: Callable[[], Any]) -> Any:
    """Run ``func`` in a new thread (its own database connection) and return its result."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        from django.db import connections

        try:
            result.append(func())
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    if errors:
        raise errors[0]
    return result[0] if result else None


@pytest.fixture
def catalogue() -> dict[str, Any]:
    books = Category.objects.create(name="books")
    games = Category.objects.create(name="games")
    first = Product.objects.create(name="first", price=10, category=books)
    second = Product.objects.create(name="second", price=20, category=games)
    red = Tag.objects.create(name="red")
    return {"books": books, "games": games, "first": first, "second": second, "red": red}


def fill(catalogue: dict[str, Any]) -> None:
    """One entry per granularity: a row of each product, the product table, a named tag."""
    cache.set("row-first", 1, tags=[catalogue["first"]])
    cache.set("row-second", 2, tags=[catalogue["second"]])
    cache.set("table", 3, tags=[Product])
    cache.set("named", 4, tags=["homepage"])
    cache.set("category", 5, tags=[catalogue["books"]])
    assert all(stored(k) for k in ("row-first", "row-second", "table", "named", "category"))


# -- tags -------------------------------------------------------------------------------------


def test_manual_invalidation_by_row_table_and_name(catalogue: dict[str, Any]) -> None:
    fill(catalogue)
    invalidate(catalogue["first"])
    assert not stored("row-first")
    assert not stored("table")  # a list of products depends on every product
    assert stored("row-second")
    assert stored("named")
    fill(catalogue)
    invalidate(Product)
    assert not any(stored(k) for k in ("row-first", "row-second", "table"))
    assert stored("named")
    assert stored("category")
    invalidate("homepage")
    assert not stored("named")


def test_tag_index_does_not_leak(catalogue: dict[str, Any]) -> None:
    store = get_store("default")
    for i in range(50):
        cache.set(f"k{i}", i, tags=[catalogue["first"], Product, f"n{i}"])
    assert len(store._key_tags) == 50
    for i in range(25):
        cache.delete(f"k{i}")
    cache.set("k30", "retagged", tags=["other"])
    for i in range(25, 50):
        cache.set(f"k{i}", i, timeout=-1)  # expired at once, the way LocMemCache does it
    cache.get("k31")
    assert not store._key_tags
    assert not store._tag_keys
    assert not store._table_rows
    bounded = caches["other"]
    for i in range(1000):
        bounded.set(f"c{i}", i, tags=[f"t{i}"])  # MAX_ENTRIES 300: most are culled
    other = get_store("other")
    assert set(other._key_tags) == set(other.cache)
    assert sum(len(keys) for keys in other._tag_keys.values()) == len(other.cache)
    bounded.clear()


def test_tags_must_be_models_instances_or_strings() -> None:
    with pytest.raises(TypeError):
        cache.set("k", 1, tags=[3.5])
    with pytest.raises(TypeError):
        cache.set("k", 1, tags="a string, not a list")
    with pytest.raises(ValueError, match="unsaved"):
        cache.set("k", 1, tags=[Product(name="unsaved")])


# -- every write path ---------------------------------------------------------------------------


def test_save_evicts_its_row_and_its_table_not_other_rows(catalogue: dict[str, Any]) -> None:
    fill(catalogue)
    first = catalogue["first"]
    first.price = 11
    first.save()
    assert not stored("row-first")
    assert not stored("table")
    assert stored("row-second")
    assert stored("category")


def test_create_and_delete_evict(catalogue: dict[str, Any]) -> None:
    fill(catalogue)
    Product.objects.create(name="third")
    assert not stored("table")
    assert stored("row-first")
    fill(catalogue)
    catalogue["second"].delete()
    assert not stored("row-second")
    assert not stored("table")
    assert stored("row-first")


def test_writes_without_signals_evict_the_table(catalogue: dict[str, Any]) -> None:
    writes: list[Callable[[], object]] = [
        lambda: Product.objects.filter(price__lt=15).update(price=12),
        lambda: Product.objects.bulk_create([Product(name="bulk")]),
        lambda: Product.objects.bulk_update([catalogue["second"]], ["price"]),
        lambda: Product.objects.filter(name="first")._raw_delete(Product.objects.db),
        lambda: connection.cursor().execute("UPDATE testapp_product SET price = price + 1"),
    ]
    for write in writes:
        fill(catalogue)
        write()
        assert not stored("row-first"), write
        assert not stored("row-second"), write
        assert not stored("table"), write
        assert stored("category"), write
        assert stored("named"), write
        if not Product.objects.filter(pk=catalogue["first"].pk).exists():
            catalogue["first"] = Product.objects.create(name="first", price=10)


def test_raw_writes_in_any_spelling_evict_the_table(catalogue: dict[str, Any]) -> None:
    writes = [
        "/* audit */ UPDATE testapp_product SET price = price + 1",
        "-- nightly job\nUPDATE testapp_product SET price = price + 1",
        " /* a */ -- b\n /* c */ update testapp_product set price = price + 1",
        "UPDATE testapp_product SET price = price + 1;",
    ]
    if connection.vendor in ("sqlite", "postgresql"):
        writes += [
            # Unquoted names in any case (MySQL's table names may tell cases apart).
            "UPDATE TESTAPP_PRODUCT SET PRICE = PRICE + 1",
            "UPDATE TestApp_Product SET price = price + 1",
            # Not in MariaDB's grammar.
            "WITH a AS (SELECT 1) UPDATE testapp_product SET price = price + 1",
            "/* report */ WITH a AS (SELECT 1) UPDATE testapp_product SET price = price + 1",
        ]
    if connection.vendor == "sqlite":
        writes.append('UPDATE "TESTAPP_PRODUCT" SET price = price + 1')  # SQLite ignores case
    if connection.vendor == "postgresql":
        writes += [
            "SELECT 1; UPDATE testapp_product SET price = price + 1",
            "DO $$ BEGIN UPDATE testapp_product SET price = price + 1; END $$",
        ]
    for sql in writes:
        fill(catalogue)
        connection.cursor().execute(sql)
        assert not stored("row-first"), sql
        assert not stored("table"), sql
        assert stored("category"), sql


@pytest.mark.skipif(connection.vendor != "postgresql", reason="psycopg's composed statements")
def test_psycopg_composed_statements_evict_the_table(catalogue: dict[str, Any]) -> None:
    from psycopg import sql

    update = sql.SQL("UPDATE {} SET {} = {} + %s").format(
        sql.Identifier("testapp_product"), sql.Identifier("price"), sql.Identifier("price")
    )
    for statement in (update, sql.SQL("/* job */ ") + update):
        fill(catalogue)
        connection.cursor().execute(statement, [1])
        assert not stored("row-first")
        assert stored("category")


def test_reads_in_any_spelling_evict_nothing(catalogue: dict[str, Any]) -> None:
    reads = [
        "select * from testapp_product",
        "/* UPDATE later */ SELECT * FROM testapp_product",
        "-- DELETE FROM testapp_product\nSELECT * FROM testapp_product",
        "SELECT * FROM testapp_product WHERE name = 'UPDATE testapp_product'",
        "WITH a AS (SELECT id FROM testapp_product) SELECT * FROM a",
        "EXPLAIN SELECT * FROM testapp_product",
        "SELECT * FROM testapp_product;",
    ]
    if connection.vendor == "sqlite":
        reads.append("PRAGMA table_info(testapp_product)")
    if connection.vendor == "postgresql":
        reads += [
            "(SELECT id FROM testapp_product) UNION (SELECT id FROM testapp_product)",
            "WITH a AS (SELECT id FROM testapp_product) SELECT * FROM a FOR UPDATE",
            "SELECT 1; SELECT * FROM testapp_product",
        ]
    for sql in reads:
        fill(catalogue)
        connection.cursor().execute(sql)
        assert stored("table"), sql
        assert stored("row-first"), sql


def test_cascade_deletes_evict_the_related_rows(catalogue: dict[str, Any]) -> None:
    fill(catalogue)
    catalogue["books"].delete()  # cascades to "first"
    assert not stored("category")
    assert not stored("row-first")
    assert stored("row-second")


def test_m2m_changes_evict_both_sides(catalogue: dict[str, Any]) -> None:
    first, red = catalogue["first"], catalogue["red"]
    for change in (
        lambda: first.tags.add(red),
        lambda: first.tags.remove(red),
        lambda: red.product_set.add(first),
        first.tags.clear,
    ):
        fill(catalogue)
        cache.set("red", 1, tags=[red])
        change()
        assert not stored("row-first")
        assert not stored("red")
        assert stored("row-second")


def queries_run(operation: Callable[[], object]) -> int:
    with CaptureQueriesContext(connection) as captured:
        operation()
    return len(captured.captured_queries)


def test_m2m_add_costs_no_query_more_than_without_the_hooks(catalogue: dict[str, Any]) -> None:
    first, second, red = catalogue["first"], catalogue["second"], catalogue["red"]
    blue = Tag.objects.create(name="blue")
    adds: list[Callable[[], object]] = [
        lambda: first.tags.add(red),
        lambda: first.tags.add(red, blue),  # several rows: PostgreSQL inserts them through UNNEST
        lambda: red.product_set.add(second),
        lambda: blue.product_set.add(first, second),
    ]

    def counts() -> list[int]:
        result = []
        for add in adds:
            result.append(queries_run(add))
            first.tags.clear()
            second.tags.clear()
        return result

    with override_settings(WARPMESH={"PEERS": [], "ENABLED": False, "ORM": False}):
        without_hooks = counts()
    assert counts() == without_hooks


def test_m2m_writes_from_either_side_evict_the_rows_of_both(catalogue: dict[str, Any]) -> None:
    first, second, red = catalogue["first"], catalogue["second"], catalogue["red"]
    blue = Tag.objects.create(name="blue")
    cases: list[tuple[Callable[[], object], Callable[[], object], set[str]]] = [
        # (set-up, the write, the entries it must evict); the others must stay.
        (lambda: None, lambda: first.tags.add(red), {"first", "red"}),
        (lambda: None, lambda: red.product_set.add(first), {"first", "red"}),
        (lambda: first.tags.add(red), lambda: first.tags.remove(red), {"first", "red"}),
        (lambda: first.tags.add(red), lambda: red.product_set.remove(first), {"first", "red"}),
        (lambda: first.tags.add(red), lambda: first.tags.set([blue]), {"first", "red", "blue"}),
        (
            lambda: first.tags.add(red),
            lambda: red.product_set.set([second]),
            {"first", "second", "red"},
        ),
        # clear(): which rows of the other side lose the relation is not in the statement.
        (lambda: first.tags.add(red), first.tags.clear, {"first", "red", "blue"}),
        (lambda: first.tags.add(red), red.product_set.clear, {"first", "second", "red"}),
    ]
    rows = {"first": first, "second": second, "red": red, "blue": blue}
    for set_up, write, evicted in cases:
        first.tags.clear()
        second.tags.clear()
        set_up()
        for name, row in rows.items():
            cache.set(name, 1, tags=[row])
        write()
        assert {name for name in rows if not stored(name)} == evicted, write


def test_cached_prefetches_are_evicted_by_m2m_writes(catalogue: dict[str, Any]) -> None:
    first, red = catalogue["first"], catalogue["red"]
    products = Product.objects.prefetch_related("tags").order_by("pk")
    tags = Tag.objects.prefetch_related("product_set").order_by("pk")

    def tag_names() -> list[list[str]]:
        return [[tag.name for tag in p.tags.all()] for p in cached_queryset(products)]

    def product_names() -> list[list[str]]:
        return [[p.name for p in tag.product_set.all()] for tag in cached_queryset(tags)]

    assert tag_names() == [[], []]
    assert product_names() == [[]]
    first.tags.add(red)
    assert tag_names() == [["red"], []]
    assert product_names() == [["first"]]
    red.product_set.remove(first)
    assert tag_names() == [[], []]
    assert product_names() == [[]]


def test_raw_writes_to_a_through_table(catalogue: dict[str, Any]) -> None:
    first, second, red = catalogue["first"], catalogue["second"], catalogue["red"]
    through = Product.tags.through._meta.db_table
    cursor = connection.cursor()
    writes: list[tuple[str, list[Any], set[str]]] = [
        # Understood: the product side is known, the tag side is not (all of it).
        (f"DELETE FROM {through} WHERE product_id = %s", [first.pk], {"first", "red"}),
        # Not understood (a subquery): both whole tables.
        (
            f"DELETE FROM {through} WHERE tag_id IN (SELECT id FROM testapp_tag WHERE name = %s)",
            ["red"],
            {"first", "second", "red"},
        ),
        (
            f"INSERT INTO {through} (product_id, tag_id) SELECT id, %s FROM testapp_product "
            "WHERE id = %s",
            [red.pk, second.pk],
            {"first", "second", "red"},
        ),
    ]
    rows = {"first": first, "second": second, "red": red}
    for sql, params, evicted in writes:
        first.tags.set([red])
        for name, row in rows.items():
            cache.set(name, 1, tags=[row])
        cursor.execute(sql, params)
        assert {name for name in rows if not stored(name)} == evicted, sql


def test_symmetrical_m2m_on_a_child_model(db_places: dict[str, Restaurant]) -> None:
    a, b = db_places["a"], db_places["b"]
    both = {"a", "b", "a-place", "b-place"}
    cases: list[tuple[list[Restaurant], Callable[[], object], set[str]]] = [
        ([], lambda: a.neighbours.add(b), both),
        ([b], lambda: b.neighbours.remove(a), both),
        # Either column may hold a, so the other one is unknown: the child's whole table.
        ([b], a.neighbours.clear, {"a", "b", "c", "a-place"}),
    ]
    names = [*db_places, *(f"{name}-place" for name in db_places)]
    for neighbours, write, evicted in cases:
        a.neighbours.set(neighbours)
        for name, row in db_places.items():
            cache.set(name, 1, tags=[row])
            cache.set(f"{name}-place", 1, tags=[Place(pk=row.pk)])
        write()
        assert {name for name in names if not stored(name)} == evicted, write


@pytest.fixture
def db_places() -> dict[str, Restaurant]:
    return {name: Restaurant.objects.create(name=name) for name in ("a", "b", "c")}


def test_no_invalidation_block_and_orm_setting(catalogue: dict[str, Any]) -> None:
    fill(catalogue)
    with no_invalidation():
        catalogue["first"].save()
        Product.objects.update(price=1)
    assert stored("row-first")
    assert stored("table")
    with override_settings(WARPMESH={"PEERS": [], "ENABLED": False, "ORM": False}):
        catalogue["second"].save()
        assert stored("row-second")
    catalogue["second"].save()  # hooks back after the override
    assert not stored("row-second")


def test_excluded_models_are_not_watched(catalogue: dict[str, Any]) -> None:
    with override_settings(
        WARPMESH={"PEERS": [], "ENABLED": False, "ORM_EXCLUDE": ["testapp.Product"]}
    ):
        fill(catalogue)
        catalogue["first"].save()
        Product.objects.update(price=3)
        assert stored("row-first")
        assert stored("table")
        catalogue["books"].save()
        assert not stored("category")


def test_a_failed_save_leaves_no_claim_behind(catalogue: dict[str, Any]) -> None:
    broken = Product(name="broken", price="not a number")  # type: ignore[misc]
    with pytest.raises((ValueError, TypeError)):
        broken.save()  # fails after pre_save, before any SQL
    fill(catalogue)
    Product.objects.filter(pk=catalogue["second"].pk).update(price=99)
    assert not stored("row-second")


def test_receiver_writes_during_a_save_are_not_swallowed(catalogue: dict[str, Any]) -> None:
    from django.db.models.signals import pre_save

    def bump_others(sender: type[Product], instance: Product, **kwargs: Any) -> None:
        Product.objects.exclude(pk=instance.pk).update(price=0)

    pre_save.connect(bump_others, sender=Product, dispatch_uid="test-bump")
    try:
        fill(catalogue)
        catalogue["first"].save()
    finally:
        pre_save.disconnect(sender=Product, dispatch_uid="test-bump")
    assert not stored("row-second")


@contextlib.contextmanager
def receiver(signal: Any, sender: type[Any], func: Callable[..., None]) -> Iterator[None]:
    signal.connect(func, sender=sender, dispatch_uid="test-receiver")
    try:
        yield
    finally:
        signal.disconnect(sender=sender, dispatch_uid="test-receiver")


def test_a_receiver_write_after_a_delete_of_several_rows_is_not_swallowed(
    catalogue: dict[str, Any],
) -> None:
    from django.db.models.signals import post_delete

    third = Product.objects.create(name="third", price=30)

    def touch_third(sender: type[Product], instance: Product, **kwargs: Any) -> None:
        if instance.name == "first":
            Product.objects.filter(pk=third.pk).update(price=31)

    cache.set("third", 1, tags=[third])
    with receiver(post_delete, Product, touch_third):
        # One pre_delete per row, one DELETE for both.
        Product.objects.filter(name__in=["first", "second"]).delete()
    assert not stored("third")


def test_deletes_of_several_rows_evict_only_theirs(
    catalogue: dict[str, Any], db_places: dict[str, Restaurant]
) -> None:
    third = Product.objects.create(name="third", price=30)
    cache.set("third", 1, tags=[third])
    cache.set("c", 1, tags=[Place(pk=db_places["c"].pk)])
    Product.objects.filter(name__in=["first", "second"]).delete()
    Product.objects.bulk_create(Product(name="many") for _ in range(150))
    cache.set("third", 1, tags=[third])
    assert Product.objects.filter(name="many").delete()[0] == 150  # two DELETE statements
    db_places["a"].delete()  # the child's table, then its parent's
    Restaurant.objects.filter(pk=db_places["b"].pk).delete()
    assert stored("third")
    assert stored("c")


def test_a_receiver_write_during_a_child_model_delete_is_not_swallowed(
    db_places: dict[str, Restaurant],
) -> None:
    from django.db.models.signals import post_delete

    a, b = db_places["a"], db_places["b"]

    def rename_b(sender: type[Restaurant], instance: Restaurant, **kwargs: Any) -> None:
        # Sent after the child table's DELETE, before the parent table's.
        Place.objects.filter(pk=b.pk).update(name="renamed")

    cache.set("b", 1, tags=[Place(pk=b.pk)])
    with receiver(post_delete, Restaurant, rename_b):
        a.delete()  # pre_delete for the child and for its parent row: the parent table twice
    assert not stored("b")


def test_a_receiver_write_after_a_save_that_skipped_a_parent_is_not_swallowed(
    db_places: dict[str, Restaurant],
) -> None:
    from django.db.models.signals import post_save

    a, b = db_places["a"], db_places["b"]

    def rename_b(sender: type[Restaurant], instance: Restaurant, **kwargs: Any) -> None:
        Place.objects.filter(pk=b.pk).update(name="renamed")

    cache.set("b", 1, tags=[Place(pk=b.pk)])
    with receiver(post_save, Restaurant, rename_b):
        a.save(update_fields=["serves"])  # no UPDATE of the parent table
    assert not stored("b")


def test_a_delete_nulling_references_in_its_own_table_evicts_them() -> None:
    root, other = Node.objects.create(name="root"), Node.objects.create(name="other")
    child = Node.objects.create(name="child", parent=root)
    cache.set("child", 1, tags=[child])
    # Both rows claimed, then an UPDATE of that table (parent = NULL) before their DELETE.
    Node.objects.filter(pk__in=[root.pk, other.pk]).delete()
    assert Node.objects.get(pk=child.pk).parent is None
    assert not stored("child")


def test_a_delete_that_first_nulls_its_rows_foreign_keys_evicts_only_them(
    catalogue: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on MySQL: no deferred constraint checks, so before deleting a category Django sets its
    # products' (nullable) category to NULL, in the products it is about to delete.
    monkeypatch.setattr(connection.features, "can_defer_constraint_checks", False)
    fill(catalogue)
    with CaptureQueriesContext(connection) as captured:
        catalogue["books"].delete()  # cascades to "first"
    assert any(q["sql"].startswith("UPDATE") for q in captured.captured_queries)
    assert not stored("row-first")
    assert not stored("category")
    assert stored("row-second")


def test_a_save_that_updates_nothing_then_inserts_evicts_only_its_row(
    catalogue: dict[str, Any],
) -> None:
    fill(catalogue)
    Product(pk=catalogue["second"].pk + 100, name="new").save()  # UPDATE (no row), then INSERT
    assert not stored("table")
    assert stored("row-first")
    assert stored("row-second")


# -- transactions -------------------------------------------------------------------------------


def test_atomic_invalidates_at_once_and_again_on_commit(catalogue: dict[str, Any]) -> None:
    fill(catalogue)
    first = catalogue["first"]
    with transaction.atomic():
        first.price = 50
        first.save()
        assert not stored("row-first")  # at once: peers stop serving the old row now
        # Another connection still sees the committed (old) row and caches it...
        in_other_thread(
            lambda: cache.set(
                "row-first", Product.objects.get(pk=first.pk).price, tags=[Product(pk=first.pk)]
            )
        )
        assert stored("row-first")
        # ... while this thread's own uncommitted value is not stored.
        cache.set("mine", Product.objects.get(pk=first.pk).price, tags=[first])
        assert not stored("mine")
    # ...and the commit evicts what was read before it.
    assert not stored("row-first")
    cache.set("mine", 50, tags=[first])
    assert stored("mine")


def test_rollback_leaves_nothing_stale(catalogue: dict[str, Any]) -> None:
    first = catalogue["first"]

    def write_and_cache() -> None:
        first.price = 77
        first.save()
        cache.set("mine", Product.objects.get(pk=first.pk).price, tags=[first])

    roll_back_a_savepoint(write_and_cache)  # the outermost atomic here: a real rollback
    assert not stored("mine")
    assert Product.objects.get(pk=first.pk).price == 10
    # The error inside atomic left no per-thread state: caching works again.
    cache.set("mine", 10, tags=[first])
    assert stored("mine")


def roll_back_a_savepoint(write: Callable[[], object]) -> None:
    class Rollback(Exception):
        pass

    def write_then_fail() -> None:
        write()
        raise Rollback

    with contextlib.suppress(Rollback), transaction.atomic():
        write_then_fail()


def test_savepoints_and_nested_atomics(catalogue: dict[str, Any]) -> None:
    first, second = catalogue["first"], catalogue["second"]
    with transaction.atomic():
        roll_back_a_savepoint(lambda: Product.objects.filter(pk=second.pk).update(price=1))
        first.price = 2
        first.save()
        # This thread's own uncommitted rows (even the rolled-back savepoint's) are refused...
        for key, tag in (("first", first), ("second", second), ("named", "homepage")):
            cache.set(key, 1, tags=[tag])
        assert not stored("first")
        assert not stored("second")
        assert stored("named")
    # ...until the outermost transaction is over.
    cache.set("first", 2, tags=[first])
    assert stored("first")
    assert Product.objects.get(pk=second.pk).price == 20


# -- the fill race ------------------------------------------------------------------------------


def test_a_value_computed_across_a_write_is_not_stored(catalogue: dict[str, Any]) -> None:
    first = catalogue["first"]

    def compute_while_someone_writes() -> int:
        price = Product.objects.get(pk=first.pk).price  # the read: old data
        in_other_thread(lambda: Product.objects.filter(pk=first.pk).update(price=99))
        return price

    value = cache.get_or_set("price", compute_while_someone_writes, tags=[first])
    assert value == 10  # returned to the caller...
    assert not stored("price")  # ...but not cached
    assert cache.get_or_set("price", lambda: 99, tags=[first]) == 99
    assert stored("price")


def test_an_invalidation_from_a_peer_during_the_fill(catalogue: dict[str, Any]) -> None:
    first = catalogue["first"]
    store = get_store("default")

    def compute() -> int:
        # What the receiver thread does when a peer's frame arrives.
        store.apply([Op("default", OpCode.TAGS, [table_tag("testapp_product")])])
        return 1

    assert cache.get_or_set("p", compute, tags=[first]) == 1
    assert not stored("p")

    def unrelated() -> int:
        store.apply([Op("default", OpCode.TAGS, [row_tag("testapp_product", -1)])])
        return 2

    assert cache.get_or_set("p", unrelated, tags=[first]) == 2
    assert stored("p")  # another row's write does not concern this one


# -- helpers ----------------------------------------------------------------------------------


def test_cached_queryset_is_tagged_with_every_table_it_reads(catalogue: dict[str, Any]) -> None:
    queryset = Product.objects.filter(category__name="books").order_by("pk")
    calls = 0

    def products() -> list[Product]:
        nonlocal calls
        calls += 1
        return cached_queryset(queryset)

    assert [p.name for p in products()] == ["first"]
    assert [p.name for p in products()] == ["first"]
    # The join: a write to categories evicts it, as one to products does.
    games = catalogue["games"]
    games.name = "books"
    games.save()
    assert [p.name for p in cached_queryset(queryset)] == ["first", "second"]
    Tag.objects.create(name="first")
    with_subquery = Product.objects.filter(name__in=Tag.objects.values("name")).order_by("pk")
    assert cached_queryset(with_subquery) == [catalogue["first"]]
    Tag.objects.create(name="second")  # a write to the subquery's table only
    assert cached_queryset(with_subquery) == [catalogue["first"], catalogue["second"]]
    assert cached_queryset(Product.objects.none()) == []


def test_cached_as(catalogue: dict[str, Any]) -> None:
    calls: list[int] = []

    @cached_as(Product, timeout=60)
    def total(multiplier: int) -> int:
        calls.append(multiplier)
        return multiplier * sum(p.price for p in Product.objects.all())

    assert total(2) == 60
    assert total(2) == 60
    assert total(3) == 90
    assert calls == [2, 3]
    catalogue["second"].save()
    assert total(2) == 60
    assert calls == [2, 3, 2]
    total.invalidate()  # type: ignore[attr-defined]
    total(2)
    assert calls == [2, 3, 2, 2]
    with pytest.raises(TypeError, match="cache key"):
        total(threading.Lock())  # type: ignore[arg-type]


def test_async_twins_take_tags(catalogue: dict[str, Any]) -> None:
    import asyncio

    first = catalogue["first"]

    async def fill_async() -> None:
        await cache.aset("a-set", 1, tags=[first])
        await cache.aadd("a-add", 2, tags=[Product])
        await cache.aset_many({"a-many": 3}, tags=["named"])
        assert await cache.aget_or_set("a-gos", lambda: 4, tags=[first]) == 4

    asyncio.run(fill_async())
    assert all(stored(k) for k in ("a-set", "a-add", "a-many", "a-gos"))
    invalidate(first)
    assert not any(stored(k) for k in ("a-set", "a-add", "a-gos"))
    assert stored("a-many")


def test_cached_queryset_with_a_key_does_not_compile_on_a_hit(
    catalogue: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    queryset = Product.objects.filter(category__name="books").order_by("pk")
    assert [p.name for p in cached_queryset(queryset, key="books")] == ["first"]
    from django.db.models.sql.compiler import SQLCompiler

    def no_compiling(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a hit compiled the query")

    with monkeypatch.context() as patch:
        patch.setattr(SQLCompiler, "as_sql", no_compiling)
        assert [p.name for p in cached_queryset(queryset, key="books")] == ["first"]
    # Still tagged with both tables: a category write evicts it.
    games = catalogue["games"]
    games.name = "books"
    games.save()
    assert [p.name for p in cached_queryset(queryset, key="books")] == ["first", "second"]
