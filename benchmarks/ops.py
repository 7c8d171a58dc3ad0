"""1. One-process operation cost: MeshCache, LocMemCache, django-redis, Django's RedisCache."""

from __future__ import annotations

import functools
import itertools
import pickle
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.common import (
    Section,
    Table,
    Target,
    compare_timings,
    fmt_ns,
    fmt_ratio,
    median,
    ratio,
    timed_calls,
)
from benchmarks.procs import alone_config, close_all, spawn

PAYLOAD = {
    "id": 42,
    "name": "Ada Lovelace",
    "email": "ada@example.com",
    "roles": ["admin", "editor"],
    "score": 3.14,
}
DISTINCT_KEYS = 1000
MANY = 100
OPS = ("get hit", "get miss", "set", "delete", "get_many(100)")
ISOLATED_OPS = ("get hit", "set", "delete")
INTRO = """
Two worker processes: one whose mesh is on (a real node, started, alone: its only listed peer is
itself, so every write is signed and sent by the writing thread exactly as in a fleet, and
every read first checks the socket for waiting invalidations), one with `ENABLED` false. Each
times every backend it has in the same interpreter,
timeit-style: a loop calibrated to run at least a few tens of milliseconds, garbage collector
off, the cost of an empty loop subtracted, repeated with the backends interleaved loop by loop
in a random order (so a slow moment of the host hits all alike). Reported: the best of several
rounds of the median of several loops. Then each operation once at a time, 2-4 ms apart, as a
web process would make it.
"""
REDIS_ALIASES = ("django_redis", "redis")
LABELS = {
    "mesh": "MeshCache",
    "locmem": "LocMemCache",
    "django_redis": "django-redis",
    "redis": "Django RedisCache",
}

# -- in the worker --------------------------------------------------------------------------


def _fill(cache: Any, keys: list[str]) -> None:
    """Store PAYLOAD under ``keys`` without timing it and without broadcasting anything."""
    from django_warpmesh.cache import MeshCache, get_store

    if isinstance(cache, MeshCache):
        store = get_store(cache._location)
        pickled = pickle.dumps(PAYLOAD, cache.pickle_protocol)
        with store.lock:
            for key in keys:
                store.put(cache.make_key(key), pickled, None, 10**9, 3)
    else:
        cache.set_many(dict.fromkeys(keys, PAYLOAD), None)


def _args(cache: Any, op: str, count: int) -> tuple[Callable[[Any], object], list[Any]]:
    """What ``count`` operations ``op`` call, and with what (set-up done here, untimed)."""
    if op == "delete":
        keys = [f"del:{i}" for i in range(count)]
        _fill(cache, keys)
        return cache.delete, keys
    if op == "get_many(100)":
        groups = [[f"hit:{(g * 37 + i) % DISTINCT_KEYS}" for i in range(MANY)] for g in range(10)]
        return cache.get_many, list(itertools.islice(itertools.cycle(groups), count))
    prefix = {"get hit": "hit", "get miss": "miss", "set": "set"}[op]
    names = [f"{prefix}:{i}" for i in range(DISTINCT_KEYS)]
    keys = list(itertools.islice(itertools.cycle(names), count))
    if op == "set":
        return functools.partial(_set, cache), keys
    return cache.get, keys


def _drain_sender(within: float = 1.0) -> None:
    """Until the mesh's sender has sent everything a loop queued. What the sender did while the
    loop ran is in the loop's time (same process, same GIL); the rest is drained here, untimed,
    so that it does not land in the next loop's time."""
    from django_warpmesh import node as mesh_node

    node = mesh_node.get_node()
    if not isinstance(node, mesh_node.MeshNode):
        return
    deadline, sent = time.monotonic() + within, -1
    while time.monotonic() < deadline and (node.queued or node.counters.keys_sent != sent):
        sent = node.counters.keys_sent
        time.sleep(0.002)


def _set(cache: Any, key: str) -> None:
    cache.set(key, PAYLOAD, None)


def _loop(cache: Any, op: str) -> Callable[[int], int]:
    def run(count: int) -> int:
        return timed_calls(*_args(cache, op, count))

    return run


