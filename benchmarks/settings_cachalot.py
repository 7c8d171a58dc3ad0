"""benchmarks.settings with django-cachalot caching every ORM read, on the cache that
``BENCH_CACHALOT_CACHE`` names (one alias per backend compared, each with its own storage).

``django_warpmesh`` is installed, as a deployment of MeshCache has it: its ORM hooks invalidate
after each write (cachalot invalidates before it), whatever cache cachalot uses."""

from __future__ import annotations

import os

from benchmarks.settings import *  # noqa: F403
from benchmarks.settings import CACHES, INSTALLED_APPS, REDIS_URL

INSTALLED_APPS = [*INSTALLED_APPS, "django_warpmesh", "cachalot"]
CACHES = {
    **CACHES,
    "cachalot_mesh": {
        "BACKEND": "django_warpmesh.contrib.cachalot.CachalotMeshCache",
        "LOCATION": "cachalot-mesh",
    },
    "cachalot_plain_mesh": {
        "BACKEND": "django_warpmesh.cache.MeshCache",
        "LOCATION": "cachalot-plain-mesh",
    },
    "cachalot_redis": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "warpmesh-bench-cachalot",
    },
    "cachalot_locmem": {
        "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
        "LOCATION": "cachalot-locmem",
    },
}
CACHALOT_CACHE = os.environ.get("BENCH_CACHALOT_CACHE", "cachalot_mesh")
# What the benchmark leaves in Redis expires on its own (it never calls clear()).
CACHALOT_TIMEOUT = 600
