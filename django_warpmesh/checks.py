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
from django.db import DatabaseError, connections
from django.utils.module_loading import import_string

from django_warpmesh.conf import MeshSettings, get_settings, running_migration_command
from django_warpmesh.node.transports import TransportError
from django_warpmesh.servers import prefork_server, uwsgi_threads_enabled

MESH_CACHE = "django_warpmesh.cache.MeshCache"
APP = "django_warpmesh"


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
        and _peer_database_problem(config) is None
    ):
        return _check_peer_table(config)
    return []


def _check_peer_table(config: MeshSettings) -> list[CheckMessage]:
    from django_warpmesh.discovery import database_alias
    from django_warpmesh.models import PeerRow

    alias = database_alias(config)
    table = PeerRow._meta.db_table
    try:
        with connections[alias].cursor() as cursor:
            tables = connections[alias].introspection.table_names(cursor)
        unapplied = [] if table not in tables else _unapplied_migrations(alias)
    except DatabaseError as exc:
        return [
            Warning(
                f"Could not check for the mesh peer table on database {alias!r}: {exc}",
                id="warpmesh.W001",
                hint="Peers are discovered through this table; until it is reachable, this "
                "instance only knows the peers it has already found.",
            )
        ]
    hint = f"Run 'python manage.py migrate django_warpmesh --database {alias}'."
    if table not in tables:
        return [
            Error(
                f"The mesh peer table {table!r} does not exist on database {alias!r}, so "
                "instances cannot find each other.",
                id="warpmesh.E002",
                hint=hint,
            )
        ]
    if unapplied:
        return [
            Error(
                f"Migrations of django_warpmesh not applied on database {alias!r}: "
                f"{', '.join(unapplied)}; the peer table may not be what the nodes expect.",
                id="warpmesh.E002",
                hint=hint,
            )
        ]
    return _check_registration(config)


def _check_registration(config: MeshSettings) -> list[CheckMessage]:
    """What a node's discovery sync would hit, found now rather than retried forever later."""
    from django_warpmesh.discovery import DatabaseRegistry

    registry = DatabaseRegistry(config)
    try:
        registry.probe()
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return [
            Error(
                f"Peer discovery would fail on database {registry.alias!r}: "
                f"{type(exc).__name__}: {first_line}",
                id="warpmesh.E005",
                hint="Each node registers itself in the peer table and refreshes its row; "
                "the database user needs INSERT, UPDATE, DELETE and SELECT on it. Until this "
                "works, instances cannot find each other and cap what they cache.",
            )
        ]
    return []


def _unapplied_migrations(alias: str) -> list[str]:
    from django.db.migrations.loader import MigrationLoader

    loader = MigrationLoader(connections[alias], ignore_no_migrations=True)
    plan = {
        step for leaf in loader.graph.leaf_nodes(APP) for step in loader.graph.forwards_plan(leaf)
    }
    applied = loader.applied_migrations
    return sorted(name for app, name in plan if app == APP and (app, name) not in applied)


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
        messages += _check_peer_source(config, installed, mesh_caches)
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
    ignored = [name for name, value in (("PEERS", config.peers), ("TLS", config.tls)) if value]
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


def _check_peer_source(
    config: MeshSettings, installed: bool, mesh_caches: list[str]
) -> list[CheckMessage]:
    caches = ", ".join(repr(alias) for alias in mesh_caches)
    if config.peers:
        if installed:
            return []
        return [
            Warning(
                f"CACHES {caches} use {MESH_CACHE} but '{APP}' is not in INSTALLED_APPS.",
                id="warpmesh.W004",
                hint=f"Add '{APP}' to INSTALLED_APPS: the static PEERS list works without it, "
                "but the system checks, 'manage.py mesh_status' and the admin page need it.",
            )
        ]
    if not installed:
        return [
            Error(
                f"CACHES {caches} use {MESH_CACHE} with the mesh enabled, but there is no way "
                f"to find peers: WARPMESH['PEERS'] is empty and '{APP}' is not in "
                "INSTALLED_APPS (its peer table is how instances find each other). Each "
                "instance would cache alone and serve stale data after another one writes.",
                id="warpmesh.E003",
                hint=f"Add '{APP}' to INSTALLED_APPS and run 'manage.py migrate {APP}', or list "
                "the instances in WARPMESH['PEERS'], or set WARPMESH['ENABLED'] to False.",
            )
        ]
    problem = _peer_database_problem(config)
    if problem is not None:
        return [
            Error(
                f"The mesh is enabled but there is no way to find peers: {problem}.",
                id="warpmesh.E003",
                hint="Point WARPMESH['DATABASE'] at a configured database alias shared by every "
                "instance, or list the instances in WARPMESH['PEERS'].",
            )
        ]
    return []


def _peer_database_problem(config: MeshSettings) -> str | None:
    """Why the peer table's database cannot be used at all, or None."""
    from django_warpmesh.discovery import database_alias

    alias = database_alias(config)
    if alias not in connections.settings:
        source = "WARPMESH['DATABASE']" if config.database else "the database routers"
        return f"{source} names the database {alias!r}, which is not in DATABASES"
    if connections.settings[alias].get("ENGINE", "").endswith(".dummy"):
        return f"the database {alias!r} holding the peer table is not configured (no ENGINE)"
    return None


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