def _isolated(caches: dict[str, Any], samples: int) -> dict[str, dict[str, float]]:
    """Median time of one call made alone, 2-4 ms after the previous one (as in a web process,
    where writes are sparse): what a request pays, including the mesh's own send."""
    durations: dict[str, dict[str, list[float]]] = {
        alias: {op: [] for op in ISOLATED_OPS} for alias in caches
    }
    for cache in caches.values():
        _fill(cache, [f"idel:{i}" for i in range(samples)])
    for i in range(samples):
        for op in ISOLATED_OPS:
            # A new order each time, so that no backend always comes right after the same one.
            for alias in random.sample(list(caches), len(caches)):
                cache = caches[alias]
                call, arg = {
                    "get hit": (cache.get, f"hit:{i % DISTINCT_KEYS}"),
                    "set": (functools.partial(_set, cache), f"iset:{i}"),
                    "delete": (cache.delete, f"idel:{i}"),
                }[op]
                time.sleep(random.uniform(0.002, 0.004))
                started = time.perf_counter_ns()
                call(arg)
                durations[alias][op].append(time.perf_counter_ns() - started)
    return {
        alias: {op: median(values) for op, values in by_op.items()}
        for alias, by_op in durations.items()
    }


def measure(
    aliases: list[str], min_time: float, rounds: int, loops: int, isolated: int
) -> dict[str, Any]:
    """ns per operation by alias and op (loops), and per isolated call; the mesh counters."""
    from django.core.cache import caches

    import django_warpmesh

    skipped: dict[str, str] = {}
    usable: dict[str, Any] = {}
    for alias in aliases:
        try:
            caches[alias].set("ping", 1, 5)
            usable[alias] = caches[alias]
        except Exception as exc:
            skipped[alias] = f"{type(exc).__name__}: {exc}"
    try:
        for cache in usable.values():
            _fill(cache, [f"hit:{i}" for i in range(DISTINCT_KEYS)])
        runs = {f"{alias}|{op}": _loop(cache, op) for alias, cache in usable.items() for op in OPS}
        ns = compare_timings(
            runs, min_time=min_time, rounds=rounds, loops=loops, settle=_drain_sender
        )
        alone = _isolated(usable, isolated)
    finally:
        for alias, cache in usable.items():
            if alias in REDIS_ALIASES:
                for prefix in ("hit", "set", "miss", "iset", "idel"):
                    cache.delete_many([f"{prefix}:{i}" for i in range(DISTINCT_KEYS)])
                cache.delete("ping")
    stats = django_warpmesh.mesh_stats()
    return {
        "ns": {alias: {op: ns[f"{alias}|{op}"] for op in OPS} for alias in usable},
        "isolated_ns": alone,
        "skipped": skipped,
        "counters": {
            key: stats[key]
            for key in ("frames_sent", "keys_sent", "queue_overflows", "send_errors")
        },
    }


# -- in the parent --------------------------------------------------------------------------


def run(quick: bool) -> Section:
    timing = (
        {"min_time": 0.01, "rounds": 5, "loops": 3, "isolated": 40}
        if quick
        else {"min_time": 0.02, "rounds": 7, "loops": 5, "isolated": 150}
    )
    section = Section(1, "One-process operation cost", intro=INTRO)
    workers = spawn(
        [
            ("ops-mesh-on", alone_config(), None),
            ("ops-mesh-off", {"ENABLED": False}, None),
        ]
    )
    try:
        on_worker, off_worker = workers
        on_worker.call("worker:start_node")
        # One at a time: two processes timing at once would share the two cores.
        aliases = ["mesh", "locmem", *REDIS_ALIASES]
        on = on_worker.call("ops:measure", timeout=600, aliases=aliases, **timing)
        off = off_worker.call("ops:measure", timeout=300, aliases=["mesh", "locmem"], **timing)
    finally:
        close_all(workers)
    _report(section, on, off)
    return section


def _cost_table(
    title: str,
    ops: Sequence[str],
    on: dict[str, dict[str, float]],
    off: dict[str, dict[str, float]],
) -> Table:
    """One row per operation: each backend's cost, MeshCache against the LocMemCache timed in
    the same process (interleaved with it), and each Redis backend against MeshCache, mesh on."""
    redis = [alias for alias in REDIS_ALIASES if alias in on]
    headers = ["operation", "LocMemCache", "MeshCache, mesh on", "÷ LocMem"]
    headers += ["LocMemCache (mesh-off process)", "MeshCache, mesh off", "÷ LocMem"]
    for alias in redis:
        headers += [LABELS[alias], "÷ MeshCache on"]
    table = Table(title, headers)
    for op in ops:
        mesh, locmem = on["mesh"][op], on["locmem"][op]
        row: list[object] = [op, fmt_ns(locmem), fmt_ns(mesh), fmt_ratio(ratio(mesh, locmem))]
        row += [
            fmt_ns(off["locmem"][op]),
            fmt_ns(off["mesh"][op]),
            fmt_ratio(ratio(off["mesh"][op], off["locmem"][op])),
        ]
        for alias in redis:
            row += [fmt_ns(on[alias][op]), fmt_ratio(ratio(on[alias][op], mesh))]
        table.add(*row)
    return table


