"""5. ORM: a cached queryset hit against running the same query, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from benchmarks.common import Section, Table, Target, compare_timings, fmt_ns, fmt_ratio, ratio
from benchmarks.orm_overhead import HOOKS
from benchmarks.procs import Worker, alone_config

ROWS = 10_000
CATEGORIES = 100
READS = {
    "one row by primary key": "pk",
    "20 rows: filter + order_by + slice": "page",
}
WRITE = "save() of one row (no cache involved)"

# How the cached side reads: the tag-aware helper a user would call (it compiles the query to
# build its key and find the tables it reads, then reads this process's memory).
CACHED_READ_LABEL = (
    "`cached_queryset(qs, key=...)` (tagged with every table read; a hit is a plain cache read)"
)

INTRO = f"""
One worker per database with the mesh on (a real node, alone), a table of {ROWS:,} rows. Each
read is timed as a query (`list(qs)`, a new queryset each time, as a request would build it) and
as a hit of the cached version: {CACHED_READ_LABEL}, through MeshCache. Timing as in section 1
(calibrated loops, best-of-rounds medians, interleaved). SQLite is a file on local disk;
PostgreSQL is 127.0.0.1:5432 (database `test`), a table created and dropped by the benchmark.

The workers do not install the ORM hooks (`django_warpmesh` is not in their `INSTALLED_APPS`):
the `save()` row is the plain write cost. What the hooks add on the request thread is in the
next two tables, from `python -m benchmarks.orm_overhead --json`, one process per database (the
mesh disabled: sending happens on another thread anyway): each hook's own work per call, called
directly without the database; then each operation end to end, in batches of 400 with the hooks
installed and uninstalled, alternating, on the same database, the best batch of each kept.
"""

HOOK_OPS_IN_TARGET = ("save() one row", "QuerySet.update()")

# -- in the worker ---------------------------------------------------------------------------


def _queryset(kind: str, i: int) -> Any:
    from benchmarks.models import BenchItem

    if kind == "pk":
        return BenchItem.objects.filter(pk=1 + (i * 7919) % ROWS)
    return BenchItem.objects.filter(category=i % CATEGORIES).order_by("id")[:20]


def cached_read(key: str, make_queryset: Callable[[], Any]) -> list[Any]:
    """The cached read under test."""
    from django_warpmesh.cached import cached_queryset

    return cached_queryset(make_queryset(), None, cache="mesh", key=key)


def setup() -> dict[str, str]:
    """Create and fill the table (dropping a leftover of an interrupted run first)."""
    from django.db import connection

    from benchmarks.models import BenchItem

    teardown()
    with connection.schema_editor() as editor:
        editor.create_model(BenchItem)
    BenchItem.objects.bulk_create(
        [BenchItem(name=f"item {i}", category=i % CATEGORIES, price=i % 997) for i in range(ROWS)],
        batch_size=1000,
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    return {"vendor": connection.vendor, "version": _server_version()}


def _server_version() -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SHOW server_version")
        else:
            cursor.execute("SELECT sqlite_version()")
        return str(cursor.fetchone()[0])


def teardown() -> None:
    from django.db import connection

    from benchmarks.models import BenchItem

    if BenchItem._meta.db_table in connection.introspection.table_names():
        with connection.schema_editor() as editor:
            editor.delete_model(BenchItem)


def measure(min_time: float, rounds: int, loops: int) -> dict[str, float]:
    from benchmarks.models import BenchItem

    def query(kind: str) -> Callable[[int], int]:
        def run(count: int) -> int:
            from benchmarks.common import timed_calls

            return timed_calls(lambda i: list(_queryset(kind, i)), range(count))

        return run

    def hit(kind: str) -> Callable[[int], int]:
        # The same few keys over and over: after the first loop, every read is a hit.
        def run(count: int) -> int:
            from benchmarks.common import timed_calls

            def read(i: int) -> object:
                slot = i % 10
                return cached_read(f"orm:{kind}:{slot}", lambda: _queryset(kind, slot))

            return timed_calls(read, range(count))

        return run

    items = list(BenchItem.objects.order_by("id")[:100])

    def save(count: int) -> int:
        from benchmarks.common import timed_calls

        def write(i: int) -> None:
            item = items[i % len(items)]
            item.price = i
            item.save(update_fields=["price", "updated"])

        return timed_calls(write, range(count))

    runs: dict[str, Callable[[int], int]] = {}
    for label, kind in READS.items():
        runs[f"{label}|query"] = query(kind)
        runs[f"{label}|hit"] = hit(kind)
    runs[WRITE] = save
    return compare_timings(runs, min_time=min_time, rounds=rounds, loops=loops)


# -- in the parent ---------------------------------------------------------------------------


def _database(name: str, env: dict[str, str], timing: dict[str, Any]) -> dict[str, Any]:
    worker = Worker(f"orm-{name}", alone_config(), env)
    try:
        worker.call("worker:start_node")
        info = worker.call("orm:setup", timeout=300)
        try:
            return {**info, "ns": worker.call("orm:measure", timeout=600, **timing)}
        finally:
            worker.call("orm:teardown", timeout=60)
    finally:
        worker.close()


def _hook_overhead(database: str, rounds: int) -> dict[str, Any]:
    """Run benchmarks.orm_overhead in its own process (it configures Django its own way)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARPMESH_")}
    command = [sys.executable, "-m", "benchmarks.orm_overhead", "--database", database, "--json"]
    result = subprocess.run(
        [*command, "--rounds", str(rounds)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError((result.stderr.strip().splitlines() or ["failed"])[-1])
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run(quick: bool) -> Section:
    timing = (
        {"min_time": 0.02, "rounds": 3, "loops": 3}
        if quick
        else {"min_time": 0.05, "rounds": 5, "loops": 3}
    )
    section = Section(5, "ORM: cached queryset hit vs the query", intro=INTRO)
    directory = tempfile.mkdtemp(prefix="warpmesh-bench-orm-")
    results: dict[str, dict[str, Any]] = {}
    try:
        databases = {
            "SQLite": {
                "BENCH_DB": "sqlite",
                "BENCH_SQLITE_PATH": os.path.join(directory, "bench.sqlite3"),
            },
            "PostgreSQL": {"BENCH_DB": "postgresql"},
        }
        for name, env in databases.items():
            print(f"  {name}")
            try:
                results[name] = _database(name, env, timing)
            except Exception as exc:
                section.notes.append(f"{name} not measured: {str(exc).splitlines()[0]}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    table = Table(
        "Cost per read (lower is better)",
        ["database", "read", "query", "cached hit", "query ÷ hit"],
    )
    for name, result in results.items():
        ns = result["ns"]
        for label in READS:
            query, hit = ns[f"{label}|query"], ns[f"{label}|hit"]
            table.add(name, label, fmt_ns(query), fmt_ns(hit), fmt_ratio(ratio(query, hit)))
        table.add(name, WRITE, fmt_ns(ns[WRITE]), "", "")
    table.notes.append(
        "Servers: "
        + ", ".join(f"{name} {result['version']}" for name, result in results.items())
        + "."
    )
    section.tables.append(table)
    per_call = Table(
        "What each ORM hook costs per call, without the database round trip it rides on",
        ["database", "hook", "µs per call"],
    )
    hooks = Table(
        "What the ORM hooks add on the request thread, end to end",
        ["database", "operation", "hooks off", "hooks on", "added", "ratio"],
    )
    overhead: dict[str, dict[str, dict[str, float]]] = {}
    calls: dict[str, dict[str, float]] = {}
    for name, database in (("SQLite", "sqlite"), ("PostgreSQL", "postgresql")):
        print(f"  {name}: ORM hooks on and off")
        try:
            measured = _hook_overhead(database, 2 if quick else 3)
        except Exception as exc:
            section.notes.append(f"ORM hooks on {name} not measured: {exc}")
            continue
        overhead[name], calls[name] = measured["end_to_end"], measured["per_call_us"]
        for hook, cost in calls[name].items():
            per_call.add(name, HOOKS.get(hook, hook), f"{cost:.1f}")
        for operation, cost in overhead[name].items():
            off, on = cost["off_us"], cost["on_us"]
            hooks.add(
                name,
                operation,
                fmt_ns(off * 1000),
                fmt_ns(on * 1000),
                f"{on - off:+.1f} µs",
                fmt_ratio(ratio(on, off)),
            )
    per_call.notes.append(
        "Each hook called directly in calibrated loops (best of the rounds), the statement "
        "itself replaced by a no-op: the stable part of the overhead. A save() pays a pre_save "
        "claim, the wrapper around its statement (claimed: no table-wide invalidation) and a "
        "post_save; an UPDATE through a QuerySet pays the wrapper's table-wide invalidation."
    )
    hooks.notes.append(
        "Each row is two best-of-batches of ~1 ms operations on a shared host: a difference of"
        " a few percent either way (a negative one included) is within its noise."
    )
    section.tables += [per_call, hooks]
    print("  django-cachalot on each cache")
    try:
        from benchmarks import cachalot

        section.tables += cachalot.run(quick)
    except Exception as exc:
        section.notes.append(f"django-cachalot not measured: {str(exc).splitlines()[0]}")
    speedups = [
        ratio(result["ns"][f"{label}|query"], result["ns"][f"{label}|hit"])
        for result in results.values()
        for label in READS
    ]
    parts = []
    if speedups:
        parts.append(f"hit {min(speedups):.1f}-{max(speedups):.1f}x faster than the query")
    for name, costs in calls.items():
        parts.append(
            f"hooks per call on {name}: "
            + ", ".join(f"{hook} {cost:.1f} µs" for hook, cost in costs.items())
        )
    for name, costs in overhead.items():
        added = ", ".join(
            f"{operation} {costs[operation]['on_us'] - costs[operation]['off_us']:+.0f} µs"
            for operation in HOOK_OPS_IN_TARGET
            if operation in costs
        )
        parts.append(f"end to end on {name}: {added}")
    section.targets.append(
        Target(
            "ORM: cached hit vs query, and the write-path overhead of the ORM hooks",
            "; ".join(parts) or "nothing measured",
            None,
            no_threshold=bool(parts),
        )
    )
    return section
