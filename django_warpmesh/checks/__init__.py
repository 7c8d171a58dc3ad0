"""System checks (``warpmesh.E…`` / ``warpmesh.W…``); the list is in docs/operations.md.

Django runs an app's checks only when the app is installed, so the checks about the app *not*
being installed (E003, W004) can fire only where this module was imported some other way; where
it was not, the cache itself says at its first use that it caches locally only, and why.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import sys
from collections.abc import Mapping
from typing import Any

from django.apps import apps
from django.core.checks import CheckMessage, Error, Warning, register
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from django_warpmesh.checks.peers import (
    APP,
    MESH_CACHE,
    check_discovery,
    check_peer_source,
    check_peer_table,
    peer_database_problem,
)
from django_warpmesh.conf import MeshSettings, get_settings, running_migration_command
from django_warpmesh.node.transports import TransportError
from django_warpmesh.servers import prefork_server, uwsgi_threads_enabled


@register("warpmesh")
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:

    try:
        config = get_settings()
    except ImproperlyConfigured as exc:
        return [Error(str(exc), id="warpmesh.E001", hint="See docs/configuration.md.")]
    # `migrate` (and `check --database`) pass the databases they are about to touch: there the
    # table may legitimately not exist yet, and `migrate` is what creates it. The other
    # migration commands must work on a fresh project too.
    if (
        kwargs.get("databases") is None
        and not running_migration_command()
        and config.discovery_enabled
        and apps.is_installed(APP)
        and peer_database_problem(config) is None
    ):
        return check_peer_table(config)
    return []


@register("warpmesh")
def check_deployment(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """How this instance will join the mesh: peers, secret, ports. Silent when disabled."""

    try:
        config = get_settings()
    except ImproperlyConfigured:
        return []  # warpmesh.E001 says why.
    installed = apps.is_installed(APP)
    mesh_caches = mesh_cache_aliases()
    if not mesh_caches:
        if installed:
            return [
                Warning(
                    f"'{APP}' is installed but no cache in CACHES uses {MESH_CACHE}, so "
                    "nothing is kept coherent across instances.",
                    id="warpmesh.W005",
                    hint=f"Set 'BACKEND': '{MESH_CACHE}' for the caches to keep coherent.",
                )
            ]
        return []
    if not config.enabled:
        return []
    messages: list[CheckMessage] = []
    if config.broker is None:
        messages += check_discovery(config)
        messages += check_peer_source(config, installed, mesh_caches)
        messages += _check_clear_text(config)
        messages += _check_prefork(config, os.environ)
    else:
        messages += _check_broker(config)
    messages += _check_secret(config)
    messages += _check_uwsgi_threads()
    return messages


def _check_broker(config: MeshSettings) -> list[CheckMessage]:
    """A broker TRANSPORT that cannot work here, and the settings it makes pointless."""
    from django_warpmesh.node_factory import postgres_conninfo

    extra = {"nats": "nats", "postgresql": "psycopg"}[config.broker or ""]
    messages: list[CheckMessage] = []
    problem = None
    if importlib.util.find_spec(extra) is None:
        problem = f"the {extra} package is not installed"
        hint = f"pip install 'django-warpmesh[{config.broker}]'"
    elif config.broker == "postgresql":
        try:
            postgres_conninfo(config)
        except TransportError as exc:
            problem = str(exc)
            hint = "Set WARPMESH['TRANSPORT'] to a postgresql:// URL, or 'nng'."
    if problem is not None:
        messages.append(
            Error(
                f"WARPMESH['TRANSPORT'] cannot be used: {problem}. Every instance would cache "
                "alone (capped at DEGRADED_TIMEOUT).",
                id="warpmesh.E006",
                hint=hint,
            )
        )
    ignored = [
        name
        for name, value in (
            ("PEERS", config.peers),
            ("PEERS_FILE", config.peers_file),
            ("DISCOVERY", config.discovery),
            ("MDNS_INTERFACES", config.mdns_interfaces),
            ("TLS", config.tls),
        )
        if value
    ]
    if ignored:
        messages.append(
            Warning(
                f"WARPMESH[{', '.join(repr(name) for name in ignored)}] has no effect with a "
                "broker TRANSPORT: every instance reaches the others through the broker.",
                id="warpmesh.W009",
                hint="Remove it, or set WARPMESH['TRANSPORT'] to 'nng'. The broker's own URL "
                "says how to reach it securely (tls:// for NATS, sslmode for PostgreSQL).",
            )
        )
    return messages


def mesh_cache_aliases() -> list[str]:
    """The aliases in CACHES whose backend is MeshCache (or a subclass of it)."""
    from django.conf import settings

    aliases = []
    for alias, options in getattr(settings, "CACHES", {}).items():
        backend = options.get("BACKEND", "") if isinstance(options, Mapping) else ""
        if backend == MESH_CACHE:
            aliases.append(alias)
            continue
        if not isinstance(backend, str) or not backend:
            continue
        try:
            backend_class = import_string(backend)
            from django_warpmesh.cache import MeshCache

            if isinstance(backend_class, type) and issubclass(backend_class, MeshCache):
                aliases.append(alias)
        except ImportError:
            continue  # Django's own cache checks report a backend that does not import.
    return aliases


def _check_secret(config: MeshSettings) -> list[CheckMessage]:
    from django.conf import settings

    if settings.DEBUG:
        return []
    if config.secret is not None:
        secret, source = config.secret, "WARPMESH['SECRET']"
    else:
        try:
            secret = str(settings.SECRET_KEY)
        except ImproperlyConfigured:  # Django refuses an empty SECRET_KEY.
            secret = ""
        source = "SECRET_KEY (WARPMESH['SECRET'] is not set)"
    if secret and not secret.startswith("django-insecure-"):
        return []
    return [
        Warning(
            f"The mesh frames are signed with a key derived from {source}, which is "
            f"{'empty' if not secret else 'the insecure development key'}, and DEBUG is False. "
            "Anyone who knows it can forge invalidations and read the mesh statistics.",
            id="warpmesh.W002",
            hint="Set a long random WARPMESH['SECRET'] (or WARPMESH_SECRET), the same on "
            "every instance, or a production SECRET_KEY.",
        )
    ]


def _check_clear_text(config: MeshSettings) -> list[CheckMessage]:
    from django.conf import settings

    if settings.DEBUG or config.tls is not None or config.secret is not None:
        return []
    if _is_loopback(config.bind):
        return []
    return [
        Warning(
            f"The mesh listens on {config.bind} without TLS, and its frames are signed with a "
            "key derived from SECRET_KEY. Cache keys travel in clear text to every address in "
            "the peer table (which anyone with write access to it can add), and that key is as "
            "safe as SECRET_KEY, which other services or old copies of the settings may share.",
            id="warpmesh.W007",
            hint="Set WARPMESH['TLS'] (mutual TLS between peers) and a dedicated "
            "WARPMESH['SECRET'], or BIND to a private interface.",
        )
    ]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_prefork(config: MeshSettings, environ: Mapping[str, str]) -> list[CheckMessage]:
    if config.port == 0 or config.port_range > 1:
        return []
    server = prefork_server(environ)
    if server is None:
        return []
    return [
        Warning(
            f"WARPMESH['PORT'] is fixed ({config.port}) with PORT_RANGE 1, but a pre-fork "
            f"server may run several workers here ({server}). Each worker is its own mesh "
            "node with its own port: all but the first would fail to bind and cache alone, "
            "serving stale data.",
            id="warpmesh.W003",
            hint="Leave PORT_RANGE at its default (64) so each worker takes the next free "
            "port, or set PORT to 0.",
        )
    ]


def _check_uwsgi_threads() -> list[CheckMessage]:
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is None or uwsgi_threads_enabled(uwsgi):
        return []
    return [
        Warning(
            "This process runs under uWSGI with Python threads disabled: a worker then holds "
            "the GIL while it waits for a request, so the mesh's sender, receiver and "
            "maintenance threads stall whenever it is idle. It sends no heartbeats (its peers "
            "count it lost and flush their caches) and applies the others' invalidations late, "
            "so a request can read an entry another instance has changed.",
            id="warpmesh.W006",
            hint="Set 'enable-threads = true' in the uWSGI configuration (--enable-threads).",
        )
    ]


@register("warpmesh")
def check_dashboard(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    from django.conf import settings

    from django_warpmesh.conf import PERMISSION_SETTING, resolve_permission

    try:
        resolve_permission(getattr(settings, PERMISSION_SETTING, None))
    except ImproperlyConfigured as exc:
        return [
            Error(
                str(exc),
                id="warpmesh.E004",
                hint="See 'The dashboard' in docs/operations.md.",
            )
        ]
    return []


CACHALOT_BACKEND = "django_warpmesh.contrib.cachalot.CachalotMeshCache"


@register("warpmesh")
def check_cachalot(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """django-cachalot caching on a plain MeshCache: its fills evict each other (W008)."""
    from django.conf import settings

    if not apps.is_installed("cachalot"):
        return []
    alias = getattr(settings, "CACHALOT_CACHE", "default")
    if alias not in mesh_cache_aliases():
        return []
    # Imported only here, where cachalot is installed: nothing else imports it.
    backend = import_string(settings.CACHES[alias]["BACKEND"])  # type: ignore[index]
    if issubclass(backend, import_string(CACHALOT_BACKEND)):
        return []
    return [
        Warning(
            f"django-cachalot caches on CACHES[{alias!r}], a MeshCache: on every miss cachalot "
            "stores the current time in each table the query reads, a value that differs from "
            "one process to the next, so each process's fill evicts the others' copies and "
            "queries are rarely served from the cache when more than one process reads them.",
            id="warpmesh.W008",
            hint=f"Set CACHES[{alias!r}]['BACKEND'] = '{CACHALOT_BACKEND}' (a MeshCache that "
            "keeps cachalot's fills in each process and sends its invalidations to every "
            "process). See docs/cachalot.md.",
        )
    ]
