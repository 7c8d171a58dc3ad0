"""Django settings of a benchmark worker process (:mod:`benchmarks.worker`).

The parent passes what differs per process in the environment:

- ``BENCH_WARPMESH_JSON``: the ``WARPMESH`` dict (``{"ENABLED": false}`` for a mesh-less process);
- ``BENCH_DB``: ``sqlite`` (default; the file in ``BENCH_SQLITE_PATH``) or ``postgresql``
  (``test`` database on 127.0.0.1:5432, user ``postgres``, as the test suite uses).

Every cache measured side by side is configured here with the same options, so the one-process
comparison runs each backend in the same interpreter with the same payloads.
"""

from __future__ import annotations

import json
import os
import tempfile

SECRET_KEY = "django-warpmesh-benchmarks-not-secret"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "benchmarks"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

if os.environ.get("BENCH_DB") == "postgresql":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": os.environ.get("WARPMESH_PG_HOST", "127.0.0.1"),
            "PORT": os.environ.get("WARPMESH_PG_PORT", "5432"),
            "NAME": os.environ.get("WARPMESH_PG_NAME", "test"),
            "USER": os.environ.get("WARPMESH_PG_USER", "postgres"),
            "CONN_MAX_AGE": None,
        }
    }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get(
                "BENCH_SQLITE_PATH", os.path.join(tempfile.gettempdir(), "warpmesh-bench.sqlite3")
            ),
        }
    }

# Redis database 15 and a prefix of our own: the benchmark never touches anyone else's keys
# (and never calls clear(), which would FLUSHDB).
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
_ENTRIES = {"MAX_ENTRIES": 2_000_000}
CACHES = {
    "default": {"BACKEND": "django_warpmesh.cache.MeshCache", "LOCATION": "mesh"},
    "mesh": {"BACKEND": "django_warpmesh.cache.MeshCache", "LOCATION": "mesh", "OPTIONS": _ENTRIES},
    "bulk": {"BACKEND": "django_warpmesh.cache.MeshCache", "LOCATION": "bulk", "OPTIONS": _ENTRIES},
    "locmem": {
        "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
        "LOCATION": "locmem",
        "OPTIONS": _ENTRIES,
    },
    "django_redis": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "warpmesh-bench",
    },
    "redis": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "warpmesh-bench",
    },
}

WARPMESH = json.loads(os.environ.get("BENCH_WARPMESH_JSON") or '{"ENABLED": false}')

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_warpmesh": {"handlers": ["console"], "level": "WARNING"}},
}
