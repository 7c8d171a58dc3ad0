"""A Django process of the mesh under test, driven by JSON lines on stdin.

Started by :class:`tests.cluster.MeshProcess` as ``python -m tests.meshproc``, with ``WARPMESH``
given as JSON in the ``WARPMESH_JSON`` environment variable. Each request line
``{"call": ..., ...}`` gets one reply line ``{"ok": result}`` or ``{"error": "..."}``
(:func:`harness.serve.serve`'s loop).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from collections.abc import Callable
from typing import Any

from django.core.cache import caches

import django_warpmesh
from django_warpmesh import node as mesh_node
from django_warpmesh.store import get_store
from harness.serve import serve


def chaos(cache: Any, request: dict[str, Any]) -> dict[str, list[list[Any]]]:
    """Random reads (through the cache) and writes (through the ORM) on a few product rows.

    Every write stores a value no other write uses; every read says when it started. The test
    then checks no read returned a value that had been overwritten long enough ago.
    """
    import random

    from tests.testapp.models import Product

    rng = random.Random(request["seed"])
    index, pks = request["index"], request["pks"]
    reads: list[list[Any]] = []
    writes: list[list[Any]] = []
    for count in range(request["ops"]):
        pk = rng.choice(pks)
        if rng.random() < request["write_ratio"]:
            value = (count + 1) * 16 + index  # unique across processes (index < 16)
            Product(pk=pk, name="chaos", price=value).save(update_fields=["price"])
            writes.append([pk, value, time.time()])
        else:
            started = time.time()
            value = cache.get_or_set(
                f"chaos:{pk}",
                lambda pk=pk: Product.objects.values_list("price", flat=True).get(pk=pk),
                None,
                tags=[Product(pk=pk)],
            )
            reads.append([pk, value, started])
    return {"reads": reads, "writes": writes}


def _starvable_mesh_threads() -> dict[str, bool]:
    """Lets a test stop the node's receiver or sender thread from running ("starve")."""
    import threading

    from django_warpmesh.node import waiting

    starved: dict[str, bool] = {}
    readable_wait, wakeup_wait = waiting.Readable.wait, waiting.Wakeup.wait

    def starving(wait: Any) -> Any:
        def patched(self: Any, timeout: float) -> bool:
            name = threading.current_thread().name
            if not starved.get(name):
                return bool(wait(self, timeout))
            starved[f"{name}:held"] = True
            while starved.get(name):
                time.sleep(0.005)
            starved[f"{name}:held"] = False
            return False

        return patched

    waiting.Readable.wait = starving(readable_wait)  # type: ignore[method-assign]
    waiting.Wakeup.wait = starving(wakeup_wait)  # type: ignore[method-assign]
    return starved


# -- the calls a test can make, by name (anything else is a method of the cache) -------------

Command = Callable[[dict[str, Any]], Any]
COMMANDS: dict[str, Command] = {}
# What main() sets up once Django is: the log lines seen, a database's settings put aside, the
# mesh threads a test keeps from running.
logged: list[str] = []
saved: dict[str, Any] = {}
starved: dict[str, bool] = {}


def command(name: str) -> Callable[[Command], Command]:
    def register(run: Command) -> Command:
        COMMANDS[name] = run
        return run

    return register


@command("stats")
def _stats(request: dict[str, Any]) -> Any:
    return django_warpmesh.mesh_stats()


@command("start")
def _start(request: dict[str, Any]) -> Any:
    node = mesh_node.get_node()
    return {"address": getattr(node, "address", None), "enabled": node.enabled}


@command("ready")
def _ready(request: dict[str, Any]) -> Any:
    return mesh_node.get_node().ready


@command("stored")
def _stored(request: dict[str, Any]) -> Any:
    alias = request.get("alias", "default")
    # What the store holds, without touching LRU order or expiry: for assertions.
    store = get_store(caches[alias]._location)  # type: ignore[attr-defined]
    key = caches[alias].make_key(request["key"])
    return key in store.cache


