"""What the ORM hooks (signals + execute wrapper) add to plain ORM writes and reads.

    .venv/bin/python -m benchmarks.orm_overhead [--database sqlite|postgresql] [--rounds 5] [--json]

``benchmarks/run`` (section 5) runs it once per database with ``--json`` and reports the tables.

Two measurements, the mesh itself disabled (this is the cost on the request thread, which is all
the hooks add there: sending happens on another thread):

* per call: each hook's own work called directly, no database round trip, in calibrated loops
  (best of the rounds): the stable part;
* end to end: each operation in batches with the hooks installed and uninstalled, alternating, in
  the same process and on the same database; the best batch of each is kept (least disturbed by
  the rest of the machine) and the difference reported per operation.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

OPS = 400
# The hooks timed per call, by the short name the JSON output uses.
HOOKS = {
    "read statement": "the execute wrapper around a read statement",
    "write statement": "the execute wrapper around a write statement it invalidates table-wide",
    "post_save": "post_save of one row (row tags, local eviction, publish)",
    "pre_save claim": "pre_save claim, sent outside a save (the whole stack walked)",
}


def configure(database: str) -> None:
    os.environ["WARPMESH_TEST_DB"] = database
    if database == "sqlite":
        directory = tempfile.mkdtemp(prefix="warpmesh-orm-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        os.environ["WARPMESH_SQLITE_PATH"] = str(Path(directory) / "bench.sqlite3")
    # The one benchmark on the test suite's settings and app (the rest use only benchmarks/ and
    # harness/): it times the ORM hooks on tests.testapp's Product, a model with a foreign key
    # and a many-to-many whose tables its migrations make, as section 5's numbers always were;
    # benchmarks.models' one table has neither relation nor migrations.
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def operations() -> dict[str, Callable[[int], None]]:
    from tests.testapp.models import Category, Product  # the test app: see configure()

    category = Category.objects.create(name="bench")
    products = [Product.objects.create(name=f"p{i}", price=i, category=category) for i in range(50)]

    def save(i: int) -> None:
        product = products[i % len(products)]
        product.price = i
        product.save()

    def create_and_delete(i: int) -> None:
        Product.objects.create(name="tmp", price=i).delete()

    def update(i: int) -> None:
        Product.objects.filter(pk=products[i % len(products)].pk).update(price=i)

    def bulk_create(i: int) -> None:
        Product.objects.bulk_create([Product(name="bulk", price=j) for j in range(20)])
        if i % 10 == 9:
            Product.objects.filter(name="bulk")._raw_delete(Product.objects.db)

    def select(i: int) -> None:
        Product.objects.filter(pk=products[i % len(products)].pk).first()

    return {
        "save() one row": save,
        "create() + delete()": create_and_delete,
        "QuerySet.update()": update,
        "bulk_create(20)": bulk_create,
        "SELECT by pk (read)": select,
    }


def batch(op: Callable[[int], None]) -> float:
    started = time.perf_counter()
    for i in range(OPS):
        op(i)
    return (time.perf_counter() - started) / OPS


def measure(rounds: int) -> dict[str, tuple[float, float]]:
    """Per operation: the best batch's µs per op with the hooks off, and on."""
    from django_warpmesh import orm

    results = {}
    for name, op in operations().items():
        with_hooks, without = [], []
        for _ in range(rounds):
            orm.uninstall()
            without.append(batch(op))
            orm.install()
            with_hooks.append(batch(op))
        results[name] = (min(without) * 1e6, min(with_hooks) * 1e6)
    return results


def per_call(rounds: int) -> dict[str, float]:
    """µs per call of each hook's own work, without the database round trip it rides on."""
    from django.db import connection

    from django_warpmesh import orm
    from tests.testapp.models import Product  # the test app: see configure()

    orm.install()
    product = Product.objects.create(name="per-call", price=1)
    quote, table = connection.ops.quote_name, Product._meta.db_table
    read = f"SELECT {quote('id')} FROM {quote(table)} WHERE {quote('id')} = %s"
    write = f"UPDATE {quote(table)} SET {quote('price')} = %s WHERE {quote('id')} = %s"
    context: dict[str, object] = {"connection": connection, "cursor": None}

    def statement(sql: str, params: object, many: bool, context: object) -> None:
        return None  # the database's part, left out

    def wrapped(sql: str) -> Callable[[], object]:
        return lambda: orm._execute_wrapper(statement, sql, (1, 1), False, context)

    calls: dict[str, Callable[[], object]] = {
        "read statement": wrapped(read),
        "write statement": wrapped(write),
        "post_save": lambda: orm._on_saved(Product, product, using=connection.alias),
        "pre_save claim": lambda: orm._claim(Product, instance=product),
    }
    bare = min(_loop(lambda: statement(read, (1, 1), False, context)) for _ in range(rounds))
    return {
        name: max(0.0, min(_loop(call) for _ in range(rounds)) - bare) * 1e6
        for name, call in calls.items()
    }


def _loop(call: Callable[[], object], count: int = 20_000) -> float:
    """Seconds per call over ``count`` calls."""
    started = time.perf_counter()
    for _ in range(count):
        call()
    return (time.perf_counter() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    configure(args.database)
    calls = per_call(args.rounds)
    results = measure(args.rounds)
    if args.json:
        costs = {name: {"off_us": off, "on_us": on} for name, (off, on) in results.items()}
        print(json.dumps({"per_call_us": calls, "end_to_end": costs}))
        return
    print(f"ORM hooks per call, {args.database}, best of {args.rounds}, no database round trip:")
    for name, cost in calls.items():
        print(f"{HOOKS[name]:<72}{cost:>8.1f}us")
    print(f"ORM hook overhead, {args.database}, {OPS} ops per batch, best of {args.rounds}:")
    print(f"{'operation':<24}{'hooks off':>12}{'hooks on':>12}{'overhead':>12}{'ratio':>8}")
    for name, (off, on) in results.items():
        print(f"{name:<24}{off:>10.1f}us{on:>10.1f}us{on - off:>+10.1f}us{on / off:>8.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