def _report(section: Section, on: dict[str, Any], off: dict[str, Any]) -> None:
    ns_on: dict[str, dict[str, float]] = on["ns"]
    loops = _cost_table(
        "Cost per operation in a loop, best-of-rounds median (lower is better)",
        OPS,
        ns_on,
        off["ns"],
    )
    counters = on["counters"]
    loops.notes.append(
        f"Payload: a {len(pickle.dumps(PAYLOAD))}-byte pickled dict; keys cycle over "
        f"{DISTINCT_KEYS} names; `delete` removes keys present; `get_many` asks for {MANY} "
        "present keys. Redis: 127.0.0.1:6379, database 15. Each ratio to LocMemCache is to the "
        "one timed in the same process, interleaved with it: the two processes run one after "
        "the other, and a slower moment of the host would otherwise show as a cost."
    )
    loops.notes.append(
        f"Mesh-on worker afterwards: {counters['keys_sent']} keys sent in "
        f"{counters['frames_sent']} frames, {counters['queue_overflows']} queue overflows, "
        f"{counters['send_errors']} send errors."
    )
    for alias, why in {**on["skipped"], **off["skipped"]}.items():
        loops.notes.append(f"{LABELS.get(alias, alias)} not measured: {why}")
    isolated = _cost_table(
        "One call alone, 2-4 ms after the previous (median)",
        ISOLATED_OPS,
        on["isolated_ns"],
        off["isolated_ns"],
    )
    isolated.notes.append(
        "As a web process writes: sparsely. Every call here finds the CPU caches cold, and "
        "a MeshCache write with the mesh on also sends its invalidation itself."
    )
    section.tables += [loops, isolated]

    get_hit = ratio(ns_on["mesh"]["get hit"], ns_on["locmem"]["get hit"])
    section.targets.append(
        Target(
            "MeshCache `get` hit within 1.10x of LocMemCache (the drain check included)",
            fmt_ratio(get_hit),
            get_hit <= 1.10,
            "MeshCache.get is LocMemCache.get after one non-blocking check of the mesh socket "
            "(a poll() system call, about 0.3 µs, which releases and takes back the GIL) and "
            "two Python calls",
        )
    )
    for alias in REDIS_ALIASES:
        text = f"`get` hit >= 20x faster than {LABELS[alias]}"
        if alias not in ns_on:
            section.targets.append(Target(text, "Redis unreachable", None))
            continue
        faster = ratio(ns_on[alias]["get hit"], ns_on["mesh"]["get hit"])
        section.targets.append(
            Target(
                text,
                fmt_ratio(faster),
                faster >= 20,
                "a get costs 2-3 us of Django key making and validation before the lookup, "
                "which shrinks the gap to a loopback Redis round trip",
            )
        )
    set_ratio = ratio(ns_on["mesh"]["set"], ns_on["locmem"]["set"])
    alone = on["isolated_ns"]
    set_alone = ratio(alone["mesh"]["set"], alone["locmem"]["set"])
    section.targets.append(
        Target(
            "MeshCache `set` within 1.5x of LocMemCache, alone",
            f"{fmt_ratio(set_alone)} alone, {fmt_ratio(set_ratio)} in a loop",
            set_alone <= 1.5,
            "with the mesh off, MeshCache's `set` is "
            f"{fmt_ratio(ratio(off['ns']['mesh']['set'], off['ns']['locmem']['set']))} "
            "of LocMemCache's (tags, the start-up window, the degraded cap); the rest is the "
            "writing thread's own send, which keeps the sender thread (and its wait for the "
            "GIL on a busy worker) off the path: a BLAKE2b digest, msgpack, HMAC-SHA256, and "
            "nng's hand-off of the frame to its I/O thread (a futex wake, 3 µs warm, several "
            "times that with cold caches)",
        )
    )
