from __future__ import annotations

import logging

from django.apps import AppConfig


class WarpMeshConfig(AppConfig):
    name = "django_warpmesh"
    verbose_name = "Warp Mesh"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Starts nothing: the node starts on the first use of a MeshCache, in each process.
        from django.core.exceptions import ImproperlyConfigured

        from django_warpmesh import checks, orm  # noqa: F401

        try:
            orm.install()
        except ImproperlyConfigured as exc:
            # Reported by the settings check (warpmesh.E001); the cache runs capped meanwhile.
            logging.getLogger("django_warpmesh").error("mesh: invalid settings: %s", exc)
