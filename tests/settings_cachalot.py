"""tests.settings with django-cachalot installed, caching on ``CACHES["cachalot"]``.

``WARPMESH_CACHALOT_BACKEND`` picks that cache's backend: ``CachalotMeshCache`` by default;
a plain ``django_warpmesh.cache.MeshCache`` or Django's ``LocMemCache`` to see what they do.
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
            "WARPMESH_CACHALOT_BACKEND", "django_warpmesh.contrib.cachalot.CachalotMeshCache"
        ),
        "LOCATION": "cachalot",
    },
}
CACHALOT_CACHE = "cachalot"