@command("ttl")
def _ttl(request: dict[str, Any]) -> Any:
    alias = request.get("alias", "default")
    # Seconds left before the entry expires (None: never), as the store holds it.
    store = get_store(caches[alias]._location)  # type: ignore[attr-defined]
    expiry = store.expire_info.get(caches[alias].make_key(request["key"]))
    return None if expiry is None else expiry - time.time()


@command("count")
def _count(request: dict[str, Any]) -> Any:
    alias = request.get("alias", "default")
    store = get_store(caches[alias]._location)  # type: ignore[attr-defined]
    return len(store.cache)


@command("flood")
def _flood(request: dict[str, Any]) -> Any:
    alias = request.get("alias", "default")
    cache = caches[alias]
    prefix, count = request["prefix"], request["count"]
    if not request.get("while_sending"):
        for i in range(count):
            cache.delete(f"{prefix}{i}")
        return count
    # As if another thread were sending the whole time (a slow send on a busy host): every
    # write finds the send lock taken, so the queue only fills.
    node = mesh_node.get_node()
    with node.sender._send_lock:  # type: ignore[union-attr]
        for i in range(count):
            cache.delete(f"{prefix}{i}")
    node.deliver()
    return count


@command("threaded_deletes")
def _threaded_deletes(request: dict[str, Any]) -> Any:
    alias = request.get("alias", "default")
    # Many writing threads at once: each sends inline, or leaves it to the one sending.
    import threading

    cache = caches[alias]
    count, threads = request["count"], request["threads"]

    def deletes(start: int) -> None:
        for i in range(start, count, threads):
            cache.delete(f"{request['prefix']}{i}")

    workers = [threading.Thread(target=deletes, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return count


@command("fill_local")
def _fill_local(request: dict[str, Any]) -> Any:
    alias = request.get("alias", "default")
    # Store values in this process only, as if each had been filled from the database.
    cache = caches[alias]
    store = get_store(cache._location)  # type: ignore[attr-defined]
    with store.lock:
        for i in range(request["count"]):
            key = cache.make_key(f"{request['prefix']}{i}")
            store.cache[key] = pickle.dumps(i)
            store.expire_info[key] = None
    return request["count"]


@command("clear_local")
def _clear_local(request: dict[str, Any]) -> Any:
    alias = request.get("alias", "default")
    # Forget everything in this process only: a clean slate between tests that
    # broadcasts nothing, so no late frame can evict the next test's values.
    get_store(caches[alias]._location).flush()  # type: ignore[attr-defined]
    return True


@command("peer_rows")
def _peer_rows(request: dict[str, Any]) -> Any:
    from django_warpmesh.models import PeerRow

    rows = PeerRow.objects.using(request.get("using", "default"))
    return list(rows.values("node_id", "address", "pid", "caches"))


@command("logged")
def _logged(request: dict[str, Any]) -> Any:
    return "\n".join(logged)


@command("discovery_syncs")
def _discovery_syncs(request: dict[str, Any]) -> Any:
    return mesh_node.get_node().registry.syncs  # type: ignore[union-attr]


@command("registry")
def _registry(request: dict[str, Any]) -> Any:
    # The registry's counters (syncs, and what its kind counts: mDNS's ignored and malformed).
    registry = mesh_node.get_node().registry  # type: ignore[union-attr]
    return {
        name: value
        for name, value in vars(registry).items()
        if isinstance(value, int) and not name.startswith("_")
    }


@command("discovery_failures")
def _discovery_failures(request: dict[str, Any]) -> Any:
    return mesh_node.get_node().discovery_failures  # type: ignore[union-attr]


@command("db_break")
def _db_break(request: dict[str, Any]) -> Any:
    # Point every thread's connection at a database that refuses, as an outage would.
    from django.db import connections

    saved.update(connections.settings["default"])
    if connections["default"].vendor == "sqlite":
        connections.settings["default"]["NAME"] = "/nonexistent/warpmesh/peers.sqlite3"
    else:
        connections.settings["default"]["PORT"] = str(request["refusing_port"])
    return True


@command("db_fix")
def _db_fix(request: dict[str, Any]) -> Any:
    from django.db import connections

    connections.settings["default"].update(saved)
    return True


@command("starve")
def _starve(request: dict[str, Any]) -> Any:
    # A mesh thread that gets no turn, as one waiting for the GIL on a busy worker;
    # answered once it is held (its wait under way when asked ends first).
    name, on = request["thread"], request.get("on", True)
    starved[name] = on
    deadline = time.monotonic() + 5
    while on and not starved.get(f"{name}:held") and time.monotonic() < deadline:
        time.sleep(0.005)
    return bool(starved.get(f"{name}:held")) == on


@command("socket_ready")
def _socket_ready(request: dict[str, Any]) -> Any:
    # Whether a frame waits in nng's receive queue (reached this process, not applied).
    import select

    node = mesh_node.get_node()
    return bool(select.select([node.socket.recv_fd], [], [], 0)[0])  # type: ignore[union-attr]


@command("fork")
def _fork(request: dict[str, Any]) -> Any:
    # The child answers and goes on serving these requests; the parent (its mesh
    # threads running) waits for it to exit, then answers with its exit status.
    pid = os.fork()
    if pid == 0:
        return {"child": os.getpid()}
    _, status = os.waitpid(pid, 0)
    return {"child_status": status}


@command("migrate")
def _migrate(request: dict[str, Any]) -> Any:
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return True


@command("create_product")
def _create_product(request: dict[str, Any]) -> Any:
    from tests.testapp.models import Product

    return Product.objects.create(name=request["name"], price=request["price"]).pk


@command("set_tagged")
def _set_tagged(request: dict[str, Any]) -> Any:
    alias = request.get("alias", "default")
    # A value derived from a product row (or, with "table", the whole table).
    from tests.testapp.models import Product

    tag = Product if request.get("table") else Product(pk=request["product"])
    caches[alias].set(request["key"], request["value"], None, tags=[tag])
    return True


@command("save_product")
def _save_product(request: dict[str, Any]) -> Any:
    from tests.testapp.models import Product

    product = Product.objects.get(pk=request["product"])
    product.price = request["price"]
    product.save()
    return True


@command("update_products")
def _update_products(request: dict[str, Any]) -> Any:
    from tests.testapp.models import Product

    return Product.objects.update(price=request["price"])


@command("chaos")
def _chaos(request: dict[str, Any]) -> Any:
    alias = request.get("alias", "default")
    return chaos(caches[alias], request)


@command("run")
def _run(request: dict[str, Any]) -> Any:
    # A function of a helper module by dotted path (tests.cachalotproc's reads and
    # writes), so a test module brings its own calls without growing this one.
    from django.utils.module_loading import import_string

    return import_string(request["function"])(**request.get("kwargs", {}))


@command("exit")
def _exit(request: dict[str, Any]) -> Any:
    mesh_node.stop_node()
    return True


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django
    from django.conf import settings

    django.setup()
    if "WARPMESH_TEST_HEARTBEAT_FANIN" in os.environ:
        # A mesh of a few processes behaves as a large one would (test_scale.py).
        from django_warpmesh.node import peers

        peers.HEARTBEAT_FANIN = float(os.environ["WARPMESH_TEST_HEARTBEAT_FANIN"])  # type: ignore[assignment]
    settings.WARPMESH = json.loads(os.environ.get("WARPMESH_JSON", "{}"))
    # As override_settings would: whatever parsed WARPMESH during setup parses it again.
    from django.core.signals import setting_changed

    setting_changed.send(sender=None, setting="WARPMESH", value=settings.WARPMESH, enter=True)

    global starved
    starved = _starvable_mesh_threads()

    class Remember(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record.getMessage())

    logging.getLogger("django_warpmesh").addHandler(Remember())

    def handle(request: dict[str, Any]) -> Any:
        run = COMMANDS.get(request["call"])
        if run is not None:
            return run(request)
        # Any other call is a method of the cache named by "alias".
        method = getattr(caches[request.get("alias", "default")], request["call"])
        return method(*request.get("args", []), **request.get("kwargs", {}))

    serve(handle)
    time.sleep(0)


if __name__ == "__main__":
    main()
