"""What a node is configured with: :class:`MeshSettings`, one field per ``WARPMESH`` option.

Django-free: :mod:`django_warpmesh.conf` reads the ``WARPMESH`` setting (and ``WARPMESH_*``
variables) into it, through the parser each field names in its metadata (:mod:`.options`), and
turns their errors into ``ImproperlyConfigured``; the node only reads it. The option of a field
is its name in upper case.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from django_warpmesh.node import options
from django_warpmesh.node.addresses import (
    DEFAULT_PORT,
    AddressError,
    advertised_address,
    format_address,
    parse_address,
    reply_address,
    validate_host,
)
from django_warpmesh.node.options import SettingError, TLSSettings

__all__ = [
    "DEFAULT_PORT",
    "AddressError",
    "MeshSettings",
    "SettingError",
    "TLSSettings",
    "advertised_address",
    "format_address",
    "option",
    "parse_address",
    "reply_address",
    "validate_host",
]


def option(default: Any, parse: options.Parser, *, env: bool = True, repr: bool = True) -> Any:
    """A field of :class:`MeshSettings`: its default, its parser, whether ``WARPMESH_<NAME>``
    may set it."""
    return dataclasses.field(default=default, repr=repr, metadata={"parse": parse, "env": env})


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    enabled: bool = option(True, options.as_bool)
    bind: str = option("0.0.0.0", options.as_host)
    port: int = option(DEFAULT_PORT, options.as_port)
    port_range: int = option(64, options.as_bounded_int(1, 1024))
    advertise: str | None = option(None, options.as_optional_address)
    peers: tuple[str, ...] = option((), options.as_peers)
    # A file of addresses, one per line, re-read every DISCOVERY_INTERVAL (a mounted ConfigMap).
    peers_file: str | None = option(None, options.as_optional_str)
    # How peers are found: "database", "static" or "mdns"; None: static if PEERS or PEERS_FILE
    # is set, else the database.
    discovery: str | None = option(None, options.as_discovery)
    # The interfaces mDNS discovery announces and browses on (names or addresses); (): all.
    mdns_interfaces: tuple[str, ...] = option((), options.as_interfaces)
    heartbeat: float = option(1.0, options.as_positive_seconds)
    secret: str | None = option(None, options.as_optional_str, repr=False)
    startup_wait: float | None = option(None, options.as_optional_seconds)
    queue_size: int = option(100_000, options.as_bounded_int(16))
    # nng's Bus0 refuses buffers of more than 8192 messages (the node would not start).
    buffer_size: int = option(4096, options.as_bounded_int(16, 8192))
    max_frame_bytes: int = option(4096, options.as_bounded_int(4096, 64 * 1024 * 1024))
    discovery_interval: float = option(5.0, options.as_seconds)
    stale_after: float = option(30.0, options.as_seconds)
    database: str | None = option(None, options.as_optional_str)
    degraded_timeout: float | None = option(5.0, options.as_optional_seconds)
    drain_on_read: bool = option(True, options.as_bool)
    orm: bool = option(True, options.as_bool)
    orm_include: tuple[str, ...] = option((), options.as_model_labels)
    orm_exclude: tuple[str, ...] = option((), options.as_model_labels)
    tls: TLSSettings | None = option(None, options.as_tls, env=False)  # a dict of paths
    # "nng" (peer to peer), or a broker: a nats:// URL, "postgresql" or a postgresql:// URL.
    transport: str = option("nng", options.as_transport)

    @property
    def effective_startup_wait(self) -> float:
        """How long a starting node waits for known peers before it caches anyway."""
        if self.startup_wait is not None:
            return self.startup_wait
        return 3 * self.heartbeat

    @property
    def discovery_mode(self) -> str | None:
        """How peers are found: ``"database"``, ``"static"`` or ``"mdns"``; None with a broker
        transport, where nobody is dialled."""
        if self.broker is not None:
            return None
        if self.discovery is not None:
            return self.discovery
        return "static" if self.peers or self.peers_file else "database"

    @property
    def discovery_enabled(self) -> bool:
        """Whether peers are found through the peer table."""
        return self.enabled and self.discovery_mode == "database"

    @property
    def broker(self) -> str | None:
        """The broker transport's kind (``"nats"``, ``"postgresql"``), or None for nng."""
        if self.transport == "nng":
            return None
        return "postgresql" if self.transport.startswith("postgres") else "nats"
