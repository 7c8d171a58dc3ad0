"""The ``WARPMESH`` setting: one dict, parsed once into a frozen dataclass and validated.

Every option may also come from an environment variable ``WARPMESH_<NAME>``, which wins over the
dict, so that a container can set ``WARPMESH_ADVERTISE`` from its pod IP without a code change.
The parsed value is cached and dropped on Django's ``setting_changed`` so ``override_settings``
works in tests.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

from django_warpmesh.node import config
from django_warpmesh.node.config import DEFAULT_PORT, MeshSettings, TLSSettings, format_address
from django_warpmesh.node.transports.postgresql import MAX_FRAME_BYTES as POSTGRESQL_MAX_FRAME_BYTES

__all__ = [
    "DEFAULT_PORT",
    "ENV_OPTIONS",
    "OPTIONS",
    "MeshSettings",
    "TLSSettings",
    "format_address",
    "get_settings",
    "parse",
    "parse_address",
    "reload",
    "running_migration_command",
]


def _as_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
    raise ImproperlyConfigured(f"WARPMESH['{name}'] must be a boolean, got {value!r}.")


def _as_int(name: str, value: object, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise ImproperlyConfigured(f"WARPMESH['{name}'] must be an integer, got {value!r}.")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ImproperlyConfigured(f"WARPMESH['{name}'] must be {bounds}, got {value}.")
    return value


def _as_seconds(name: str, value: object, *, minimum: float = 0.0) -> float:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value.strip())
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ImproperlyConfigured(
            f"WARPMESH['{name}'] must be a number of seconds, got {value!r}."
        )
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not (seconds > minimum and math.isfinite(seconds)):
        raise ImproperlyConfigured(f"WARPMESH['{name}'] must be > {minimum}, got {value}.")
    return seconds


def _as_optional_seconds(name: str, value: object) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in {"", "none"}):
        return None
    return _as_seconds(name, value)


def _as_str(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ImproperlyConfigured(f"WARPMESH['{name}'] must be a non-empty string, got {value!r}.")
    return value.strip()


def _as_optional_str(name: str, value: object) -> str | None:
    if value is None or value == "":
        return None
    return _as_str(name, value)


def _as_host(name: str, value: object) -> str:
    host = _as_str(name, value)
    _validate_host(name, host)
    return host


def _validate_host(name: str, host: str) -> None:
    try:
        config.validate_host(name, host)
    except config.AddressError as exc:
        raise ImproperlyConfigured(str(exc)) from None


def parse_address(name: str, value: object) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) and validate both halves."""
    try:
        return config.parse_address(name, value)
    except config.AddressError as exc:
        raise ImproperlyConfigured(str(exc)) from None


def _as_address(name: str, value: object) -> str:
    return format_address(*parse_address(name, value))


def _as_peers(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple):
        raise ImproperlyConfigured(f"WARPMESH['{name}'] must be a list of 'host:port' strings.")
    return tuple(dict.fromkeys(_as_address(name, item) for item in value))


