"""The PostgreSQL transport's two sessions with the server: how each is opened and kept open by
a thread of its own, and whether together they make a working link.

The listener's session (:mod:`.postgresql_listener`) and the sender's
(:mod:`.postgresql_sender`) each fail on their own, but the node is told of one link: up once
both are, lost when either goes (:class:`SessionPair`). A session opened before a loss may have
died in the same event without knowing it yet, so a loss renews both (:class:`Renew`), and the
link is declared up again only when both were opened since.

psycopg is imported only once a transport is built.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from django_warpmesh.node.transports.base import (
    BrokerTransport,
    TransportError,
    error_line,
    retry_delay,
)
from django_warpmesh.node.transports.wakeup import WakePipe

if TYPE_CHECKING:
    import psycopg
    from psycopg import pq

logger = logging.getLogger("django_warpmesh")

# Reconnection backoff after a failed connection (see retry_delay): from the first, doubling up
# to the cap.
RETRY_MIN = 0.1
RETRY_MAX = 5.0

# Nothing our sessions run may take longer (a hung server; a NOTIFY commit waiting on the global
# lock behind a stuck transaction): the statement fails instead, and close() stays bounded.
STATEMENT_TIMEOUT_MS = 5000
# Connection parameters used unless the connection string sets them. Keepalives (and, on libpq
# 12 or later, the TCP user timeout) make a vanished server visible to the listener, which
# otherwise waits on a silent socket forever.
CONNECTION_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}
TCP_USER_TIMEOUT_MS = 20_000


def session_conninfo(conninfo: str, application_name: str, settings: dict[str, str]) -> str:
    """The connection string of one of our sessions: the caller's, with our defaults and
    ``settings`` (server settings of the session, unless the caller's string sets them)."""
    try:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict, make_conninfo
    except ImportError as exc:
        raise TransportError(
            "the postgresql transport needs psycopg 3: pip install 'django-warpmesh[postgresql]'"
        ) from exc
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error:
        # Not the parser's message: it quotes the string, which may hold a password.
        raise TransportError("the PostgreSQL connection string of the transport is malformed")
    params.setdefault("application_name", application_name)
    for key, value in CONNECTION_DEFAULTS.items():
        params.setdefault(key, value)
    if psycopg.pq.version() >= 120000:
        params.setdefault("tcp_user_timeout", TCP_USER_TIMEOUT_MS)
    options = str(params.get("options") or "")
    for name, value in {"statement_timeout": str(STATEMENT_TIMEOUT_MS), **settings}.items():
        if name not in options:
            options = f"{options} -c {name}={value}".strip()
    params["options"] = options
    return make_conninfo("", **params)


def open_session(conninfo: str) -> psycopg.Connection[Any]:
    import psycopg

    conn = psycopg.connect(conninfo, autocommit=True)
    try:
        # A server-wide idle_session_timeout would end our sessions, idle by design, and
        # every end is a lost link (a flush) for the node. The setting is PostgreSQL 14's.
        with contextlib.suppress(psycopg.errors.UndefinedObject):
            conn.execute("SET idle_session_timeout = 0")
    except BaseException:
        conn.close()
        raise
    return conn


def read_server(pgconn: pq.abc.PGconn) -> None:
    """Take what the server sent on a session whose socket is readable (notifications, or its
    goodbye); raises when the server hung up."""
    from psycopg import OperationalError, pq

    pgconn.consume_input()
    if pgconn.status != pq.ConnStatus.OK:
        raise OperationalError("the connection is no longer usable")


class Renew(Exception):
    """The other session failed: this one, opened before that loss, is replaced too."""


class SessionPair:
    """Whether the listener's and the sender's sessions make a working link, and the node told
    when that changes (on the thread of the session that changed it).

    Keeps the transport's ``connected``, ``connects``, ``disconnects`` and ``last_error``.
    ``closing`` is set once the transport is being closed: from then on nothing is declared up
    or lost.
    """

    def __init__(self, transport: BrokerTransport, closing: threading.Event) -> None:
        self._transport = transport
        self._closing = closing
        # Also keeps connected/lost events in the order they happen.
        self._lock = threading.Lock()
        self._up: set[str] = set()
        self._wakers: dict[str, WakePipe] = {}
        # Bumped by each failure of a current session: one opened at an earlier epoch is stale.
        self.epoch = 0
        self.failures = 0  # sessions (either) that failed to open or broke
        self._failure_logged = False

    @property
    def connected(self) -> bool:
        return self._transport.connected

    def add(self, role: str, waker: WakePipe) -> None:
        """``role``'s session is kept by a thread that ``waker`` wakes (to renew a stale one)."""
        self._wakers[role] = waker

    def up(self, role: str, epoch: int) -> None:
        """``role``'s session, opened at ``epoch``, is ready; raises :class:`Renew` if a loss
        happened since it was opened."""
        transport = self._transport
        with self._lock:
            if epoch != self.epoch:
                raise Renew
            self._up.add(role)
            if transport.connected or self._closing.is_set() or len(self._up) < 2:
                return
            transport.connected = True
            transport.connects += 1
            self._failure_logged = False
            if transport.connects == 1:
                logger.info("mesh: postgresql transport connected to %s", transport.url)
            else:
                logger.info(
                    "mesh: postgresql transport reconnected to %s (disconnects so far: %d)",
                    transport.url,
                    transport.disconnects,
                )
            transport.tell_node(lambda events: events.transport_connected())

    def down(self, role: str, reason: str, epoch: int | None) -> None:
        """``role``'s session failed (``epoch``: when it was opened; None if it never was)."""
        transport = self._transport
        with self._lock:
            self._up.discard(role)
            self.note_error(role, reason)
            self.failures += 1
            if self._closing.is_set():
                return
            if epoch == self.epoch:
                self.epoch += 1
                # The other threads see their sessions are now stale, and renew them.
                for other, waker in self._wakers.items():
                    if other != role:
                        waker.wake()
            if transport.connected:
                transport.connected = False
                transport.disconnects += 1
                self._failure_logged = True
                logger.warning(
                    "mesh: postgresql transport lost its %s connection to %s (%s); reconnecting",
                    role,
                    transport.url,
                    reason,
                )
                lost = f"postgresql {role}: {reason}"
                transport.tell_node(lambda events: events.transport_lost(lost))
            elif not self._failure_logged:
                self._failure_logged = True
                logger.warning(
                    "mesh: postgresql transport cannot connect to %s (%s); retrying with backoff",
                    transport.url,
                    reason,
                )

    def renewing(self, role: str) -> None:
        """``role``'s session was found stale, and is being replaced."""
        with self._lock:
            self._up.discard(role)

    def check_current(self, epoch: int) -> None:
        """Raises :class:`Renew` if a session opened at ``epoch`` is stale."""
        if epoch != self.epoch:
            raise Renew

    def note_error(self, role: str, reason: str) -> None:
        """What ``last_error`` shows: ``role``'s session failed, or its server refused."""
        self._transport.last_error = f"{role}: {reason}"


class SessionThread(abc.ABC):
    """A daemon thread that keeps one session of the pair open: opens it, serves it until it
    fails, is renewed or the thread is stopped, and reopens it (backing off after a failure).

    Subclasses set ``role`` and implement :meth:`_serve`. ``stop`` is the event that ends the
    thread; ``waker`` makes its ``poll`` return (a stop, a renewal, work for it).
    """

    role: str = ""

    def __init__(
        self, pair: SessionPair, conninfo: str, stop: threading.Event, thread_name: str
    ) -> None:
        self._pair = pair
        self._conninfo = conninfo
        self._stop = stop
        self._thread_name = thread_name
        self.waker = WakePipe()
        self.thread: threading.Thread | None = None
        self.pid: int | None = None  # the backend's, to find it in pg_stat_activity
        pair.add(self.role, self.waker)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self.thread.start()

    def stop(self, deadline: float) -> None:
        """Stop the thread, waiting for it until ``deadline`` (``time.monotonic``) at the most."""
        self._stop.set()
        self.waker.wake()
        if self.thread is not None:
            self.thread.join(max(0.0, deadline - time.monotonic()))
        else:
            # Never started: no thread will close it. A thread still running past the
            # deadline (a hung server) closes its own when its connection gives up.
            self.waker.close()

    @abc.abstractmethod
    def _serve(self, conn: psycopg.Connection[Any], epoch: int) -> None:
        """Use the session, opened at ``epoch``, until the thread is stopped; raises when it
        fails or is stale."""

    # Optional hooks: empty on purpose.

    def _prepare(self, conn: psycopg.Connection[Any]) -> None:  # noqa: B027
        """Set the session up, before the link may count it as up."""

    def _drop_unsent(self) -> None:  # noqa: B027
        """Let go of work queued for the session: it failed (the link is down already), or the
        thread ends."""

    def _run(self) -> None:
        failures = 0  # in a row
        try:
            while not self._stop.is_set():
                conn = None
                # When the session was opened; None until it is: one that never opened makes
                # no other stale.
                epoch: int | None = None
                try:
                    opening = self._pair.epoch
                    conn = open_session(self._conninfo)
                    epoch = opening
                    self._prepare(conn)
                    self.pid = conn.info.backend_pid
                    self._pair.up(self.role, epoch)
                    failures = 0
                    self._serve(conn, epoch)
                except Renew:
                    self._pair.renewing(self.role)
                except Exception as exc:
                    if self._stop.is_set():
                        break
                    self._pair.down(self.role, error_line(exc), epoch)
                    self._drop_unsent()
                    failures += 1
                    self._stop.wait(retry_delay(failures, RETRY_MIN, RETRY_MAX))
                finally:
                    self.pid = None
                    if conn is not None:
                        conn.close()
        finally:
            self._drop_unsent()
            self.waker.close()
