"""django-cachalot on each cache, two processes sharing a database (part of section 5).

    python -m benchmarks.cachalot [--quick]

For each cache cachalot can sit on (``CachalotMeshCache``, a plain ``MeshCache``, django-redis,
``LocMemCache``), on SQLite and PostgreSQL, two worker processes (mesh on, connected):

- **read cost**: a cachalot hit in one process against the query with cachalot off, timed as
  section 5 times its reads (the same two querysets, calibrated loops);
- **hit rate**: the two processes take turns reading one queryset that neither has read yet,
  20 reads in all, with no write: how many were served without SQL;
- **staleness**: one process holds a row's queryset cached (its reading thread reads it in a
  loop), the other changes the row (``save()``, then ``QuerySet.update()``); the time from the
  write's return until the reader's loop first reads the new value, 10 writes each, or "never"
  if it still reads the old one after 2 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from typing import Any

from benchmarks.common import Table, compare_timings, fmt_ns, median
from benchmarks.procs import mesh_fleet

CACHES = {
    "CachalotMeshCache": "cachalot_mesh",
    "MeshCache": "cachalot_plain_mesh",
    "django-redis": "cachalot_redis",
    "LocMemCache": "cachalot_locmem",
}
READS = {"one row by primary key": "pk", "20 rows: filter + order_by + slice": "page"}
TURNS = 20
WRITES = ("save", "update")
NEVER_AFTER = 2.0

# -- in the worker ---------------------------------------------------------------------------


def setup() -> dict[str, str]:
    from benchmarks import orm

    return orm.setup()


def teardown() -> None:
    from benchmarks import orm

    orm.teardown()


def measure(min_time: float, rounds: int, loops: int) -> dict[str, float]:
    """ns per read: each queryset as a query (cachalot off) and as a cachalot hit."""
    from cachalot.api import cachalot_disabled

    from benchmarks.common import timed_calls
    from benchmarks.orm import _queryset

    def query(kind: str) -> Any:
        def run(count: int) -> int:
            with cachalot_disabled():
                return timed_calls(lambda i: list(_queryset(kind, i)), range(count))

        return run

    def hit(kind: str) -> Any:
        # The same ten querysets over and over: after the first loop, every read is a hit.
        def run(count: int) -> int:
            return timed_calls(lambda i: list(_queryset(kind, i % 10)), range(count))

        return run

    runs = {}
    for label, kind in READS.items():
        runs[f"{label}|query"] = query(kind)
        runs[f"{label}|hit"] = hit(kind)
    return compare_timings(runs, min_time=min_time, rounds=rounds, loops=loops)


def read_once(marker: int) -> int:
    """One read of a queryset keyed by ``marker``: how many SQL queries it took (0: a hit)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from benchmarks.models import BenchItem

    with CaptureQueriesContext(connection) as queries:
        list(BenchItem.objects.filter(category=marker % 100, price__lt=10_000 + marker)[:20])
    return len(queries)


def _price(pk: int) -> int:
    from benchmarks.models import BenchItem

    return BenchItem.objects.filter(pk=pk).values_list("price", flat=True)[0]


def hold(pk: int) -> dict[str, int]:
    """Read the row's price twice: the second read must be a hit for the staleness to mean
    anything; returns the price and the second read's query count."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    _price(pk)
    with CaptureQueriesContext(connection) as queries:
        price = _price(pk)
    return {"price": price, "queries": len(queries)}


_watch: dict[str, Any] = {}


def watch(pk: int, wanted: int) -> bool:
    """Start a thread reading the row's price in a loop until it reads ``wanted``."""

    def loop() -> None:
        from django.db import connection

        deadline = time.monotonic() + NEVER_AFTER + 1
        try:
            while time.monotonic() < deadline and not _watch["stop"]:
                if _price(pk) == wanted:
                    _watch["seen"] = time.monotonic()
                    return
                _watch["stale_reads"] += 1
        finally:
            connection.close()

    _watch.clear()
    _watch.update(seen=None, stale_reads=0, stop=False)
    _watch["thread"] = threading.Thread(target=loop, daemon=True)
    _watch["thread"].start()
    return True


def seen(after: float) -> dict[str, Any]:
    """When the watching loop first read the new value (``None``: not ``after`` s past now)."""
    thread = _watch["thread"]
    thread.join(after)
    _watch["stop"] = True
    thread.join()
    return {"seen": _watch["seen"], "stale_reads": _watch["stale_reads"]}


def write(kind: str, pk: int, price: int) -> float:
    """Change the row's price; the monotonic time (shared by the processes of one host) at
    which the write returned."""
    from benchmarks.models import BenchItem

    if kind == "save":
        item = BenchItem.objects.get(pk=pk)
        item.price = price
        item.save()
    else:
        BenchItem.objects.filter(pk=pk).update(price=price)
    return time.monotonic()


