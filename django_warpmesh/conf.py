"""The ``WARPMESH`` setting: one dict, parsed once into a frozen dataclass and validated.

Every option may also come from an environment variable ``WARPMESH_<NAME>``, which wins over the
dict, so that a container can set ``WARPMESH_ADVERTISE`` from its pod IP without a code change.
Each option is a field of :class:`MeshSettings` whose metadata names its parser (see
:mod:`django_warpmesh.node.options`). The parsed value is cached and dropped on Django's
``setting_changed``, so ``override_settings`` works in tests. The dashboard's
``WARPMESH_DASHBOARD_PERMISSION`` (a setting of its own, read per request) is resolved here too.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.http import HttpRequest
from django.utils.module_loading import import_string

from django_warpmesh.node.addresses import AddressError
from django_warpmesh.node.addresses import parse_address as _parse_address
from django_warpmesh.node.config import DEFAULT_PORT, MeshSettings, TLSSettings, format_address
from django_warpmesh.node.options import SettingError
from django_warpmesh.node.transports.postgresql import MAX_FRAME_BYTES as POSTGRESQL_MAX_FRAME_BYTES

__all__ = [
    "DEFAULT_PORT",
    "ENV_OPTIONS",
    "OPTIONS",
    "PERMISSION_SETTING",
    "MeshSettings",
    "TLSSettings",
    "dashboard_permission",
    "format_address",
    "get_settings",
    "parse",
    "parse_address",
    "reload",
    "resolve_permission",
    "running_migration_command",
]

_FIELDS = {field.name.upper(): field for field in dataclasses.fields(MeshSettings)}
OPTIONS = tuple(_FIELDS)
# Every option but TLS (a dict of paths) can also come from ``WARPMESH_<NAME>``.
ENV_OPTIONS = tuple(name for name, field in _FIELDS.items() if field.metadata["env"])


def parse_address(name: str, value: object) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) and validate both halves."""
    try:
        return _parse_address(name, value)
    except AddressError as exc:
        raise ImproperlyConfigured(str(exc)) from None


def parse(raw: object, environ: Mapping[str, str] | None = None) -> MeshSettings:
    """Build :class:`MeshSettings` from the ``WARPMESH`` dict and ``WARPMESH_*`` variables."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ImproperlyConfigured("settings.WARPMESH must be a dict.")
    unknown = sorted(str(key) for key in raw if key not in _FIELDS)
    if unknown:
        raise ImproperlyConfigured(
            f"Unknown WARPMESH key(s): {', '.join(unknown)}. Known: {', '.join(OPTIONS)}."
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
    for name, field in _FIELDS.items():
        if name not in merged:
            continue
        try:
            values[field.name] = field.metadata["parse"](name, merged[name])
        except SettingError as exc:
            where = f" (from the environment variable WARPMESH_{name})" if name in from_env else ""
            raise ImproperlyConfigured(f"{exc}{where}") from None
    parsed = MeshSettings(**values)
    if parsed.stale_after <= parsed.discovery_interval:
        raise ImproperlyConfigured(
            "WARPMESH['STALE_AFTER'] must be longer than WARPMESH['DISCOVERY_INTERVAL'], "
            "or live peers would be removed as stale."
        )
    if parsed.broker == "postgresql" and parsed.max_frame_bytes > POSTGRESQL_MAX_FRAME_BYTES:
        raise ImproperlyConfigured(
            f"WARPMESH['MAX_FRAME_BYTES'] is {parsed.max_frame_bytes}, but a PostgreSQL "
            f"notification carries frames of at most {POSTGRESQL_MAX_FRAME_BYTES} bytes "
            "(WARPMESH['TRANSPORT'] is PostgreSQL)."
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
    if kwargs.get("setting") == PERMISSION_SETTING:
        dashboard_permission.cache_clear()


# -- the dashboard's permission ---------------------------------------------------------------

PERMISSION_SETTING = "WARPMESH_DASHBOARD_PERMISSION"
DEFAULT_PERMISSION = "staff"

Permission = Callable[[HttpRequest], bool]


def _user(request: HttpRequest) -> Any:
    return getattr(request, "user", None)


def _is_staff(request: HttpRequest) -> bool:
    user = _user(request)
    return bool(user is not None and user.is_active and user.is_staff)


def _is_superuser(request: HttpRequest) -> bool:
    user = _user(request)
    return bool(user is not None and user.is_active and user.is_superuser)


def _is_authenticated(request: HttpRequest) -> bool:
    user = _user(request)
    return bool(user is not None and user.is_authenticated)


def _public(request: HttpRequest) -> bool:
    return True


KEYWORDS: dict[str, Permission] = {
    "staff": _is_staff,
    "superuser": _is_superuser,
    "authenticated": _is_authenticated,
    "public": _public,
}


def resolve_permission(value: object) -> Permission:
    """A keyword (staff, superuser, authenticated, public), a callable, or its dotted path."""
    if value is None:
        return KEYWORDS[DEFAULT_PERMISSION]
    if isinstance(value, str):
        if value in KEYWORDS:
            return KEYWORDS[value]
        if "." not in value:
            raise ImproperlyConfigured(
                f"{PERMISSION_SETTING}: {value!r} is not one of {', '.join(KEYWORDS)}, nor the "
                "dotted path of a function taking the request."
            )
        try:
            value = import_string(value)
        except ImportError as exc:
            raise ImproperlyConfigured(
                f"{PERMISSION_SETTING}: cannot import {value!r} ({exc})."
            ) from exc
    if not callable(value):
        raise ImproperlyConfigured(
            f"{PERMISSION_SETTING} must be one of {', '.join(KEYWORDS)}, a function taking the "
            f"request and returning a bool, or its dotted path; got {value!r}."
        )
    check: Permission = value
    return check


@lru_cache(maxsize=1)
def dashboard_permission() -> Permission:
    """Who may see the dashboard and the stats endpoint, unless a URL says otherwise."""
    return resolve_permission(getattr(settings, PERMISSION_SETTING, None))


def install() -> None:
    """Re-parse on ``setting_changed`` (``override_settings``). Idempotent; called when the
    cache layer is wired (:func:`django_warpmesh.cache.install`)."""
    setting_changed.connect(reload, dispatch_uid="django_warpmesh.conf.reload")
