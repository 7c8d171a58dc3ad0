from __future__ import annotations

import logging
from importlib import import_module

from django.apps import AppConfig, apps


class WarpMeshConfig(AppConfig):
    name = "django_warpmesh"
    verbose_name = "Warp Mesh"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Starts nothing: the node starts on the first use of a MeshCache, in each process.
        from django.core.exceptions import ImproperlyConfigured
        from django.db.models.signals import post_migrate

        from django_warpmesh import cache, checks, discovery, orm  # noqa: F401

        # Importing a module of the package wires nothing: it is done here (and lazily by the
        # first MeshCache of a project that does not install the app).
        cache.install()

        if apps.is_installed("cachalot"):
            # Before any check runs: it tells cachalot's check (cachalot.W001) that its backend
            # is made for cachalot. Otherwise imported only when that backend is first used.
            import_module("django_warpmesh.contrib.cachalot").install()

        # Once migrate has made the peer table, a node that could not find it looks again now.
        post_migrate.connect(
            discovery.peer_table_migrated, sender=self, dispatch_uid="django_warpmesh.discovery"
        )

        try:
            orm.install()
        except ImproperlyConfigured as exc:
            # Reported by the settings check (warpmesh.E001); the cache runs capped meanwhile.
            logging.getLogger("django_warpmesh").error("mesh: invalid settings: %s", exc)
