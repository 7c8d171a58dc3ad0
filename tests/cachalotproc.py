"""What a process of tests/test_cachalot.py does, called through ``tests.meshproc``'s ``run``.

The processes run ``tests.settings_cachalot``: django-cachalot caches every ORM read on
``CACHES["cachalot"]``. A read says how many SQL queries it ran: 0 is a cachalot hit.
"""

from __future__ import annotations

from typing import Any


def read(query: str = "products", prefix: str = "") -> dict[str, Any]:
    """What a request would read, and how many SQL queries that took (0: a cachalot hit).

    ``products``: every product as (name, price) rows; ``categories``: the names of the
    categories whose name starts with ``prefix`` (a queryset no test writes to).
    """
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from tests.testapp.models import Category, Product

    with CaptureQueriesContext(connection) as queries:
        if query == "products":
            rows = [
                list(row) for row in Product.objects.order_by("pk").values_list("name", "price")
            ]
        else:
            rows = list(
                Category.objects.filter(name__startswith=prefix).values_list("name", flat=True)
            )
    return {"rows": rows, "queries": len(queries)}


def truth(query: str = "products", prefix: str = "") -> list[Any]:
    """The same rows straight from the database (cachalot bypassed)."""
    from cachalot.api import cachalot_disabled

    with cachalot_disabled():
        return read(query, prefix)["rows"]  # type: ignore[no-any-return]


def write(scenario: str, name: str) -> None:
    """One write of ``scenario``, touching the rows named ``name``."""
    from django.db import connection, transaction

    from tests.testapp.models import Product

    if scenario == "create":
        Product.objects.create(name=name, price=1)
    elif scenario == "bulk_create":
        Product.objects.bulk_create([Product(name=name, price=n) for n in range(3)])
    elif scenario == "save":
        product = Product.objects.filter(name=name).first() or Product(name=name)
        product.price += 10
        product.save()
    elif scenario == "update":
        Product.objects.filter(name=name).update(price=42)
    elif scenario == "delete":
        Product.objects.filter(name=name).delete()
    elif scenario == "atomic":
        with transaction.atomic():
            Product.objects.create(name=name, price=5)
            with transaction.atomic():  # a savepoint inside, as views nest them
                Product.objects.filter(name=name).update(price=6)
    elif scenario == "raw_sql":
        with connection.cursor() as cursor:
            cursor.execute("UPDATE testapp_product SET price = price + 1 WHERE name = %s", [name])
    else:
        raise ValueError(scenario)