def _as_model_labels(name: str, value: object) -> tuple[str, ...]:
    """``"app_label"`` or ``"app_label.ModelName"`` entries (checked against the app registry
    later, by the ORM layer, which runs once apps are ready)."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple):
        raise ImproperlyConfigured(
            f"WARPMESH['{name}'] must be a list of 'app_label' or 'app_label.Model' strings."
        )
    labels = []
    for item in value:
        label = _as_str(name, item)
        parts = label.split(".")
        if len(parts) > 2 or not all(part.isidentifier() for part in parts):
            raise ImproperlyConfigured(
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


def _as_tls(name: str, value: object) -> TLSSettings | None:
    """``{"CERT": path, "KEY": path, "CA": path}`` (+ optional ``SERVER_NAME``), or None.

    The files must exist and be readable PEM. No error message ever shows what a file holds,
    nor the key file's path.
    """
    if value is None:
        return None
    keys = ", ".join(_TLS_KEYS)
    if not isinstance(value, Mapping):
        raise ImproperlyConfigured(
            f"WARPMESH['{name}'] must be a dict with the keys {keys} (SERVER_NAME optional), "
            f"got a {type(value).__name__}."
        )
    unknown = sorted(str(key) for key in value if key not in _TLS_KEYS)
    if unknown:
        raise ImproperlyConfigured(
            f"Unknown WARPMESH['{name}'] key(s): {', '.join(unknown)}. Known: {keys}."
        )
    paths = {key: _tls_file(name, key, value.get(key)) for key in _TLS_FILES}
    server_name = value.get("SERVER_NAME")
    if server_name is not None:
        # Named in errors as WARPMESH['TLS']['SERVER_NAME'].
        server_name = _as_host(f"{name}']['SERVER_NAME", server_name)
    return TLSSettings(
        cert=paths["CERT"], key=paths["KEY"], ca=paths["CA"], server_name=server_name
    )


def _tls_file(name: str, key: str, value: object) -> str:
    label = f"WARPMESH['{name}']['{key}']"
    if value is None:
        raise ImproperlyConfigured(f"{label} is required: the path of {_TLS_FILES[key][0]}.")
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise ImproperlyConfigured(f"{label} must be a file path (a non-empty string).")
    path = value.strip()
    shown = "the file" if key == "KEY" else repr(path)
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ImproperlyConfigured(f"{label}: cannot read {shown} ({reason}).")
    what, marker = _TLS_FILES[key]
    if marker not in data:
        raise ImproperlyConfigured(f"{label}: {shown} does not hold {what}.")
    if key == "KEY" and b"ENCRYPTED" in data:
        raise ImproperlyConfigured(
            f"{label}: the key is encrypted; give an unencrypted PEM key "
            "(and protect it with file permissions)."
        )
    return path


def _as_transport(name: str, value: object) -> str:
    """``"nng"`` (the peer-to-peer mesh), ``"nats://host:port"`` (several: comma-separated;
    ``tls://`` for TLS), ``"postgresql"`` (the peer table's database: ``DATABASE``, else
    ``default``) or a ``postgresql://`` URL."""
    text = _as_str(name, value)
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
    raise ImproperlyConfigured(
        f"WARPMESH['{name}'] must be 'nng', 'postgresql', a nats://host:port URL or a "
        f"postgresql:// URL, got {shown!r}."
    )


def _nats_server(name: str, server: str) -> None:
    location = server.strip().removeprefix("nats://").removeprefix("tls://")
    location = location.rpartition("@")[2]  # credentials are nats-py's business
    if ":" not in location.rpartition("]")[2]:
        location = f"{location}:4222"
    parse_address(name, location)


_PARSERS: dict[str, tuple[str, Callable[[str, object], Any]]] = {
    "ENABLED": ("enabled", _as_bool),
    "BIND": ("bind", _as_host),
    "PORT": ("port", lambda n, v: _as_int(n, v, minimum=0, maximum=65535)),
    "PORT_RANGE": ("port_range", lambda n, v: _as_int(n, v, minimum=1, maximum=1024)),
    "ADVERTISE": ("advertise", lambda n, v: None if v in (None, "") else _as_address(n, v)),
    "PEERS": ("peers", _as_peers),
    "HEARTBEAT": ("heartbeat", lambda n, v: _as_seconds(n, v, minimum=0.0)),
    "SECRET": ("secret", _as_optional_str),
    "STARTUP_WAIT": ("startup_wait", _as_optional_seconds),
    "QUEUE_SIZE": ("queue_size", lambda n, v: _as_int(n, v, minimum=16)),
    # nng's Bus0 refuses buffers of more than 8192 messages (the node would not start).
    "BUFFER_SIZE": ("buffer_size", lambda n, v: _as_int(n, v, minimum=16, maximum=8192)),
    "MAX_FRAME_BYTES": (
        "max_frame_bytes",
        lambda n, v: _as_int(n, v, minimum=4096, maximum=64 * 1024 * 1024),
    ),
    "DISCOVERY_INTERVAL": ("discovery_interval", _as_seconds),
    "STALE_AFTER": ("stale_after", _as_seconds),
    "DATABASE": ("database", _as_optional_str),
    "DEGRADED_TIMEOUT": ("degraded_timeout", _as_optional_seconds),
    "DRAIN_ON_READ": ("drain_on_read", _as_bool),
    "ORM": ("orm", _as_bool),
    "ORM_INCLUDE": ("orm_include", _as_model_labels),
    "ORM_EXCLUDE": ("orm_exclude", _as_model_labels),
    "TLS": ("tls", _as_tls),
    "TRANSPORT": ("transport", _as_transport),
}

