"""Build this process's mesh node from the Django settings.

The node package knows nothing of Django; this module is the seam: it reads ``WARPMESH``, derives
the HMAC key, and picks where peers come from (``DISCOVERY``: the peer table, the static ``PEERS``
and ``PEERS_FILE``, or mDNS).
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit, urlunsplit

from django.apps import apps
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from django.utils.crypto import salted_hmac

from django_warpmesh import node as mesh_node
from django_warpmesh.conf import MeshSettings, get_settings
from django_warpmesh.node.resolver import listening_family
from django_warpmesh.node.static import StaticRegistry
from django_warpmesh.node.transports import BrokerTransport, TransportError, channel_name

logger = logging.getLogger("django_warpmesh")

_KEY_SALT = "django_warpmesh.mesh.frame-key"  # unchanged since 0.1: the key every node derives


def frame_key(config: MeshSettings) -> bytes:
    """The HMAC key of every frame: from ``WARPMESH['SECRET']``, else from ``SECRET_KEY``."""
    secret = config.secret if config.secret is not None else settings.SECRET_KEY
    return salted_hmac(_KEY_SALT, "v1", secret=secret, algorithm="sha256").digest()


class BrokerRegistry:
    """A broker ``TRANSPORT``: every process subscribed hears every frame, nobody is dialled."""

    description = "no discovery: every process subscribed to the broker"
    rejected = 0

    def initial(self) -> mesh_node.Discovered | None:
        return {}

    def sync(self, node: mesh_node.MeshNode) -> mesh_node.Discovered | None:
        return None

    def leave(self, node: mesh_node.MeshNode) -> None:
        pass


def build_broker(config: MeshSettings, key: bytes) -> BrokerTransport:
    """The broker transport ``WARPMESH['TRANSPORT']`` names, on a channel of this mesh's key.

    Raises :class:`TransportError` (a missing extra, a database that is not PostgreSQL).
    """
    channel = channel_name(key)
    if config.broker == "nats":
        from django_warpmesh.node.transports.nats import NatsTransport

        return NatsTransport(config.transport, channel, inbox_capacity=config.buffer_size)
    from django_warpmesh.node.transports.postgresql import PostgresTransport

    conninfo, shown = postgres_conninfo(config)
    return PostgresTransport(
        conninfo, channel, inbox_capacity=config.buffer_size, display_url=shown
    )


def postgres_conninfo(config: MeshSettings) -> tuple[str, str]:
    """libpq's connection string for the PostgreSQL transport, and the URL shown (no password):
    the URL given, or the connection settings of the peer table's database."""
    if config.transport != "postgresql":
        parts = urlsplit(config.transport)
        netloc = parts.netloc.rpartition("@")
        user = netloc[0].partition(":")[0]
        shown = urlunsplit(
            (parts.scheme, f"{user}@{netloc[2]}" if user else netloc[2], parts.path, "", "")
        )
        return config.transport, shown
    alias = config.database or DEFAULT_DB_ALIAS
    if alias not in connections:
        raise TransportError(
            f"WARPMESH['TRANSPORT'] is 'postgresql' but the database {alias!r} is not in DATABASES"
        )
    connection = connections[alias]
    if connection.vendor != "postgresql":
        raise TransportError(
            f"WARPMESH['TRANSPORT'] is 'postgresql' but the database {alias!r} is "
            f"{connection.vendor}; name a postgresql:// URL instead"
        )
    from psycopg.conninfo import make_conninfo

    params = {
        name: value
        for name, value in connection.get_connection_params().items()
        if isinstance(value, str | int) and not isinstance(value, bool) and name in _LIBPQ_KEYS
    }
    host, port = params.get("host", "localhost"), params.get("port", 5432)
    shown = f"postgresql://{params.get('user', '')}@{host}:{port}/{params.get('dbname', '')}"
    return make_conninfo("", **params), shown


# What Django's PostgreSQL backend passes to psycopg that libpq also takes (not cursor
# factories and the like, which are psycopg's).
_LIBPQ_KEYS = frozenset(
    {
        "dbname",
        "user",
        "password",
        "host",
        "hostaddr",
        "port",
        "passfile",
        "service",
        "sslmode",
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslcrl",
        "sslpassword",
        "options",
        "connect_timeout",
        "target_session_attrs",
        "gssencmode",
        "krbsrvname",
        "channel_binding",
        "requiressl",
    }
)


def build_node(*, observer: bool = False) -> mesh_node.MeshNode | mesh_node.NullNode:
    config = get_settings()
    if not config.enabled:
        return _alone("disabled by WARPMESH['ENABLED']")
    registry: mesh_node.PeerRegistry
    if config.broker is not None:
        # A TransportError here (a missing extra, a database that is not PostgreSQL) leaves
        # the process caching alone, capped, with an ERROR line (see node.process).
        key = frame_key(config)
        broker = build_broker(config, key)
        registry = BrokerRegistry()
        return mesh_node.MeshNode(config, key, registry, observer=observer, broker=broker)
    if config.discovery_mode == "static":
        registry = StaticRegistry(
            config.peers,
            config.peers_file,
            interval=config.discovery_interval,
            family=listening_family(config.bind),
        )
    elif config.discovery_mode == "mdns":
        from django_warpmesh.node.mdns import MdnsRegistry

        registry = MdnsRegistry(config, frame_key(config))
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
