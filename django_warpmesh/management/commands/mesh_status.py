"""``manage.py mesh_status``: the health of the whole mesh, as its peers see it.

The command runs an *observer* node: it dials every peer (from the peer table, or ``PEERS``),
asks each for its stats over the mesh (signed STATS_REQUEST / STATS_REPLY frames), and prints
them with a verdict (with a broker ``TRANSPORT``, nobody is dialled: the observer joins the
broker and asks everyone at once; whoever answers is the mesh). An observer never registers in
the peer table, never appears in a peer's list, never sends an invalidation and never causes a
flush.

Exit status, usable as a probe: 0 healthy, 1 degraded, 2 disabled or misconfigured (including bad
arguments). Output keys (``--json``) are documented in docs/operations.md and kept stable.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import math
import random
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connections

from django_warpmesh import node as mesh_node
from django_warpmesh.conf import MeshSettings, parse
from django_warpmesh.node.transports import TransportError
from django_warpmesh.status_report import (
    DISABLED,
    Census,
    Reply,
    Target,
    Unavailable,
    build_report,
    render_table,
    unavailable_report,
)

DEFAULT_TIMEOUT = 2.0
DEFAULT_WATCH = 2.0
# While some peer has not answered, ask again this often (a request can be lost like any frame).
RETRY_EVERY = 0.5
# A broker's round: replies come within milliseconds of each other; once one came, the round
# ends when none came for this long (or at --timeout).
BROKER_QUIET = 0.3


def _positive_seconds(text: str) -> float:
    """argparse type: a bad value is a usage error (exit status 2; CommandError from code)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a number of seconds, got {text!r}")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a whole number, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class Command(BaseCommand):
    help = (
        "Show the health of the whole mesh: every peer's connections, latency and counters, "
        "asked over the mesh by an observer that never joins it. Exit status: 0 healthy, "
        "1 degraded, 2 disabled or misconfigured."
    )
    # The command reports a missing peer table or a bad setting itself, with exit status 2;
    # the system checks would stop it first with another status.
    requires_system_checks: list[str] = []
    requires_migrations_checks = False

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--json",
            action="store_true",
            help="Machine-readable output (keys documented in docs/operations.md). With "
            "--watch, one JSON document per line.",
        )
        parser.add_argument(
            "--watch",
            nargs="?",
            const=DEFAULT_WATCH,
            default=None,
            type=_positive_seconds,
            metavar="SECONDS",
            help=f"Report again every SECONDS (default {DEFAULT_WATCH:g}) until interrupted.",
        )
        parser.add_argument(
            "--count",
            type=_positive_int,
            default=None,
            help="With --watch: stop after this many reports.",
        )
        parser.add_argument(
            "--timeout",
            type=_positive_seconds,
            default=DEFAULT_TIMEOUT,
            metavar="SECONDS",
            help="How long to wait for the peers to answer "
            f"(default {DEFAULT_TIMEOUT:g}). A peer that has not answered by then is shown as "
            "not answering.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["count"] is not None and options["watch"] is None:
            raise CommandError("--count only makes sense with --watch.", returncode=2)
        if options["verbosity"] < 2:
            # The observer's own node would log "connected to ..." for every peer it dials.
            logging.getLogger("django_warpmesh").setLevel(logging.WARNING)
        observer = Observer()
        code = DISABLED
        rounds = 0
        try:
            while True:
                report = observer.report(options["timeout"])
                code = report["exit_code"]
                self._print(report, options)
                rounds += 1
                if options["watch"] is None or rounds == options["count"]:
                    break
                time.sleep(options["watch"])
        except KeyboardInterrupt:
            if not rounds:
                raise
        finally:
            observer.close()
        if code:
            sys.exit(code)

    def _print(self, report: dict[str, Any], options: dict[str, Any]) -> None:
        if options["json"]:
            indent = None if options["watch"] is not None else 2
            self.stdout.write(json.dumps(report, indent=indent, sort_keys=False))
            self.stdout.flush()
            return
        if options["watch"] is not None and self.stdout.isatty():
            self.stdout.write("\x1b[H\x1b[2J", ending="")
        for line in render_table(report):
            self.stdout.write(line)
        style = {
            "healthy": self.style.SUCCESS,
            "degraded": self.style.WARNING,
        }.get(report["status"], self.style.ERROR)
        self.stdout.write(style(report["verdict"]))
        if options["watch"] is not None:
            self.stdout.write("")
        self.stdout.flush()


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
        try:
            config = _settings()
            census = find_targets(config) if config.broker is None else None
            node = self._node(config)
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

    def _node(self, config: MeshSettings) -> mesh_node.MeshNode:
        if self.node is not None:
            return self.node
        from django_warpmesh.mesh import build_node

        try:
            node = build_node(observer=True)
        except TransportError as exc:  # a missing extra, a database that is not PostgreSQL
            raise Unavailable("misconfigured", f"misconfigured: {exc}")
        if not isinstance(node, mesh_node.MeshNode):
            raise Unavailable("misconfigured", f"misconfigured: {node.reason}")
        try:
            node.start()
        except Exception as exc:
            node.stop(timeout=0.5)
            raise Unavailable("misconfigured", f"misconfigured: cannot open the mesh: {exc}")
        self.node = node
        return node

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


def _settings() -> MeshSettings:
    from django.conf import settings

    try:
        config = parse(getattr(settings, "WARPMESH", None))
    except ImproperlyConfigured as exc:
        raise Unavailable("misconfigured", f"misconfigured: {exc}")
    if not config.enabled:
        raise Unavailable("disabled", "disabled: WARPMESH['ENABLED'] is false")
    return config


def find_targets(config: MeshSettings) -> Census:
    """The peers of the mesh: the static PEERS list, or the rows of the peer table."""
    if config.peers:
        targets = [Target(address) for address in sorted(config.peers)]
        return Census(f"static PEERS ({len(config.peers)})", targets)
    from django.apps import apps

    if not apps.is_installed("django_warpmesh"):
        raise Unavailable(
            "misconfigured",
            "misconfigured: no WARPMESH['PEERS'] and 'django_warpmesh' is not in "
            "INSTALLED_APPS, so there is no way to find peers",
        )
    from django.db.models.functions import Now

    from django_warpmesh.discovery import database_alias, dialable_address
    from django_warpmesh.models import Peer

    alias = database_alias(config)
    if alias not in connections.settings:
        raise Unavailable(
            "misconfigured",
            f"misconfigured: the peer table's database {alias!r} is not in DATABASES",
        )
    try:
        rows = list(
            Peer.objects.using(alias)
            .annotate(db_now=Now())
            .order_by("-last_seen")
            .values("node_id", "address", "host", "pid", "started_at", "last_seen", "db_now")
        )
    except DatabaseError as exc:
        raise Unavailable("misconfigured", _table_problem(alias, exc))
    finally:
        # A --watch must not hold a database connection between rounds.
        connections[alias].close()
    census = Census(f"database discovery ({alias})", [])
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
        census.targets.append(
            Target(
                address=address,
                node_id=row["node_id"],
                host=row["host"],
                pid=row["pid"],
                started_at=_aware(row["started_at"]),
                last_seen=last_seen,
                stale=last_seen is not None
                and db_now - last_seen > timedelta(seconds=config.stale_after),
            )
        )
        census.now = db_now
    census.targets.sort(key=lambda target: target.address)
    return census


def _table_problem(alias: str, exc: DatabaseError) -> str:
    from django_warpmesh.models import Peer

    table = Peer._meta.db_table
    try:
        missing = table not in connections[alias].introspection.table_names()
    except DatabaseError:
        missing = False
    finally:
        connections[alias].close()
    if missing:
        return (
            f"misconfigured: the peer table {table!r} does not exist on database {alias!r}: "
            f"run 'manage.py migrate django_warpmesh --database {alias}'"
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
