"""Where peers come from: the peer table (E002, E005, W001), the static lists and DISCOVERY
(E003, E007, E008, W004, W010, W011)."""

from __future__ import annotations

import importlib.util

from django.core.checks import CheckMessage, Error, Warning
from django.db import DatabaseError, connections

from django_warpmesh.conf import MeshSettings

MESH_CACHE = "django_warpmesh.cache.MeshCache"
APP = "django_warpmesh"


def check_peer_table(config: MeshSettings) -> list[CheckMessage]:
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


def check_discovery(config: MeshSettings) -> list[CheckMessage]:
    """DISCOVERY against the settings it uses: E007, E008, W010, W011."""
    mode = config.discovery_mode
    listed = [name for name in ("PEERS", "PEERS_FILE") if getattr(config, name.lower())]
    messages: list[CheckMessage] = []
    if mode == "static" and not listed:
        messages.append(
            Error(
                "WARPMESH['DISCOVERY'] is 'static' but neither PEERS nor PEERS_FILE is set: "
                "no peer would ever be dialled.",
                id="warpmesh.E007",
                hint="List the instances in WARPMESH['PEERS'] or a PEERS_FILE, or remove "
                "DISCOVERY to use the peer table.",
            )
        )
    elif mode in {"database", "mdns"} and listed:
        messages.append(
            Error(
                f"WARPMESH['DISCOVERY'] is {mode!r} but {' and '.join(listed)} "
                f"{'is' if len(listed) == 1 else 'are'} set too, and would be ignored.",
                id="warpmesh.E007",
                hint="Choose one way to find peers: remove DISCOVERY (PEERS or PEERS_FILE then "
                "means static discovery), or remove PEERS and PEERS_FILE.",
            )
        )
    if mode == "mdns" and importlib.util.find_spec("zeroconf") is None:
        messages.append(
            Error(
                "WARPMESH['DISCOVERY'] is 'mdns' but the zeroconf package is not installed. "
                "Every instance would cache alone (capped at DEGRADED_TIMEOUT).",
                id="warpmesh.E008",
                hint="pip install 'django-warpmesh[mdns]'",
            )
        )
    elif mode == "mdns" and config.mdns_interfaces:
        messages += _check_mdns_interfaces(config.mdns_interfaces)
    if mode != "mdns" and config.mdns_interfaces:
        messages.append(
            Warning(
                "WARPMESH['MDNS_INTERFACES'] has no effect unless DISCOVERY is 'mdns'.",
                id="warpmesh.W010",
                hint="Remove it, or set WARPMESH['DISCOVERY'] to 'mdns'.",
            )
        )
    if mode == "static" and config.peers_file:
        messages += _check_peers_file(config.peers_file)
    return messages


def _check_mdns_interfaces(names: tuple[str, ...]) -> list[CheckMessage]:
    from django_warpmesh.node import DiscoveryError
    from django_warpmesh.node.mdns import host_interfaces
    from django_warpmesh.node.mdns_records import interfaces

    try:
        interfaces(names, host_interfaces())
    except DiscoveryError as exc:
        return [
            Error(
                f"{exc}. mDNS discovery would fail on every start (the node then caches "
                "capped at DEGRADED_TIMEOUT).",
                id="warpmesh.E008",
                hint="Name an interface this host has (or its address), or leave "
                "MDNS_INTERFACES empty for every interface.",
            )
        ]
    return []


def _check_peers_file(path: str) -> list[CheckMessage]:
    from django_warpmesh.node.static import PeersFile

    peers_file = PeersFile(path)
    try:
        peers_file.read()
        problems = peers_file.problems
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        problems = [(0, f"cannot be read ({reason})")]
    if not problems:
        return []
    where = "; ".join(f"line {number}: {why}" if number else why for number, why in problems)
    return [
        Warning(
            f"WARPMESH['PEERS_FILE'] {path}: {where}. A running instance skips such lines, and "
            "keeps the last list it could read; it reads the file again every "
            "DISCOVERY_INTERVAL.",
            id="warpmesh.W011",
            hint="One host:port per line; '#' starts a comment.",
        )
    ]


def check_peer_source(
    config: MeshSettings, installed: bool, mesh_caches: list[str]
) -> list[CheckMessage]:
    caches = ", ".join(repr(alias) for alias in mesh_caches)
    if config.discovery_mode in {"static", "mdns"}:
        if installed:
            return []
        return [
            Warning(
                f"CACHES {caches} use {MESH_CACHE} but '{APP}' is not in INSTALLED_APPS.",
                id="warpmesh.W004",
                hint=f"Add '{APP}' to INSTALLED_APPS: static and mDNS discovery work without it, "
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
    problem = peer_database_problem(config)
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


def peer_database_problem(config: MeshSettings) -> str | None:
    """Why the peer table's database cannot be used at all, or None."""
    from django_warpmesh.discovery import database_alias

    alias = database_alias(config)
    if alias not in connections.settings:
        source = "WARPMESH['DATABASE']" if config.database else "the database routers"
        return f"{source} names the database {alias!r}, which is not in DATABASES"
    if connections.settings[alias].get("ENGINE", "").endswith(".dummy"):
        return f"the database {alias!r} holding the peer table is not configured (no ENGINE)"
    return None
