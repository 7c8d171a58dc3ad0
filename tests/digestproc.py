"""Store some values in a MeshCache and digest what it stored, in a process of its own (run
with a chosen hash seed): what this process would send peers for each of them."""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

# Equal on every process; their pickles hold sets whose order follows the process's hash seed.
VALUES: dict[str, Any] = {
    "set of str": {"auth.add_user", "auth.change_user", "blog.view_post", "blog.delete_post"},
    "frozenset of bytes": frozenset({b"alpha", b"beta", b"gamma", b"delta", b"epsilon"}),
    "dict holding sets": {
        "perms": {"app.view_a", "app.view_b", "app.view_c", "app.change_d"},
        "groups": frozenset({"editors", "admins", "staff", "guests"}),
        "count": 4,
    },
    "nested": [
        {("app", "a"), ("app", "b"), ("other", "c"), ("other", "d")},
        frozenset({frozenset({"x", "y", "w"}), frozenset({"z", "v"}), frozenset()}),
        {datetime.date(2024, 1, day) for day in range(1, 6)},
        {1, 2.5, "mixed", b"types", None, (1, "t")},
    ],
}


def stored(cache: Any) -> dict[str, bytes]:
    """Each value set in ``cache`` (a MeshCache), and the bytes it stored for it."""
    held = {}
    for index, (name, value) in enumerate(VALUES.items()):
        cache.set(f"value{index}", value)
        held[name] = cache._store.cache[cache.make_key(f"value{index}")]
    return held


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()
    from django_warpmesh.cache import MeshCache
    from django_warpmesh.protocol import digest

    held = stored(MeshCache("digestproc", {}))
    print(json.dumps({name: [data.hex(), digest(data).hex()] for name, data in held.items()}))


if __name__ == "__main__":
    main()
