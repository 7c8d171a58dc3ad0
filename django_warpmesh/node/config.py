"""What a node is configured with, and the ``host:port`` addresses it dials and advertises.

Django-free: :mod:`django_warpmesh.conf` parses the ``WARPMESH`` setting into
:class:`MeshSettings` (and turns an :class:`AddressError` into ``ImproperlyConfigured``); the node
only reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import socket

logger = logging.getLogger("django_warpmesh")

DEFAULT_PORT = 7934


class AddressError(ValueError):
    """A ``host:port`` address (or a host) that cannot be used; the message names the setting."""


@dataclasses.dataclass(frozen=True)
class TLSSettings:
    """``WARPMESH['TLS']``: PEM files for mutual TLS between peers.

    ``server_name``: the name every peer's certificate must carry; ``None``: the host of the
    address dialled (so certificates need that IP, or DNS name, in their subjectAltName).
    """

    cert: str
    key: str = dataclasses.field(repr=False)  # a path, but the path of a secret: not shown
    ca: str
    server_name: str | None = None


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    enabled: bool = True
    bind: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    port_range: int = 64
    advertise: str | None = None
    peers: tuple[str, ...] = ()
    heartbeat: float = 1.0
    secret: str | None = dataclasses.field(default=None, repr=False)
    startup_wait: float | None = None
    queue_size: int = 100_000
    buffer_size: int = 4096
    max_frame_bytes: int = 4096
    discovery_interval: float = 5.0
    stale_after: float = 30.0
    database: str | None = None
    degraded_timeout: float | None = 5.0
    drain_on_read: bool = True
    orm: bool = True
    orm_include: tuple[str, ...] = ()
    orm_exclude: tuple[str, ...] = ()
    tls: TLSSettings | None = None
    # "nng" (peer to peer), or a broker: a nats:// URL, "postgresql" or a postgresql:// URL.
    transport: str = "nng"

    @property
    def broker(self) -> str | None:
        """The broker transport's kind (``"nats"``, ``"postgresql"``), or None for nng."""
        if self.transport == "nng":
            return None
        return "postgresql" if self.transport.startswith("postgres") else "nats"

    @property
    def effective_startup_wait(self) -> float:
        """How long a starting node waits for known peers before it caches anyway."""
        if self.startup_wait is not None:
            return self.startup_wait
        return 3 * self.heartbeat

    @property
    def discovery_enabled(self) -> bool:
        """Whether peers are found through the peer table (not PEERS, nor a broker)."""
        return self.enabled and not self.peers and self.transport == "nng"


def validate_host(name: str, host: str) -> None:
    """An IP address or a DNS name; raises :class:`AddressError` naming ``WARPMESH[name]``."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        # A DNS name: letters, digits, dots and dashes, as RFC 1123 allows.
        labels = host.rstrip(".").split(".")
        if not all(
            label and len(label) <= 63 and label.replace("-", "").isalnum() for label in labels
        ):
            raise AddressError(f"WARPMESH['{name}']: {host!r} is not a host name or IP.")


def parse_address(name: str, value: object) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) and validate both halves."""
    if not isinstance(value, str) or not value.strip():
        raise AddressError(f"WARPMESH['{name}'] must be a non-empty string, got {value!r}.")
    text = value.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
        if ":" in host:
            raise AddressError(
                f"WARPMESH['{name}']: {text!r} is ambiguous; write an IPv6 host as [host]:port."
            )
    if not sep or not host:
        raise AddressError(f"WARPMESH['{name}']: {text!r} is not of the form host:port.")
    validate_host(name, host)
    return host, _port(name, port_text)


def _port(name: str, text: str) -> int:
    port: object = text
    with contextlib.suppress(ValueError):
        port = int(text.strip())
    if not isinstance(port, int):
        raise AddressError(f"WARPMESH['{name}'] must be an integer, got {text!r}.")
    if not 1 <= port <= 65535:
        raise AddressError(f"WARPMESH['{name}'] must be between 1 and 65535, got {port}.")
    return port


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def advertised_address(config: MeshSettings, port: int) -> str:
    """The address peers dial this node by: ADVERTISE, BIND, or this host's own address."""
    if config.advertise:
        host, advertised_port = parse_address("ADVERTISE", config.advertise)
        # ADVERTISE without the real port (PORT 0 or a range) would point peers elsewhere.
        if config.port == 0 or config.port_range > 1:
            advertised_port = port
        return format_address(host, advertised_port)
    return format_address(_default_host(config.bind), port)


def reply_address(config: MeshSettings, port: int) -> str:
    """Where an observer's stats replies come to: its host as a node would advertise it."""
    if config.advertise:
        host, _ = parse_address("ADVERTISE", config.advertise)
    else:
        host = _default_host(config.bind, warn=False)
    return format_address(host, port)


def _default_host(bind: str, *, warn: bool = True) -> str:
    if bind not in {"0.0.0.0", "::", ""}:
        return bind
    try:
        hostname = socket.gethostname()
        for family, *_, sockaddr in socket.getaddrinfo(hostname, None, socket.AF_INET):
            address = str(sockaddr[0])
            if family == socket.AF_INET and not address.startswith("127."):
                return address
    except OSError:
        pass
    if not warn:
        return "127.0.0.1"
    logger.warning(
        "mesh: no non-loopback address found for this host; advertising 127.0.0.1. "
        "Set WARPMESH['ADVERTISE'] (or WARPMESH_ADVERTISE) so other hosts can reach it."
    )
    return "127.0.0.1"
