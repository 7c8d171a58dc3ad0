"""The observer of ``manage.py mesh_status``: a node that asks every peer for its stats.

The observer's node is built as any process's (:func:`django_warpmesh.node_factory.build_node`,
with ``observer=True``), so it finds its peers the same way: the static ``PEERS`` list, or the
rows of the peer table (read as the nodes read it, :func:`django_warpmesh.discovery.peer_rows`).
It dials them and asks each for its stats over the mesh (signed STATS_REQUEST / STATS_REPLY
frames). With a broker ``TRANSPORT``, nobody is dialled: the observer joins the broker and asks
everyone at once; whoever answers is the mesh. An observer never registers in the peer table,
never appears in a peer's list, never sends an invalidation and never causes a flush.

Each round (:meth:`Observer.report`) is a :class:`~django_warpmesh.status_report.Census`, turned
into the report by :func:`~django_warpmesh.status_report.build_report`.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, connections

from django_warpmesh import node as mesh_node
from django_warpmesh.conf import get_settings
from django_warpmesh.discovery import (
    DatabaseRegistry,
    dialable_address,
    peer_rows,
    peer_table_missing,
)
from django_warpmesh.node.mdns import MdnsRegistry
from django_warpmesh.node.static import StaticRegistry
from django_warpmesh.node.transports import TransportError
from django_warpmesh.node_factory import BrokerRegistry, build_node
from django_warpmesh.status_report import (
    Census,
    Reply,
    Target,
    Unavailable,
    build_report,
    unavailable_report,
)

# While some peer has not answered, ask again this often (a request can be lost like any frame).
RETRY_EVERY = 0.5
# A broker's round: replies come within milliseconds of each other; once one came, the round
# ends when none came for this long (or at the timeout).
BROKER_QUIET = 0.3
# How long an observer browses or resolves to find its targets (mDNS answers in a few hundred ms).
LOOKUP_TIMEOUT = 1.5


class Observer:
    """The observer node (started on first need, kept across --watch rounds) and its rounds."""

    def __init__(self) -> None:
        self.node: mesh_node.MeshNode | None = None
        self._ids = itertools.count(random.randrange(1 << 30))

    def close(self) -> None:
        if self.node is not None:
            self.node.stop(timeout=1.0)
            self.node = None

    def report(self, timeout: float) -> dict[str, Any]:
        """One round: the peers, their answers within ``timeout`` seconds, as a report."""
        try:
            _check_settings()
            node = self.node or _build()
            census = find_targets(node.registry)
            if self.node is None:
                _start(node)
                self.node = node
        except Unavailable as exc:
            return unavailable_report(exc, timeout)
        if census is None:
            census = Census(node.registry.description, [])
            self._collect_broker(node, census, timeout)
            census.targets = sorted(
                (_answered(node_id, reply) for node_id, reply in census.replies.items()),
                key=lambda t: (t.host or "", t.pid or 0, t.node_id or ""),
            )
        else:
            node.set_peer_addresses([target.address for target in census.targets])
            self._collect(node, census, timeout)
        info = node.snapshot()["transport"] or {}
        census.transport = {
            "name": info.get("name"),
            "url": info.get("url") or None,  # nng: the observer listens nowhere
            "connected": bool(info.get("connected")),
            "last_error": info.get("last_error"),
        }
        return build_report(census, timeout)

    def _collect(self, node: mesh_node.MeshNode, census: Census, timeout: float) -> None:
        """Ask every connected peer for its stats until all targets answered or time is up."""
        wanted = {target.address for target in census.targets}
        replies = census.replies
        requests = _Requests(node, self._ids, replies)
        deadline = time.monotonic() + timeout
        asked: set[bytes] = set()
        try:
            while True:
                peers = node.peers()
                with requests.lock:
                    _note_dialed(peers, replies)
                    answered = {a for reply in replies.values() for a in reply.addresses}
                    answered_ids = set(replies)
                if wanted <= answered:
                    break
                now = time.monotonic()
                if now >= deadline:
                    break
                alive = {peer.node_id for peer in peers if peer.alive}
                waiting = {node_id for node_id in alive if node_id.hex() not in answered_ids}
                if waiting - asked or (waiting and now - requests.last >= RETRY_EVERY):
                    requests.ask()
                    asked |= waiting
                requests.wait(deadline)
        finally:
            requests.cancel()
            with requests.lock:
                _note_dialed(node.peers(), replies)

    def _collect_broker(self, node: mesh_node.MeshNode, census: Census, timeout: float) -> None:
        """Whoever answers is the mesh: ask as soon as the observer's link is up (again while
        nobody answered), until answers stop coming for BROKER_QUIET or time is up."""
        requests = _Requests(node, self._ids, census.replies)
        deadline = time.monotonic() + timeout
        seen, last_new = 0, 0.0
        try:
            while (now := time.monotonic()) < deadline:
                with requests.lock:
                    count = len(census.replies)
                if count > seen:
                    seen, last_new = count, now
                elif seen and now - last_new >= BROKER_QUIET:
                    break
                if (
                    not seen
                    and now - requests.last >= RETRY_EVERY
                    and (node.snapshot()["transport"] or {}).get("connected")
                ):
                    requests.ask()
                requests.wait(deadline)
        finally:
            requests.cancel()


class _Requests:
    """One round's stats requests, and the replies to them (by node id), with their RTT."""

    def __init__(
        self, node: mesh_node.MeshNode, ids: Iterator[int], replies: dict[str, Reply]
    ) -> None:
        self.node, self.ids, self.replies = node, ids, replies
        self.lock = threading.Lock()
        self.changed = threading.Event()
        self.last = -math.inf  # when the last request went
        self._asked_at: dict[int, float] = {}

    def ask(self) -> None:
        request_id = next(self.ids) & 0x7FFFFFFF
        self.last = self._asked_at[request_id] = time.monotonic()
        self.node.request_stats(request_id, functools.partial(self._on_reply, request_id))

    def _on_reply(self, request_id: int, node_id: bytes, stats: dict[str, Any]) -> None:
        with self.lock:
            if node_id.hex() not in self.replies and isinstance(stats, dict):
                self.replies[node_id.hex()] = Reply(
                    stats,
                    time.monotonic() - self._asked_at[request_id],
                    datetime.now(timezone.utc),
                )
        self.changed.set()

    def wait(self, deadline: float) -> None:
        self.changed.wait(min(0.02, max(0.0, deadline - time.monotonic())))
        self.changed.clear()

    def cancel(self) -> None:
        for request_id in self._asked_at:
            self.node.cancel_stats_request(request_id)


