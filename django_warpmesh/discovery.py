"""Peer discovery through the ``django_warpmesh_peer`` table of a database every node shares.

Runs only on the node's maintenance thread, with that thread's own database connection: a request
never waits on it. Each ``sync``: upsert our row (which refreshes ``last_seen``), delete rows
older than ``STALE_AFTER``, and return the addresses of the rest. Times are the database's own
(``Now()``), so clock skew between hosts does not make live peers look stale.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, connections, router, transaction
from django.db.models.functions import Now

from django_warpmesh import __version__
from django_warpmesh.conf import MeshSettings, parse_address, running_migration_command
from django_warpmesh.node import Discovered, DiscoveryError

if TYPE_CHECKING:
    from django_warpmesh.node import MeshNode

logger = logging.getLogger("django_warpmesh")


# Rows read at most: anyone who can write the table must not make every node dial without end.
MAX_PEER_ROWS = 1024
# How far in the future (by the database's clock) a row's last_seen may be: clock steps only.
FUTURE_TOLERANCE = 60.0


def dialable_address(address: object) -> tuple[str, int]:
    """``host:port`` a node may dial: valid, and not an address no peer can listen on."""
    host, port = parse_address("peer table", address)
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host)
        if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
            raise ImproperlyConfigured(f"{address!r} is not an address a peer listens on")
    return host, port


class Registrant(Protocol):
    """What registering a row needs of a node."""

    address: str

    @property
    def hex_id(self) -> str: ...

    def store_locations(self) -> list[str]: ...


def peer_table_migrated(**kwargs: object) -> None:
    """``post_migrate`` of this app: the running node's next sync happens now."""
    from django_warpmesh.node import MeshNode, process

    node = process.current_node()
    if isinstance(node, MeshNode):
        node.sync_soon()


def database_alias(config: MeshSettings) -> str:
    """``WARPMESH['DATABASE']`` if set, else what the routers say for writing a PeerRow."""
    from django_warpmesh.models import PeerRow

    return config.database or router.db_for_write(PeerRow) or "default"


