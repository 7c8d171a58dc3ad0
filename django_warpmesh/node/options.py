"""How each ``WARPMESH`` option is read from what a user wrote: one parser per option.

Django-free, like the rest of the node: a bad value raises :class:`SettingError` naming the
option (:mod:`django_warpmesh.conf` turns it into ``ImproperlyConfigured``). Each parser is
named in its field's metadata in :class:`~.config.MeshSettings`, so an option is written once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from django_warpmesh.node.addresses import (
    AddressError,
    format_address,
    parse_address,
    validate_host,
)


class SettingError(ValueError):
    """A ``WARPMESH`` value that cannot be used; the message names the option."""


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


def as_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
    raise SettingError(f"WARPMESH['{name}'] must be a boolean, got {value!r}.")


def as_int(name: str, value: object, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingError(f"WARPMESH['{name}'] must be an integer, got {value!r}.")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise SettingError(f"WARPMESH['{name}'] must be {bounds}, got {value}.")
    return value


def as_seconds(name: str, value: object, *, minimum: float = 0.0) -> float:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value.strip())
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SettingError(f"WARPMESH['{name}'] must be a number of seconds, got {value!r}.")
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not (seconds > minimum and math.isfinite(seconds)):
        raise SettingError(f"WARPMESH['{name}'] must be > {minimum}, got {value}.")
    return seconds


def as_optional_seconds(name: str, value: object) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in {"", "none"}):
        return None
    return as_seconds(name, value)


def as_str(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SettingError(f"WARPMESH['{name}'] must be a non-empty string, got {value!r}.")
    return value.strip()


def as_optional_str(name: str, value: object) -> str | None:
    if value is None or value == "":
        return None
    return as_str(name, value)


def as_host(name: str, value: object) -> str:
    host = as_str(name, value)
    try:
        validate_host(name, host)
    except AddressError as exc:
        raise SettingError(str(exc)) from None
    return host


def as_address(name: str, value: object) -> str:
    try:
        return format_address(*parse_address(name, value))
    except AddressError as exc:
        raise SettingError(str(exc)) from None


def as_peers(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple):
        raise SettingError(f"WARPMESH['{name}'] must be a list of 'host:port' strings.")
    return tuple(dict.fromkeys(as_address(name, item) for item in value))


DISCOVERY_MODES = ("database", "static", "mdns")


def as_discovery(name: str, value: object) -> str | None:
    if value is None or value == "":
        return None
    mode = as_str(name, value).lower()
    if mode not in DISCOVERY_MODES:
        raise SettingError(
            f"WARPMESH['{name}'] must be one of {', '.join(map(repr, DISCOVERY_MODES))} "
            f"(or None: the peer table, unless PEERS or PEERS_FILE is set), got {value!r}."
        )
    return mode


def as_interfaces(name: str, value: object) -> tuple[str, ...]:
    """Network interfaces by name (``"eth0"``) or address (``"10.0.0.5"``)."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple):
        raise SettingError(f"WARPMESH['{name}'] must be a list of interface names or addresses.")
    interfaces = []
    for item in value:
        interface = as_str(name, item)
        if not re.fullmatch(r"[A-Za-z0-9_.:%@-]{1,64}", interface):
            raise SettingError(
                f"WARPMESH['{name}']: {interface!r} is not an interface name or address."
            )
        interfaces.append(interface)
    return tuple(dict.fromkeys(interfaces))


