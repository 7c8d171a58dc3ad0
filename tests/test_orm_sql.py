"""The execute wrapper on statements as other databases spell them, without running them.

Each statement goes through ``_execute_wrapper`` with a stand-in for the database call and a
connection of the given vendor; the tests look at which tagged cache entries it evicts.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from django.core.cache import cache

from django_warpmesh.cache import get_store
from django_warpmesh.orm.execute_wrapper import _execute_wrapper
from tests.testapp.models import Place, Product, Restaurant, Tag

PRODUCTS = {f"p{pk}": Product(pk=pk) for pk in (1, 2, 3)}
TAGS = {f"t{pk}": Tag(pk=pk) for pk in (1, 2, 3)}
ALL_PRODUCTS = set(PRODUCTS)
ALL_TAGS = set(TAGS)
THROUGH = Product.tags.through._meta.db_table


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    cache.clear()
    yield
    cache.clear()


def stored(key: str) -> bool:
    return cache.make_key(key) in get_store("default").cache


def run(sql: Any, params: Any, *, vendor: str, many: bool = False) -> None:
    """What the wrapper does around a statement the database runs without error."""

    def execute(sql: Any, params: Any, many: bool, context: dict[str, Any]) -> None:
        return None

    connection = SimpleNamespace(alias="default", vendor=vendor)
    _execute_wrapper(execute, sql, params, many, {"connection": connection, "cursor": None})


def evicted_by(sql: str, params: Any, *, vendor: str, many: bool = False) -> set[str]:
    """Which of the product, tag and through-table entries the statement evicts."""
    rows = {**PRODUCTS, **TAGS}
    for name, row in rows.items():
        cache.set(name, 1, tags=[row])
    cache.set("through", 1, tags=[Product.tags.through])
    run(sql, params, vendor=vendor, many=many)
    return {name for name in [*rows, "through"] if not stored(name)}


@pytest.mark.parametrize(
    ("vendor", "sql", "params", "evicted"),
    [
        (
            "mysql",
            f"INSERT IGNORE INTO `{THROUGH}` (`product_id`, `tag_id`) VALUES (%s, %s), (%s, %s)",
            [1, 1, 1, 2],
            {"p1", "t1", "t2"},
        ),
        (
            "sqlite",
            f'INSERT OR IGNORE INTO "{THROUGH}" ("product_id", "tag_id") VALUES (%s, %s)',
            [2, 3],
            {"p2", "t3"},
        ),
        (
            "postgresql",
            f'INSERT INTO "{THROUGH}" ("product_id", "tag_id") SELECT * FROM '
            "UNNEST((%s)::bigint[], (%s)::bigint[]) ON CONFLICT DO NOTHING",
            [[1, 2], [3, 3]],
            {"p1", "p2", "t3"},
        ),
        (
            "postgresql",
            f'INSERT INTO "{THROUGH}" ("tag_id", "product_id") VALUES (%s, %s) RETURNING "id"',
            ["1", "2"],  # values as text still name the rows
            {"t1", "p2"},
        ),
        (
            "mysql",
            f"DELETE FROM `{THROUGH}` WHERE (`{THROUGH}`.`product_id` = %s "
            f"AND `{THROUGH}`.`tag_id` IN (%s, %s))",
            [1, 2, 3],
            {"p1", "t2", "t3"},
        ),
        (
            "sqlite",
            f"DELETE FROM {THROUGH} WHERE PRODUCT_ID IN (%s, %s)",  # unquoted: any case
            [1, 2],
            {"p1", "p2", *ALL_TAGS},
        ),
        (
            "postgresql",
            f'DELETE FROM "public"."{THROUGH}" WHERE "{THROUGH}"."tag_id" = %s',
            [2],
            {"t2", *ALL_PRODUCTS},
        ),
        (
            "postgresql",
            f'DELETE FROM "{THROUGH}" WHERE "PRODUCT_ID" = %s',  # quoted: another column
            [1],
            {*ALL_PRODUCTS, *ALL_TAGS},
        ),
        (
            "sqlite",
            f"DELETE FROM {THROUGH} WHERE (product_id = %s AND tag_id = %s) OR tag_id = %s",
            [1, 2, 3],
            {*ALL_PRODUCTS, "t2", "t3"},  # the second branch leaves the product unknown
        ),
    ],
)
def test_m2m_statements_evict_the_rows_they_name(
    vendor: str, sql: str, params: Any, evicted: set[str]
) -> None:
    assert evicted_by(sql, params, vendor=vendor) == {*evicted, "through"}


def test_executemany_rows_are_read() -> None:
    sql = f'INSERT INTO "{THROUGH}" ("product_id", "tag_id") VALUES (%s, %s)'
    assert evicted_by(sql, [(1, 2), (3, 2)], vendor="sqlite", many=True) == {
        "p1",
        "p3",
        "t2",
        "through",
    }


EVERYTHING = {*ALL_PRODUCTS, *ALL_TAGS, "through"}


@pytest.mark.parametrize(
    ("sql", "params"),
    [
        (f"DELETE FROM {THROUGH}", None),
        (f"UPDATE {THROUGH} SET tag_id = %s WHERE product_id = %s", [1, 2]),
        (f"TRUNCATE {THROUGH}", None),
        (f"REPLACE INTO {THROUGH} (product_id, tag_id) VALUES (%s, %s)", [1, 1]),
        (f"INSERT OR REPLACE INTO {THROUGH} (product_id, tag_id) VALUES (%s, %s)", [1, 1]),
        (
            f"INSERT INTO {THROUGH} (id, product_id, tag_id) VALUES (%s, %s, %s) "
            "ON DUPLICATE KEY UPDATE product_id = %s",
            [1, 1, 1, 2],
        ),
        (f"INSERT INTO {THROUGH} (product_id, tag_id) VALUES (1, 2)", None),
        (f"INSERT INTO {THROUGH} (product_id, tag_id) VALUES (%s, %s)", [1]),
        (f"INSERT INTO {THROUGH} (product_id, tag_id) VALUES (%(p)s, %(t)s)", {"p": 1, "t": 1}),
        (f"DELETE FROM {THROUGH} WHERE product_id = %s AND tag_id = 'x\\'", [1]),
        (f"DELETE FROM {THROUGH} WHERE NOT (product_id = %s)", [1]),
        (
            f"DELETE FROM {THROUGH} WHERE CASE WHEN product_id = %s AND tag_id = %s "
            "THEN 0 ELSE 1 END = 1",
            [1, 1],
        ),
        (
            f"WITH gone AS (DELETE FROM {THROUGH} WHERE product_id = %s RETURNING tag_id) "
            "SELECT * FROM gone",
            [1],
        ),
        (f"DELETE FROM {THROUGH} WHERE product_id = %s", [[1, 2]]),  # a list where a pk goes
    ],
)
def test_m2m_statements_not_understood_evict_both_tables(sql: str, params: Any) -> None:
    assert evicted_by(sql, params, vendor="sqlite") == EVERYTHING


def test_m2m_rows_of_a_child_model_evict_their_parent_rows() -> None:
    through = Restaurant.neighbours.through._meta.db_table
    for pk in (1, 2, 3):
        cache.set(f"r{pk}", 1, tags=[Restaurant(pk=pk)])
        cache.set(f"place{pk}", 1, tags=[Place(pk=pk)])
    run(
        f'INSERT INTO "{through}" ("from_restaurant_id", "to_restaurant_id") VALUES (%s, %s)',
        [1, 2],
        vendor="postgresql",
    )
    assert {k for k in ("r1", "r2", "r3", "place1", "place2", "place3") if not stored(k)} == {
        "r1",
        "r2",
        "place1",
        "place2",
    }


def tables_evicted(sql: Any, *, vendor: str, params: Any = None) -> set[str]:
    """Which of the entries tagged with the product and the tag tables the statement evicts."""
    cache.set("products", 1, tags=[Product])
    cache.set("tags", 1, tags=[Tag])
    run(sql, params, vendor=vendor)
    return {name for name in ("products", "tags") if not stored(name)}


@pytest.mark.parametrize(
    ("vendor", "sql", "evicted"),
    [
        # Identifiers as each database reads them.
        ("postgresql", "UPDATE TESTAPP_PRODUCT SET price = 1", {"products"}),
        ("postgresql", 'UPDATE "TESTAPP_PRODUCT" SET price = 1', set()),  # another table
        ("postgresql", 'UPDATE "testapp_product" SET price = 1', {"products"}),
        ("sqlite", 'UPDATE "TESTAPP_PRODUCT" SET price = 1', {"products"}),
        ("mysql", "UPDATE `TestApp_Product` SET price = 1", {"products"}),
        # Comments and literals name no table...
        ("sqlite", "/* not testapp_tag */ UPDATE testapp_product SET price = 1", {"products"}),
        ("sqlite", "-- testapp_tag\nUPDATE testapp_product SET price = 1", {"products"}),
        ("sqlite", "UPDATE testapp_product SET name = 'testapp_tag'", {"products"}),
        # ...unless the lexer is unsure where they end: then every name counts.
        ("mysql", "UPDATE testapp_product SET name = 'it\\'s testapp_tag'", {"products", "tags"}),
        # Several statements: any of them may write.
        ("postgresql", "SELECT 1; UPDATE testapp_product SET price = 1", {"products"}),
        ("postgresql", "SELECT 1;\n/* then */ UPDATE testapp_tag SET name = ''", {"tags"}),
        # A DELETE may cascade, in the database, to the tables that refer to it: here the
        # through table, whose rows name products too.
        ("postgresql", "DELETE FROM testapp_tag", {"products", "tags"}),
        # Writes inside a WITH, or behind EXPLAIN ANALYZE.
        (
            "postgresql",
            "/* x */ WITH gone AS (UPDATE testapp_tag SET name = '' RETURNING id) SELECT 1",
            {"tags"},
        ),
        ("postgresql", "EXPLAIN (ANALYZE) UPDATE testapp_product SET price = 1", {"products"}),
        # A statement that may write, whatever it is: the tables it names.
        ("postgresql", "CALL refresh('testapp_product')", {"products"}),
        # Not read (dollar quoting), so perhaps a DELETE: with the through table's cascade.
        (
            "postgresql",
            "DO $$ BEGIN UPDATE TESTAPP_TAG SET name = ''; END $$",
            {"products", "tags"},
        ),
        ("postgresql", "COPY testapp_product (name) FROM STDIN", {"products"}),
        # Reads.
        ("postgresql", "WITH a AS (SELECT 1) SELECT * FROM testapp_product FOR UPDATE", set()),
        ("postgresql", "EXPLAIN UPDATE testapp_product SET price = 1", set()),
        ("postgresql", "((SELECT 1)) UNION (SELECT id FROM testapp_product)", set()),
        ("sqlite", "select * from testapp_product where name = 'DELETE'", set()),
        ("sqlite", 'SAVEPOINT "s1"', set()),
        ("sqlite", "CREATE INDEX product_name ON testapp_product (name)", set()),
    ],
)
def test_statements_as_the_database_reads_them(vendor: str, sql: str, evicted: set[str]) -> None:
    assert tables_evicted(sql, vendor=vendor) == evicted


def test_statements_given_as_bytes_or_composed_objects() -> None:
    from psycopg import sql

    assert tables_evicted(b"UPDATE testapp_product SET price = 1", vendor="sqlite") == {"products"}
    update = sql.SQL("/* job */ UPDATE {} SET price = 1").format(sql.Identifier("testapp_product"))
    assert tables_evicted(update, vendor="postgresql") == {"products"}
    quoted = sql.SQL("UPDATE {} SET price = 1").format(sql.Identifier("TESTAPP_PRODUCT"))
    assert tables_evicted(quoted, vendor="postgresql") == set()

    class Opaque:
        """A statement object that cannot be rendered: only its repr names anything."""

        def as_string(self, context: Any) -> str:
            raise RuntimeError("no context")

        def __str__(self) -> str:
            return "Opaque(Identifier('testapp_tag'))"

    # Not understood, so perhaps a DELETE: the through table's rows, which name products, too.
    assert tables_evicted(Opaque(), vendor="postgresql") == {"products", "tags"}
