"""``host:port`` addresses: the ones a node dials, the one it advertises, the one it listens on.

Django-free; errors name the ``WARPMESH`` option they came from.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from django_warpmesh.node.config import MeshSettings

logger = logging.getLogger("django_warpmesh")

DEFAULT_PORT = 7934


class AddressError(ValueError):
    """A ``host:port`` address (or a host) that cannot be used; the message names the setting."""


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