def as_model_labels(name: str, value: object) -> tuple[str, ...]:
    """``"app_label"`` or ``"app_label.ModelName"`` entries (checked against the app registry
    later, by the ORM layer, which runs once apps are ready)."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple):
        raise SettingError(
            f"WARPMESH['{name}'] must be a list of 'app_label' or 'app_label.Model' strings."
        )
    labels = []
    for item in value:
        label = as_str(name, item)
        parts = label.split(".")
        if len(parts) > 2 or not all(part.isidentifier() for part in parts):
            raise SettingError(
                f"WARPMESH['{name}']: {label!r} is not 'app_label' or 'app_label.Model'."
            )
        labels.append(label)
    return tuple(labels)


_TLS_FILES = {
    # key: (what the file must hold, a line that shows it does)
    "CERT": ("a PEM certificate", b"-----BEGIN CERTIFICATE-----"),
    "KEY": ("a PEM private key", b"PRIVATE KEY-----"),
    "CA": ("PEM CA certificate(s)", b"-----BEGIN CERTIFICATE-----"),
}
_TLS_KEYS = (*_TLS_FILES, "SERVER_NAME")


def as_tls(name: str, value: object) -> TLSSettings | None:
    """``{"CERT": path, "KEY": path, "CA": path}`` (+ optional ``SERVER_NAME``), or None.

    The files must exist and be readable PEM. No error message ever shows what a file holds,
    nor the key file's path.
    """
    if value is None:
        return None
    keys = ", ".join(_TLS_KEYS)
    if not isinstance(value, Mapping):
        raise SettingError(
            f"WARPMESH['{name}'] must be a dict with the keys {keys} (SERVER_NAME optional), "
            f"got a {type(value).__name__}."
        )
    unknown = sorted(str(key) for key in value if key not in _TLS_KEYS)
    if unknown:
        raise SettingError(
            f"Unknown WARPMESH['{name}'] key(s): {', '.join(unknown)}. Known: {keys}."
        )
    paths = {key: _tls_file(name, key, value.get(key)) for key in _TLS_FILES}
    server_name = value.get("SERVER_NAME")
    if server_name is not None:
        # Named in errors as WARPMESH['TLS']['SERVER_NAME'].
        server_name = as_host(f"{name}']['SERVER_NAME", server_name)
    return TLSSettings(
        cert=paths["CERT"], key=paths["KEY"], ca=paths["CA"], server_name=server_name
    )


def _tls_file(name: str, key: str, value: object) -> str:
    label = f"WARPMESH['{name}']['{key}']"
    if value is None:
        raise SettingError(f"{label} is required: the path of {_TLS_FILES[key][0]}.")
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise SettingError(f"{label} must be a file path (a non-empty string).")
    path = value.strip()
    shown = "the file" if key == "KEY" else repr(path)
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SettingError(f"{label}: cannot read {shown} ({reason}).")
    what, marker = _TLS_FILES[key]
    if marker not in data:
        raise SettingError(f"{label}: {shown} does not hold {what}.")
    if key == "KEY" and b"ENCRYPTED" in data:
        raise SettingError(
            f"{label}: the key is encrypted; give an unencrypted PEM key "
            "(and protect it with file permissions)."
        )
    return path


def as_transport(name: str, value: object) -> str:
    """``"nng"`` (the peer-to-peer mesh), ``"nats://host:port"`` (several: comma-separated;
    ``tls://`` for TLS), ``"postgresql"`` (the peer table's database: ``DATABASE``, else
    ``default``) or a ``postgresql://`` URL."""
    text = as_str(name, value)
    lowered = text.lower()
    if lowered in {"nng", "postgresql", "postgres"}:
        return "postgresql" if lowered == "postgres" else lowered
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if sep and rest.strip() and scheme in {"nats", "tls"}:
        for server in rest.split(","):
            _nats_server(name, server)
        return text
    if sep and rest.strip() and scheme in {"postgresql", "postgres"}:
        return text
    shown = re.sub(r"(//[^/@:]*):[^/@]*@", r"\1:***@", text)  # never a password in a log
    raise SettingError(
        f"WARPMESH['{name}'] must be 'nng', 'postgresql', a nats://host:port URL or a "
        f"postgresql:// URL, got {shown!r}."
    )


def _nats_server(name: str, server: str) -> None:
    location = server.strip().removeprefix("nats://").removeprefix("tls://")
    location = location.rpartition("@")[2]  # credentials are nats-py's business
    if ":" not in location.rpartition("]")[2]:
        location = f"{location}:4222"
    as_address(name, location)


def as_port(name: str, value: object) -> int:
    return as_int(name, value, minimum=0, maximum=65535)


def as_positive_seconds(name: str, value: object) -> float:
    return as_seconds(name, value, minimum=0.0)


def as_optional_address(name: str, value: object) -> str | None:
    return None if value in (None, "") else as_address(name, value)


def as_bounded_int(minimum: int, maximum: int | None = None) -> Parser:
    """A parser of integers in ``minimum..maximum``."""
    return lambda name, value: as_int(name, value, minimum=minimum, maximum=maximum)


Parser = Callable[[str, object], Any]