def peer_rows(alias: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The peer table's rows as a node reads them: newest first, none from the future (beyond
    ``FUTURE_TOLERANCE``), at most ``limit`` (default ``MAX_PEER_ROWS``).

    Each row: ``node_id``, ``address``, ``host``, ``pid``, ``started_at``, ``last_seen`` and
    ``db_now``, the database's clock at the read. Raises :class:`DatabaseError`; the caller
    closes the connection.
    """
    from django_warpmesh.models import PeerRow

    fields = ("node_id", "address", "host", "pid", "started_at", "last_seen")
    return list(
        PeerRow.objects.using(alias)
        .filter(last_seen__lte=Now() + timedelta(seconds=FUTURE_TOLERANCE))
        .annotate(db_now=Now())
        .order_by("-last_seen")
        .values(*fields, "db_now")[: MAX_PEER_ROWS if limit is None else limit]
    )


def peer_table_missing(alias: str) -> bool:
    """Whether the peer table does not exist on ``alias`` (False when that cannot be told).

    Closes the connection, before (it may be in a failed transaction) and after.
    """
    from django_warpmesh.models import PeerRow

    connection = connections[alias]
    connection.close()
    try:
        return PeerRow._meta.db_table not in connection.introspection.table_names()
    except DatabaseError:
        return False
    finally:
        connection.close()


class DatabaseRegistry:
    def __init__(self, config: MeshSettings) -> None:
        self.config = config
        self.alias = database_alias(config)
        self.description = f"database discovery ({self.alias})"
        self.syncs = 0
        self.rejected = 0
        self._warned: set[str] = set()
        self._announced: set[str] = set()

    def initial(self) -> Discovered | None:
        return None

    def sync(self, node: MeshNode) -> Discovered | None:
        """Register, clean up and read the table; :class:`DiscoveryError` when it cannot."""
        try:
            if node.address:  # not an observer, nor a node that could not listen
                self._register(node)
                self._remove_stale(node)
            addresses = self._read(node)
        except DatabaseError as exc:
            raise self._failure(exc) from exc
        finally:
            # One short-lived connection per sync: a fleet of N workers must not hold N idle
            # database connections between syncs that are seconds apart.
            connections[self.alias].close()
        self.syncs += 1
        return addresses

    def probe(self) -> None:
        """Everything a node's sync does to the table, rolled back: raises what a sync would.

        For the system check, which runs on the caller's connection (so it does not close it).
        """
        with transaction.atomic(using=self.alias):
            self._register(_ProbeNode())
            self._remove_stale(_ProbeNode())
            transaction.set_rollback(True, using=self.alias)

    def leave(self, node: MeshNode) -> None:
        if not node.address:
            return
        from django_warpmesh.models import PeerRow

        try:
            PeerRow.objects.using(self.alias).filter(node_id=node.hex_id).delete()
        except DatabaseError:
            pass  # Our row goes stale and a peer removes it.
        finally:
            connections[self.alias].close()

    def _register(self, node: Registrant) -> None:
        from django_warpmesh.models import PeerRow

        rows = PeerRow.objects.using(self.alias)
        fields = {
            "address": node.address,
            "host": socket.gethostname()[:255],
            "pid": os.getpid(),
            "caches": sorted(node.store_locations()),
            "version": __version__,
            "last_seen": Now(),
        }
        if not rows.filter(node_id=node.hex_id).update(**fields):
            # The database's clock, as for last_seen: no aware/naive datetime to get right for
            # USE_TZ on each backend, and ages computed from the two never mix clocks.
            rows.create(node_id=node.hex_id, started_at=Now(), **fields)

    def _remove_stale(self, node: Registrant) -> None:
        from django_warpmesh.models import PeerRow

        rows = PeerRow.objects.using(self.alias).exclude(node_id=node.hex_id)
        stale = rows.filter(last_seen__lt=Now() - timedelta(seconds=self.config.stale_after))
        for node_id, address in stale.values_list("node_id", "address"):
            logger.info("mesh: removing stale peer %s (%s) from the peer table", node_id, address)
        stale.delete()
        # Every row's last_seen is the database's own Now(): one from the future was not written
        # by a node, and would never go stale. Removed, as a stale one.
        future = rows.filter(last_seen__gt=Now() + timedelta(seconds=FUTURE_TOLERANCE))
        for node_id, address in future.values_list("node_id", "address"):
            self._warn_once(
                f"future:{node_id}",
                "mesh: removing peer row %s (%s): its last_seen is in the future",
                node_id,
                address,
            )
        future.delete()

    def _read(self, node: MeshNode) -> Discovered:
        rows = [
            (row["node_id"], row["address"]) for row in peer_rows(self.alias, MAX_PEER_ROWS + 1)
        ]
        if len(rows) > MAX_PEER_ROWS:
            rows = rows[:MAX_PEER_ROWS]
            self._warn_once(
                "too-many",
                "mesh: the peer table has more than %d rows; using the %d most recent",
                MAX_PEER_ROWS,
                MAX_PEER_ROWS,
            )
        addresses: dict[str, str] = {}
        for node_id, address in rows:
            if node_id == node.hex_id:
                continue
            try:
                dialable_address(address)
            except ImproperlyConfigured:
                self.rejected += self._warn_once(
                    f"bad:{node_id}:{address}",
                    "mesh: skipping peer row %s with a bad address %r",
                    node_id,
                    address,
                )
                continue
            if address == node.address:
                self._warn_once(
                    f"self:{node_id}",
                    "mesh: skipping peer row %s: it has this node's address %s",
                    node_id,
                    address,
                )
                continue
            if address in addresses:
                self._warn_once(
                    f"dup:{address}",
                    "mesh: several peer rows claim %s; using the most recent (%s)",
                    address,
                    addresses[address],
                )
                continue
            addresses[address] = node_id
        fresh = set(addresses) - self._announced
        if fresh and not node.observer:
            logger.info(
                "mesh: discovered %d new peer(s) via the peer table: %s",
                len(fresh),
                ", ".join(sorted(fresh)),
            )
        self._announced = set(addresses)
        return dict.fromkeys(addresses, "database")

    def _failure(self, exc: DatabaseError) -> DiscoveryError:
        from django_warpmesh.models import PeerRow

        table = PeerRow._meta.db_table
        if peer_table_missing(self.alias):
            # No node can have registered in a table that does not exist: nobody to wait for.
            return DiscoveryError(
                f"the peer table {table} does not exist on database {self.alias!r}: run "
                "'manage.py migrate django_warpmesh'",
                alone=True,
                quiet=running_migration_command(),
            )
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return DiscoveryError(
            f"cannot reach the peer table on database {self.alias!r} ({first_line})"
        )

    def _warn_once(self, key: str, message: str, *args: object) -> bool:
        """Log once per ``key``; whether this was the first time."""
        if key in self._warned:
            return False
        self._warned.add(key)
        logger.warning(message, *args)
        return True


class _ProbeNode:
    """What ``_register`` reads of a node, for :meth:`DatabaseRegistry.probe`."""

    hex_id = "warpmesh-system-check"
    address = "127.0.0.1:0"
    observer = False

    def store_locations(self) -> list[str]:
        return []