# -- in the parent ---------------------------------------------------------------------------


def _one(database: str, env: dict[str, str], alias: str, timing: dict[str, Any]) -> dict[str, Any]:
    full_env = {
        **env,
        "DJANGO_SETTINGS_MODULE": "benchmarks.settings_cachalot",
        "BENCH_CACHALOT_CACHE": alias,
    }
    with mesh_fleet(2, env=full_env) as (first, second):
        info = first.call("cachalot:setup", timeout=300)
        try:
            loops = {name: timing[name] for name in ("min_time", "rounds", "loops")}
            ns = first.call("cachalot:measure", timeout=600, **loops)
            # A marker no earlier run used: the queryset is cold in both processes (and in
            # Redis, which keeps what an earlier run stored).
            marker = int(time.time() * 1000) % 1_000_000
            hits = sum(
                (first, second)[i % 2].call("cachalot:read_once", marker=marker) == 0
                for i in range(TURNS)
            )
            staleness: dict[str, list[float | None]] = {kind: [] for kind in WRITES}
            price = 50_000
            for kind in WRITES:
                for n in range(timing["writes"]):
                    pk = 1 + n
                    held = second.call("cachalot:hold", pk=pk)
                    if held["queries"] != 0:
                        raise RuntimeError(f"{alias}: the reader's copy is not a hit: {held}")
                    price += 1
                    second.call("cachalot:watch", pk=pk, wanted=price)
                    written = first.call("cachalot:write", kind=kind, pk=pk, price=price)
                    result = second.call("cachalot:seen", after=NEVER_AFTER, timeout=30)
                    at = result["seen"]
                    staleness[kind].append(None if at is None else max(0.0, at - written))
        finally:
            first.call("cachalot:teardown", timeout=60)
    return {"version": info["version"], "ns": ns, "hits": hits, "staleness": staleness}


def _staleness(values: list[float | None]) -> str:
    seen = [value for value in values if value is not None]
    if not seen:
        return f"never ({len(values)} of {len(values)} still stale after {NEVER_AFTER:.0f} s)"
    text = f"{median(seen) * 1000:.2f} ms / {max(seen) * 1000:.2f} ms"
    if len(seen) < len(values):
        text += f" ({len(values) - len(seen)} of {len(values)} never)"
    return text


def run(quick: bool) -> list[Table]:
    timing: dict[str, Any] = (
        {"min_time": 0.02, "rounds": 3, "loops": 3, "writes": 5}
        if quick
        else {"min_time": 0.05, "rounds": 5, "loops": 3, "writes": 10}
    )
    directory = tempfile.mkdtemp(prefix="warpmesh-bench-cachalot-")
    results: dict[tuple[str, str], dict[str, Any]] = {}
    notes: list[str] = []
    try:
        databases = {
            "SQLite": {
                "BENCH_DB": "sqlite",
                "BENCH_SQLITE_PATH": os.path.join(directory, "bench.sqlite3"),
            },
            "PostgreSQL": {"BENCH_DB": "postgresql"},
        }
        for database, env in databases.items():
            for name, alias in CACHES.items():
                print(f"  cachalot on {name}, {database}", flush=True)
                try:
                    results[database, name] = _one(database, env, alias, {**timing})
                except Exception as exc:
                    notes.append(f"{name} on {database} not measured: {str(exc).splitlines()[0]}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    table = Table(
        "django-cachalot on each cache: read cost, hit rate, staleness (2 processes)",
        [
            "database",
            "cachalot's cache",
            *(f"{label}: hit (query)" for label in READS),
            f"hits, 2 processes taking turns ({TURNS} reads)",
            *(f"staleness after {kind}(): median / max" for kind in WRITES),
        ],
    )
    for (database, name), result in results.items():
        ns = result["ns"]
        table.add(
            database,
            name,
            *(f"{fmt_ns(ns[f'{label}|hit'])} ({fmt_ns(ns[f'{label}|query'])})" for label in READS),
            f"{result['hits']}/{TURNS}",
            *(_staleness(result["staleness"][kind]) for kind in WRITES),
        )
    table.notes.append(
        "cachalot 2.9.1, `CACHALOT_CACHE` on each backend in turn; two workers with the mesh "
        "on and connected (`benchmarks/cachalot.py`). Read cost: one process, as the table "
        "above (a hit: the same ten querysets over and over; the query: cachalot off). Hits: a "
        "queryset neither process had read, read in turn, no write. Staleness: from the write's "
        f"return in one process until a loop reading the row in the other first reads the new "
        f"value, {timing['writes']} writes of each kind; the reader held the old value as a hit "
        "before each write."
    )
    table.notes += notes
    return [table]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for table in run(args.quick):
        print(table.markdown())


if __name__ == "__main__":
    main()