def _answered(node_id: str, reply: Reply) -> Target:
    """A node found by its answer (a broker transport: no table, no address to dial)."""
    stats = reply.stats
    return Target(str(stats.get("address") or ""), node_id, stats.get("host"), stats.get("pid"))


def _note_dialed(peers: list[mesh_node.Peer], replies: dict[str, Reply]) -> None:
    """Remember which address the observer dialled each answering peer by."""
    for peer in peers:
        reply = replies.get(peer.hex_id)
        if reply is not None and not reply.dialed_as:
            reply.dialed_as = getattr(peer, "dialed_as", "") or ""


# -- the observer's node -----------------------------------------------------------------------


def _check_settings() -> None:
    """``WARPMESH`` as every node reads it (:func:`django_warpmesh.conf.get_settings`)."""
    try:
        config = get_settings()
    except ImproperlyConfigured as exc:
        raise Unavailable("misconfigured", f"misconfigured: {exc}")
    if not config.enabled:
        raise Unavailable("disabled", "disabled: WARPMESH['ENABLED'] is false")


def _build() -> mesh_node.MeshNode:
    """The observer's node, not started: the transport and the peer source of any node."""
    try:
        node = build_node(observer=True)
    except TransportError as exc:  # a missing extra, a database that is not PostgreSQL
        raise Unavailable("misconfigured", f"misconfigured: {exc}")
    if not isinstance(node, mesh_node.MeshNode):
        raise Unavailable("misconfigured", f"misconfigured: {node.reason}")
    return node


def _start(node: mesh_node.MeshNode) -> None:
    try:
        node.start()
    except Exception as exc:
        node.stop(timeout=0.5)
        raise Unavailable("misconfigured", f"misconfigured: cannot open the mesh: {exc}")


# -- the targets -------------------------------------------------------------------------------


def find_targets(registry: mesh_node.PeerRegistry) -> Census | None:
    """The peers where the observer's node finds them: the static PEERS list, or the rows of
    the peer table; None with a broker transport (whoever answers is the mesh)."""
    if isinstance(registry, BrokerRegistry):
        return None
    if isinstance(registry, DatabaseRegistry):
        return _table_census(registry)
    if isinstance(registry, StaticRegistry | MdnsRegistry):
        try:
            found = registry.lookup_now(LOOKUP_TIMEOUT)
        except mesh_node.DiscoveryError as exc:
            raise Unavailable("misconfigured", f"misconfigured: {exc}") from exc
    else:
        found = registry.initial() or {}
    return Census(
        registry.description,
        [Target(address, source=found[address]) for address in sorted(found)],
    )


def _table_census(registry: DatabaseRegistry) -> Census:
    """The rows of the peer table a node would dial: valid addresses, the newest row of each."""
    alias = registry.alias
    if alias not in connections.settings:
        raise Unavailable(
            "misconfigured",
            f"misconfigured: the peer table's database {alias!r} is not in DATABASES",
        )
    try:
        rows = peer_rows(alias)
    except DatabaseError as exc:
        raise Unavailable("misconfigured", _table_problem(alias, exc))
    finally:
        # A --watch must not hold a database connection between rounds.
        connections[alias].close()
    census = Census(registry.description, [])
    seen: set[str] = set()
    for row in rows:
        address = row["address"]
        try:
            dialable_address(address)
        except ImproperlyConfigured:
            continue  # The nodes skip it too (and log it).
        if address in seen:
            continue  # An older row claiming the same address: the nodes use the newest.
        seen.add(address)
        db_now = _aware(row["db_now"]) or census.now
        last_seen = _aware(row["last_seen"])
        stale_after = timedelta(seconds=registry.config.stale_after)
        census.targets.append(
            Target(
                address=address,
                node_id=row["node_id"],
                host=row["host"],
                pid=row["pid"],
                started_at=_aware(row["started_at"]),
                last_seen=last_seen,
                stale=last_seen is not None and db_now - last_seen > stale_after,
                source="database",
            )
        )
        census.now = db_now
    census.targets.sort(key=lambda target: target.address)
    return census


def _table_problem(alias: str, exc: DatabaseError) -> str:
    from django_warpmesh.models import PeerRow

    if peer_table_missing(alias):
        return (
            f"misconfigured: the peer table {PeerRow._meta.db_table!r} does not exist on database "
            f"{alias!r}: run 'manage.py migrate django_warpmesh --database {alias}'"
        )
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"misconfigured: cannot read the peer table on database {alias!r}: {first_line}"


def _aware(value: Any) -> datetime | None:
    if isinstance(value, str):  # SQLite may hand back Now() as text
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
