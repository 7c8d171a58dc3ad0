"""tests.settings with django-cachalot installed, caching on ``CACHES["cachalot"]``.

``WARPMESH_CACHALOT_BACKEND`` picks that cache's backend: a plain ``MeshCache`` by default;
Django's ``LocMemCache`` to measure what they do.
"""

from __future__ import annotations

import os

from tests.settings import *  # noqa: F403
from tests.settings import CACHES, INSTALLED_APPS

INSTALLED_APPS = [*INSTALLED_APPS, "cachalot"]
CACHES = {
    **CACHES,
    "cachalot": {
        "BACKEND": os.environ.get(
            "WARPMESH_CACHALOT_BACKEND", "django_warpmesh.cache.MeshCache"
        ),
        "LOCATION": "cachalot",
    },
}
CACHALOT_CACHE = "cachalot"
