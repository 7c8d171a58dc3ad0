"""The execute wrapper on statements as other databases spell them, without running them.

Each statement goes through ``orm._execute_wrapper`` with a stand-in for the database call and a
connection of the given vendor; the tests look at which tagged cache entries it evicts.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from django.core.cache import cache

from django_warpmesh import orm
from django_warpmesh.cache import get_store
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
    orm._execute_wrapper(execute, sql, params, many, {"connection": connection, "cursor": None})


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
