"""A Django process of the mesh under test, driven by JSON lines on stdin.

Started by :mod:`tests.cluster` as ``python -m tests.meshproc``, with ``WARPMESH`` given as JSON in
the ``WARPMESH_JSON`` environment variable. Each request line ``{"call": ..., ...}`` gets one
reply line ``{"ok": result}`` or ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
import time
from typing import Any


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

    from django.core.cache import caches

    import django_warpmesh
    from django_warpmesh import node as mesh_node
    from django_warpmesh.cache import get_store

    saved: dict[str, Any] = {}
    logged: list[str] = []
    starved = _starvable_mesh_threads()

    class Remember(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record.getMessage())

    logging.getLogger("django_warpmesh").addHandler(Remember())

    def handle(request: dict[str, Any]) -> Any:
        call = request["call"]
        alias = request.get("alias", "default")
        if call == "stats":
            return django_warpmesh.mesh_stats()
        if call == "start":
            node = mesh_node.get_node()
            return {"address": getattr(node, "address", None), "enabled": node.enabled}
        if call == "ready":
            return mesh_node.get_node().ready
        if call == "stored":
            # What the store holds, without touching LRU order or expiry: for assertions.
            store = get_store(caches[alias]._location)  # type: ignore[attr-defined]
            key = caches[alias].make_key(request["key"])
            return key in store.cache
        if call == "ttl":
            # Seconds left before the entry expires (None: never), as the store holds it.
            store = get_store(caches[alias]._location)  # type: ignore[attr-defined]
            expiry = store.expire_info.get(caches[alias].make_key(request["key"]))
            return None if expiry is None else expiry - time.time()
        if call == "count":
            store = get_store(caches[alias]._location)  # type: ignore[attr-defined]
            return len(store.cache)
        if call == "flood":
            cache = caches[alias]
            prefix, count = request["prefix"], request["count"]
            for i in range(count):
                cache.delete(f"{prefix}{i}")
            return count
        if call == "threaded_deletes":
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
        if call == "fill_local":
            # Store values in this process only, as if each had been filled from the database.
            cache = caches[alias]
            store = get_store(cache._location)  # type: ignore[attr-defined]
            with store.lock:
                for i in range(request["count"]):
                    key = cache.make_key(f"{request['prefix']}{i}")
                    store.cache[key] = pickle.dumps(i)
                    store.expire_info[key] = None
            return request["count"]
        if call == "clear_local":
            # Forget everything in this process only: a clean slate between tests that
            # broadcasts nothing, so no late frame can evict the next test's values.
            get_store(caches[alias]._location).flush()  # type: ignore[attr-defined]
            return True
        if call == "peer_rows":
            from django_warpmesh.models import PeerRow

            rows = PeerRow.objects.using(request.get("using", "default"))
            return list(rows.values("node_id", "address", "pid", "caches"))
        if call == "logged":
            return "\n".join(logged)
        if call == "discovery_syncs":
            return mesh_node.get_node().registry.syncs  # type: ignore[union-attr]
        if call == "discovery_failures":
            return mesh_node.get_node().discovery_failures  # type: ignore[union-attr]
        if call == "db_break":
            # Point every thread's connection at a database that refuses, as an outage would.
            from django.db import connections

            saved.update(connections.settings["default"])
            if connections["default"].vendor == "sqlite":
                connections.settings["default"]["NAME"] = "/nonexistent/warpmesh/peers.sqlite3"
            else:
                connections.settings["default"]["PORT"] = str(request["refusing_port"])
            return True
        if call == "db_fix":
            from django.db import connections

            connections.settings["default"].update(saved)
            return True
        if call == "starve":
            # A mesh thread that gets no turn, as one waiting for the GIL on a busy worker;
            # answered once it is held (its wait under way when asked ends first).
            name, on = request["thread"], request.get("on", True)
            starved[name] = on
            deadline = time.monotonic() + 5
            while on and not starved.get(f"{name}:held") and time.monotonic() < deadline:
                time.sleep(0.005)
            return bool(starved.get(f"{name}:held")) == on
        if call == "socket_ready":
            # Whether a frame waits in nng's receive queue (reached this process, not applied).
            import select

            node = mesh_node.get_node()
            return bool(select.select([node.socket.recv_fd], [], [], 0)[0])  # type: ignore[union-attr]
        if call == "fork":
            # The child answers and goes on serving these requests; the parent (its mesh
            # threads running) waits for it to exit, then answers with its exit status.
            pid = os.fork()
            if pid == 0:
                return {"child": os.getpid()}
            _, status = os.waitpid(pid, 0)
            return {"child_status": status}
        if call == "migrate":
            from django.core.management import call_command

            call_command("migrate", verbosity=0)
            return True
        if call == "create_product":
            from tests.testapp.models import Product

            return Product.objects.create(name=request["name"], price=request["price"]).pk
        if call == "set_tagged":
            # A value derived from a product row (or, with "table", the whole table).
            from tests.testapp.models import Product

            tag = Product if request.get("table") else Product(pk=request["product"])
            caches[alias].set(request["key"], request["value"], None, tags=[tag])
            return True
        if call == "save_product":
            from tests.testapp.models import Product

            product = Product.objects.get(pk=request["product"])
            product.price = request["price"]
            product.save()
            return True
        if call == "update_products":
            from tests.testapp.models import Product

            return Product.objects.update(price=request["price"])
        if call == "chaos":
            return chaos(caches[alias], request)
        if call == "run":
            # A function of a helper module by dotted path (tests.cachalotproc's reads and
            # writes), so a test module brings its own calls without growing this one.
            from django.utils.module_loading import import_string

            return import_string(request["function"])(**request.get("kwargs", {}))
        if call == "exit":
            mesh_node.stop_node()
            return True
        method = getattr(caches[alias], call)
        return method(*request.get("args", []), **request.get("kwargs", {}))

    print(json.dumps({"ok": "hello", "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"ok": handle(request)}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply, default=repr), flush=True)
        if request["call"] == "exit":
            break
    time.sleep(0)


if __name__ == "__main__":
    main()
