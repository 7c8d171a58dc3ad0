"""Fork after (or before) the mesh socket was opened, and report what the child could do."""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    mode = sys.argv[1]
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django
    from django.conf import settings

    django.setup()
    settings.WARPMESH = json.loads(os.environ["WARPMESH_JSON"])
    # As override_settings would: whatever parsed WARPMESH during setup parses it again.
    from django.core.signals import setting_changed

    setting_changed.send(sender=None, setting="WARPMESH", value=settings.WARPMESH, enter=True)
    from django.core.cache import cache

    import django_warpmesh

    if mode in ("after-open", "after-stop", "garbage"):
        cache.set("parent-key", "parent", None)
    if mode == "after-stop":
        from django_warpmesh.node import stop_node

        stop_node()  # the socket was opened, and there is no node left to relay through
    if mode == "garbage":
        # A pynng socket of the parent's, in a reference cycle not collected yet (as a thread's
        # traceback can leave one): the child's collector finds it.
        import gc

        import pynng

        gc.disable()
        cycle: list[object] = [pynng.Pair0()]
        cycle.append(cycle)
        del cycle
    pid = os.fork()
    if pid == 0:
        try:
            if mode == "garbage":
                gc.enable()
                gc.collect()
            had_parent_value = cache.get("parent-key") is not None
            cache.set("child-key", "child", None)
            report = {
                "child_value": cache.get("child-key"),
                "had_parent_value": had_parent_value,
                "stats": django_warpmesh.mesh_stats(),
            }
            print(json.dumps(report), flush=True)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"child_status": status, "parent_value": cache.get("parent-key")}), flush=True)


if __name__ == "__main__":
    main()
