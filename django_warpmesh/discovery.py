"""Peer discovery through the ``django_warpmesh_peer`` table of a database every node shares.

Runs only on the node's maintenance thread, with that thread's own database connection: a request
never waits on it. Each ``sync``: upsert our row (which refreshes ``last_seen``), delete rows
older than ``STALE_AFTER``, and return the addresses of the rest. Times are the database's own
(``Now()``), so clock skew between hosts does not make live peers look stale.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, connections, router
from django.db.models.functions import Now

from django_warpmesh import __version__
from django_warpmesh.conf import MeshSettings, parse_address, running_migration_command

if TYPE_CHECKING:
    from django_warpmesh.node import MeshNode

logger = logging.getLogger("django_warpmesh")

MAX_BACKOFF = 60.0


def database_alias(config: MeshSettings) -> str:
    """``WARPMESH['DATABASE']`` if set, else what the routers say for writing a Peer."""
    from django_warpmesh.models import Peer

    return config.database or router.db_for_write(Peer) or "default"


class DatabaseRegistry:
    def __init__(self, config: MeshSettings) -> None:
        self.config = config
        self.alias = database_alias(config)
        self.description = f"database discovery ({self.alias})"
        self._failures = 0
        self.syncs = 0
        self._next_attempt = 0.0
        self._warned: set[str] = set()
        self._announced: set[str] = set()

    def initial(self) -> list[str] | None:
        return None

    def sync(self, node: MeshNode) -> Iterable[str] | None:
        if node.observer:
            try:
                return self._read(node)
            finally:
                connections[self.alias].close()
        now = time.monotonic()
        if now < self._next_attempt:
            return None
        try:
            self._register(node)
            self._remove_stale(node)
            addresses = self._read(node)
        except DatabaseError as exc:
            self._on_failure(exc)
            return None
        finally:
            # One short-lived connection per sync: a fleet of N workers must not hold N idle
            # database connections between syncs that are seconds apart.
            connections[self.alias].close()
        self.syncs += 1
        if self._failures:
            logger.info("mesh: peer table reachable again on database %r", self.alias)
        self._failures = 0
        self._next_attempt = 0.0
        return addresses

    def leave(self, node: MeshNode) -> None:
        if node.observer:
            return
        from django_warpmesh.models import Peer

        try:
            Peer.objects.using(self.alias).filter(node_id=node.hex_id).delete()
        except DatabaseError:
            pass  # Our row goes stale and a peer removes it.
        finally:
            connections[self.alias].close()

    def _register(self, node: MeshNode) -> None:
        from django_warpmesh.models import Peer

        rows = Peer.objects.using(self.alias)
        fields = {
            "address": node.address,
            "host": socket.gethostname()[:255],
            "pid": os.getpid(),
            "caches": sorted(node.store_names()),
            "version": __version__,
            "last_seen": Now(),
        }
        if not rows.filter(node_id=node.hex_id).update(**fields):
            started = datetime.fromtimestamp(node.started_at, tz=timezone.utc)
            rows.create(node_id=node.hex_id, started_at=started, **fields)

    def _remove_stale(self, node: MeshNode) -> None:
        from django_warpmesh.models import Peer

        cutoff = Now() - timedelta(seconds=self.config.stale_after)
        stale = Peer.objects.using(self.alias).filter(last_seen__lt=cutoff)
        for node_id, address in stale.exclude(node_id=node.hex_id).values_list(
            "node_id", "address"
        ):
            logger.info("mesh: removing stale peer %s (%s) from the peer table", node_id, address)
        stale.exclude(node_id=node.hex_id).delete()

    def _read(self, node: MeshNode) -> list[str]:
        from django_warpmesh.models import Peer

        rows = (
            Peer.objects.using(self.alias).order_by("-last_seen").values_list("node_id", "address")
        )
        addresses: dict[str, str] = {}
        for node_id, address in rows:
            if node_id == node.hex_id:
                continue
            try:
                parse_address("peer table", address)
            except ImproperlyConfigured:
                self._warn_once(
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
        return list(addresses)

    def _on_failure(self, exc: DatabaseError) -> None:
        from django_warpmesh.models import Peer

        self._failures += 1
        delay = min(self.config.discovery_interval * 2 ** (self._failures - 1), MAX_BACKOFF)
        self._next_attempt = time.monotonic() + delay
        connection = connections[self.alias]
        connection.close()
        try:
            missing = Peer._meta.db_table not in connection.introspection.table_names()
        except DatabaseError:
            missing = False
        if self._failures == 1 and not (missing and running_migration_command()):
            if missing:
                logger.warning(
                    "mesh: the peer table %s does not exist on database %r: run "
                    "'manage.py migrate django_warpmesh'. Keeping the current peers.",
                    Peer._meta.db_table,
                    self.alias,
                )
            else:
                logger.warning(
                    "mesh: cannot reach the peer table on database %r (%s); keeping the "
                    "current peers and retrying with backoff",
                    self.alias,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else exc,
                )
        connection.close()

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)