OPTIONS = tuple(_PARSERS)
# Every option but TLS (a dict of paths) can also come from ``WARPMESH_<NAME>``.
ENV_OPTIONS = tuple(name for name in OPTIONS if name != "TLS")


def parse(raw: object, environ: Mapping[str, str] | None = None) -> MeshSettings:
    """Build :class:`MeshSettings` from the ``WARPMESH`` dict and ``WARPMESH_*`` variables."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ImproperlyConfigured("settings.WARPMESH must be a dict.")
    unknown = sorted(str(key) for key in raw if key not in _PARSERS)
    if unknown:
        raise ImproperlyConfigured(
            f"Unknown WARPMESH key(s): {', '.join(unknown)}. Known: {', '.join(_PARSERS)}."
        )
    environ = os.environ if environ is None else environ
    merged: dict[str, object] = dict(raw)
    from_env: set[str] = set()
    for name in ENV_OPTIONS:
        env_value = environ.get(f"WARPMESH_{name}")
        if env_value is not None:
            merged[name] = env_value
            from_env.add(name)
    values: dict[str, Any] = {}
    for name, (field, parser) in _PARSERS.items():
        if name not in merged:
            continue
        try:
            values[field] = parser(name, merged[name])
        except ImproperlyConfigured as exc:
            if name not in from_env:
                raise
            raise ImproperlyConfigured(
                f"{exc} (from the environment variable WARPMESH_{name})"
            ) from None
    parsed = MeshSettings(**values)
    if parsed.broker == "postgresql" and parsed.max_frame_bytes > POSTGRESQL_MAX_FRAME_BYTES:
        raise ImproperlyConfigured(
            f"WARPMESH['MAX_FRAME_BYTES'] is {parsed.max_frame_bytes}, but a PostgreSQL "
            f"notification carries frames of at most {POSTGRESQL_MAX_FRAME_BYTES} bytes "
            "(WARPMESH['TRANSPORT'] is PostgreSQL)."
        )
    if parsed.stale_after <= parsed.discovery_interval:
        raise ImproperlyConfigured(
            "WARPMESH['STALE_AFTER'] must be longer than WARPMESH['DISCOVERY_INTERVAL'], "
            "or live peers would be removed as stale."
        )
    return parsed


_MIGRATION_COMMANDS = frozenset(
    {
        "makemigrations",
        "migrate",
        "optimizemigration",
        "showmigrations",
        "sqlmigrate",
        "squashmigrations",
    }
)


def running_migration_command() -> bool:
    """Whether this process is ``manage.py <a migration command>``: the peer table may not
    exist yet, and that is expected rather than worth a check error or a warning."""
    return len(sys.argv) > 1 and sys.argv[1] in _MIGRATION_COMMANDS


@lru_cache(maxsize=1)
def get_settings() -> MeshSettings:
    return parse(getattr(settings, "WARPMESH", None))


def reload(**kwargs: object) -> None:
    """Receiver for ``setting_changed``: forget the parsed value when WARPMESH changes."""
    if kwargs.get("setting") in {"WARPMESH", "SECRET_KEY"}:
        get_settings.cache_clear()


setting_changed.connect(reload, dispatch_uid="django_warpmesh.conf.reload")
