"""Build this process's mesh node from the Django settings.

The node module knows nothing of Django; this module is the seam: it reads ``WARPMESH``, derives
the HMAC key, and picks where peers come from (the static ``PEERS`` list or the database table).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from django.apps import apps
from django.conf import settings
from django.utils.crypto import salted_hmac

from django_warpmesh import node as mesh_node
from django_warpmesh.conf import MeshSettings, get_settings

logger = logging.getLogger("django_warpmesh")

_KEY_SALT = "django_warpmesh.mesh.frame-key"


def frame_key(config: MeshSettings) -> bytes:
    """The HMAC key of every frame: from ``WARPMESH['SECRET']``, else from ``SECRET_KEY``."""
    secret = config.secret if config.secret is not None else settings.SECRET_KEY
    return salted_hmac(_KEY_SALT, "v1", secret=secret, algorithm="sha256").digest()


class StaticRegistry:
    """``WARPMESH['PEERS']``: a fixed list, no database at all."""

    def __init__(self, addresses: Iterable[str]) -> None:
        self.addresses = tuple(addresses)
        self.description = f"static PEERS ({len(self.addresses)})"

    def initial(self) -> list[str] | None:
        return list(self.addresses)

    def sync(self, node: mesh_node.MeshNode) -> Iterable[str] | None:
        return None

    def leave(self, node: mesh_node.MeshNode) -> None:
        pass


def build_node(*, observer: bool = False) -> mesh_node.MeshNode | mesh_node.NullNode:
    config = get_settings()
    if not config.enabled:
        return _alone("disabled by WARPMESH['ENABLED']")
    registry: mesh_node.PeerRegistry
    if config.peers:
        registry = StaticRegistry(config.peers)
    elif apps.is_installed("django_warpmesh"):
        from django_warpmesh.discovery import DatabaseRegistry

        registry = DatabaseRegistry(config)
    else:
        return _alone(
            "no WARPMESH['PEERS'] and 'django_warpmesh' is not in INSTALLED_APPS, "
            "so there is no way to find peers"
        )
    return mesh_node.MeshNode(config, frame_key(config), registry, observer=observer)


def _alone(reason: str) -> mesh_node.NullNode:
    logger.info("mesh: caching locally only: %s", reason)
    return mesh_node.NullNode(reason)
