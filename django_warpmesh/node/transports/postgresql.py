"""PostgreSQL ``LISTEN``/``NOTIFY`` as a broker transport (the ``postgresql`` extra: psycopg 3).

Every process of the mesh listens on one channel of the database it already has, and publishes
its frames there with ``pg_notify``: the server fans each one out to every listening session,
this process's own included (a session receives the notifications of every session, its own
sender's too; the node drops frames of its own origin, as it does on the nng bus).

Two connections, both autocommit, each with a daemon thread of its own:

* the listener (``warpmesh-pg-listen``) runs ``LISTEN`` and then only reads notifications into
  the inbox. It reads its socket even when the inbox is full (dropping, and counting, what does
  not fit): a session that stops reading holds back the tail of PostgreSQL's notification queue,
  which is global to the server, and once that queue is full every ``NOTIFY`` of the cluster
  fails.
* the sender (``warpmesh-pg-notify``) takes what :meth:`PostgresTransport.send` queued and
  publishes all of it in one statement (``SELECT pg_notify(c, p) FROM unnest(...)``): one round
  trip and one transaction per burst. Notifications are queued at commit under a lock global to
  the server, so one commit per burst instead of one per frame is what keeps a busy mesh from
  serialising on that lock. While the sender is idle a frame goes out at once, alone; under load
  frames pile up behind the statement in flight and go out together in the next.

Payloads: a ``NOTIFY`` payload is text, shorter than 8000 bytes; frames go as base64, stats
replies cut into chunks (:mod:`.postgresql_payloads`).

Ordering: frames sent through one transport reach every listener in the order they were sent
(one sender session; notifications of a transaction are delivered in order, transactions in
commit order). All listeners see the same global order of all senders' frames. PostgreSQL
delivers one copy of identical payloads sent on a channel in the same transaction: two
byte-identical frames in one burst arrive once (node frames carry a sequence number, so are never
identical).

Outages: when either connection fails the transport reports ``transport_lost`` and refuses
frames (``send`` returns False) until both are back. Both are reopened, the one that did not fail
too: it was opened before the loss and may have died in the same event without knowing it yet,
and ``transport_connected`` must mean both links work. Frames queued but not yet published when
the sender's connection fails are dropped and counted (``send_lost``), never sent late. Frames
published by others while the listener is down are never delivered to it: PostgreSQL keeps no
notification for a session that is not listening.

The connection must reach the primary directly (or through session pooling): a standby refuses
``LISTEN`` and ``NOTIFY``, and a transaction-pooling proxy forgets a session's ``LISTEN``.

This module imports psycopg only when a transport is built, so the node's packages import
without the extra installed.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import secrets
import select
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from django_warpmesh.node.transports.base import (
    BrokerTransport,
    TransportError,
    TransportEvents,
    error_line,
    retry_delay,
)
from django_warpmesh.node.transports.postgresql_payloads import (
    MAX_FRAME_BYTES,
    MAX_REPLY_BYTES,
    MalformedPayload,
    ReplyAssembler,
    decode_payload,
    encode_payload,
    reply_payloads,
)
from django_warpmesh.node.transports.wakeup import WakePipe

if TYPE_CHECKING:
    import psycopg
    from psycopg import pq

__all__ = ["MAX_FRAME_BYTES", "PostgresTransport"]

logger = logging.getLogger("django_warpmesh")

# A channel is an identifier: at most NAMEDATALEN - 1 bytes. Lower case only, so the quoted name
# LISTEN uses and the string pg_notify takes are the same channel.
CHANNEL_RE = re.compile(r"[a-z0-9_]{1,63}")

# Frames queued for the sender thread, at most (a few seconds of a very busy node).
DEFAULT_SEND_CAPACITY = 8192
# One burst, at most: both bounds keep a statement (and the global NOTIFY lock its commit takes)
# short, so other processes' bursts are not held up behind ours.
MAX_BURST_FRAMES = 1000
MAX_BURST_CHARS = 1 << 20

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

# How long open_reply_inbox waits for the listener to have run LISTEN on the reply channel.
REPLY_LISTEN_WAIT = 2.0

NOTIFY_SQL = "SELECT pg_notify(c, p) FROM unnest(%b::text[], %b::text[]) AS t(c, p)"


def _conninfo(conninfo: str, application_name: str, settings: dict[str, str]) -> str:
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


class _Renew(Exception):
    """The other connection failed: this one, opened before that loss, is replaced too."""


class PostgresTransport(BrokerTransport):
    """Frames through ``LISTEN``/``NOTIFY`` on ``channel`` of the database ``conninfo`` names.

    ``conninfo`` is a libpq connection string or URI (it may hold a password: only
    ``display_url`` is ever shown). ``channel`` is a lower-case identifier such as
    :func:`~django_warpmesh.node.transports.base.channel_name` makes. ``send_capacity`` bounds
    the frames queued for the sender thread. A listening session receives every notification on
    its channel, this transport's own included: each frame sent comes back to this inbox too.
    """

    name = "postgresql"
    max_frame_bytes = MAX_FRAME_BYTES

    def __init__(
        self,
        conninfo: str,
        channel: str,
        *,
        inbox_capacity: int,
        display_url: str,
        send_capacity: int = DEFAULT_SEND_CAPACITY,
    ) -> None:
        if not CHANNEL_RE.fullmatch(channel):
            raise TransportError(
                f"bad PostgreSQL channel {channel!r}: 1 to 63 characters of a-z, 0-9 and _"
            )
        super().__init__(display_url, channel, inbox_capacity=inbox_capacity)
        self._listen_conninfo = _conninfo(conninfo, "warpmesh-listen", {})
        # A NOTIFY transaction commits (and flushes WAL) holding a lock global to the server;
        # waiting for that flush buys nothing, as notifications never outlive a server restart
        # anyway. Without the wait a commit costs about half as much (one frame a statement:
        # 958 vs 1790 commits/s on a local server), and the lock is released sooner for all.
        self._notify_conninfo = _conninfo(
            conninfo, "warpmesh-notify", {"synchronous_commit": "off"}
        )
        self._channel_bytes = channel.encode("ascii")
        self.send_capacity = send_capacity

        # Connection state; the lock also keeps connected/lost events in the order they happen.
        self._event_lock = threading.Lock()
        self._up: set[str] = set()
        # Bumped by each failure of a current connection. A connection opened before the latest
        # loss may have died in the same event without knowing it yet: "connected" is declared
        # only when both were opened since, so a loss renews both (see _Renew).
        self._epoch = 0
        self._failure_logged = False
        self.connect_failures = 0  # connections (either) that failed to open or broke
        self._close_lock = threading.Lock()
        self._started = False
        self._closed = False
        self._closing = threading.Event()  # close() began: refuse sends, flush, then stop
        self._stopping = threading.Event()  # the listener stops
        self._flush_deadline = 0.0
        self._listen_thread: threading.Thread | None = None
        self._notify_thread: threading.Thread | None = None
        self._listen_waker = WakePipe()
        self._notify_waker = WakePipe()
        self.listen_pid: int | None = None  # backend pids, to find them in pg_stat_activity
        self.notify_pid: int | None = None

        # Frames (and reply chunks) for the sender thread: (channel, payload).
        self._queue: collections.deque[tuple[str, str]] = collections.deque()
        self._queue_lock = threading.Lock()
        self._in_flight = 0
        self.frames_sent = 0
        self.round_trips = 0  # NOTIFY statements that succeeded
        self.largest_burst = 0
        self.send_refused = 0  # send() said False: not connected, queue full, frame too large
        self.send_lost = 0  # queued or in flight when the sender's connection failed
        self.send_failed = 0  # in a statement the server refused (a full queue, a timeout)
        self._send_failure_logged = False
        self.malformed = 0  # received payloads that were not ours to decode

        # Stats replies addressed to this node (mesh_status).
        self._reply_channel: str | None = None
        self._reply_channel_bytes = b""
        self._on_reply: Callable[[bytes], None] | None = None
        self._listening_reply: str | None = None  # on the listener's current connection
        self._reply_listening = threading.Event()
        self._replies = ReplyAssembler()

    # -- the node's side ----------------------------------------------------------------------

    def start(self, events: TransportEvents) -> None:
        with self._close_lock:
            if self._started or self._closed:
                return
            self._started = True
            self._events = events
            self._listen_thread = threading.Thread(
                target=self._run_listener, name="warpmesh-pg-listen", daemon=True
            )
            self._notify_thread = threading.Thread(
                target=self._run_notifier, name="warpmesh-pg-notify", daemon=True
            )
            self._listen_thread.start()
            self._notify_thread.start()

    def send(self, data: bytes) -> bool:
        if not data or len(data) > MAX_FRAME_BYTES:
            with self._queue_lock:
                self.send_refused += 1
            return False
        return self._enqueue(((self.channel, encode_payload(data)),))

    def open_reply_inbox(self, on_reply: Callable[[bytes], None]) -> str:
        """LISTEN on a channel of this node's own (``<channel>_r_<random hex>``); when connected,
        wait (briefly) until the listener has, so a request sent next is answered into it."""
        with self._close_lock:
            self._on_reply = on_reply
            channel = self._reply_channel
            if channel is None:
                channel = f"{self.channel[: 63 - 15]}_r_{secrets.token_hex(6)}"
                # The bytes first: the listener matches notifications against them once it
                # sees the channel (and LISTENs on it).
                self._reply_channel_bytes = channel.encode("ascii")
                self._reply_channel = channel
        self._listen_waker.wake()
        if self.connected:
            self._reply_listening.wait(REPLY_LISTEN_WAIT)
        return channel

    def send_reply(self, address: str, data: bytes) -> bool:
        if not CHANNEL_RE.fullmatch(address) or len(data) > MAX_REPLY_BYTES:
            return False
        return self._enqueue((address, payload) for payload in reply_payloads(data))

    def close(self, timeout: float) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + max(0.0, timeout)
        self._flush_deadline = deadline
        self._closing.set()
        self._notify_waker.wake()
        # The sender first, so what was queued goes out while we still listen.
        if self._notify_thread is not None:
            self._notify_thread.join(max(0.0, deadline - time.monotonic()))
        self._stopping.set()
        self._listen_waker.wake()
        if self._listen_thread is not None:
            self._listen_thread.join(max(0.0, deadline - time.monotonic()))
        else:
            # Never started: no thread will close them. A thread still running past the
            # deadline (a hung server) closes its own when its connection gives up.
            self._listen_waker.close()
            self._notify_waker.close()
        self.connected = False
        self.inbox.close()

    @property
    def replies_received(self) -> int:
        return self._replies.received

    @property
    def replies_dropped(self) -> int:
        return self._replies.dropped

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            connect_failures=self.connect_failures,
            max_frame_bytes=self.max_frame_bytes,
            queued=len(self._queue),
            send_capacity=self.send_capacity,
            frames_sent=self.frames_sent,
            round_trips=self.round_trips,
            frames_per_round_trip=(
                round(self.frames_sent / self.round_trips, 1) if self.round_trips else None
            ),
            largest_burst=self.largest_burst,
            send_refused=self.send_refused,
            send_lost=self.send_lost,
            send_failed=self.send_failed,
            malformed_received=self.malformed,
            reply_inbox=self._reply_channel,
            replies_received=self._replies.received,
            replies_dropped=self._replies.dropped,
            listen_pid=self.listen_pid,
            notify_pid=self.notify_pid,
        )
        return info

    # -- connection state ---------------------------------------------------------------------

    def _role_up(self, role: str, epoch: int) -> None:
        """``role``'s connection, opened at ``epoch``, is ready; raises _Renew if a loss
        happened since it was opened."""
        with self._event_lock:
            if epoch != self._epoch:
                raise _Renew
            self._up.add(role)
            if self.connected or self._closing.is_set() or len(self._up) < 2:
                return
            self.connected = True
            self.connects += 1
            self._failure_logged = False
            if self.connects == 1:
                logger.info("mesh: postgresql transport connected to %s", self.url)
            else:
                logger.info(
                    "mesh: postgresql transport reconnected to %s (disconnects so far: %d)",
                    self.url,
                    self.disconnects,
                )
            self._tell_node(lambda events: events.transport_connected())

    def _role_down(self, role: str, reason: str, epoch: int | None) -> None:
        """``role``'s connection failed (``epoch``: when it was opened; None if it never was)."""
        with self._event_lock:
            self._up.discard(role)
            self.last_error = f"{role}: {reason}"
            self.connect_failures += 1
            if self._closing.is_set():
                return
            if epoch == self._epoch:
                self._epoch += 1
                # The other thread sees its connection is now stale, and renews it.
                (self._notify_waker if role == "listen" else self._listen_waker).wake()
            if self.connected:
                self.connected = False
                self.disconnects += 1
                self._failure_logged = True
                logger.warning(
                    "mesh: postgresql transport lost its %s connection to %s (%s); reconnecting",
                    role,
                    self.url,
                    reason,
                )
                self._tell_node(
                    lambda events: events.transport_lost(f"postgresql {role}: {reason}")
                )
            elif not self._failure_logged:
                self._failure_logged = True
                logger.warning(
                    "mesh: postgresql transport cannot connect to %s (%s); retrying with backoff",
                    self.url,
                    reason,
                )

    def _renewing(self, role: str) -> None:
        with self._event_lock:
            self._up.discard(role)

    def _check_current(self, epoch: int) -> None:
        if epoch != self._epoch:
            raise _Renew

    def _connect(self, conninfo: str) -> psycopg.Connection[Any]:
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

    # -- the listener thread ------------------------------------------------------------------

    def _run_listener(self) -> None:
        from psycopg import sql

        failures = 0  # in a row
        try:
            while not self._stopping.is_set():
                conn = None
                epoch: int | None = None
                try:
                    opening = self._epoch
                    conn = self._connect(self._listen_conninfo)
                    epoch = opening
                    # Raw notifications (bytes), also those that arrive while LISTEN runs:
                    # psycopg's own handler would decode each payload to str first.
                    conn.pgconn.notify_handler = self._on_notify
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    self._listening_reply = None
                    self._listen_reply(conn)
                    self.listen_pid = conn.info.backend_pid
                    self._role_up("listen", epoch)
                    failures = 0
                    self._pump_notifications(conn, epoch)
                    with contextlib.suppress(Exception):
                        conn.execute("UNLISTEN *")
                except _Renew:
                    self._renewing("listen")
                except Exception as exc:
                    if self._stopping.is_set():
                        break
                    self._role_down("listen", error_line(exc), epoch)
                    failures += 1
                    self._stopping.wait(retry_delay(failures, RETRY_MIN, RETRY_MAX))
                finally:
                    self.listen_pid = None
                    if conn is not None:
                        conn.close()
        finally:
            self._listen_waker.close()

    def _listen_reply(self, conn: psycopg.Connection[Any]) -> None:
        from psycopg import sql

        channel = self._reply_channel
        if channel is None or channel == self._listening_reply:
            return
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        self._listening_reply = channel
        self._reply_listening.set()

    def _pump_notifications(self, conn: psycopg.Connection[Any], epoch: int) -> None:
        """Read notifications until stopped; raises when the connection fails or is stale."""
        from psycopg import OperationalError, pq

        pgconn = conn.pgconn
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        poller.register(self._listen_waker.fd, select.POLLIN)
        while True:
            # Before waiting: a statement (LISTEN) may have left notifications in libpq's
            # buffer, and the socket would not say so.
            while (notify := pgconn.notifies()) is not None:
                self._on_notify(notify)
            # Only a reply being reassembled needs a clock (to expire it).
            ready = poller.poll(1000 if self._replies.pending else None)
            if self._stopping.is_set():
                return
            for fd, _ in ready:
                if fd == self._listen_waker.fd:
                    self._listen_waker.clear()
                    self._check_current(epoch)
                    self._listen_reply(conn)
                    continue
                pgconn.consume_input()  # raises when the server hung up
                if pgconn.status != pq.ConnStatus.OK:
                    raise OperationalError("the connection is no longer usable")
            if self._replies.pending:
                self._replies.expire(time.monotonic())

    def _on_notify(self, notify: pq.PGnotify) -> None:
        if notify.relname == self._channel_bytes:
            data = decode_payload(notify.extra)
            if not data:
                self.malformed += 1
                return
            self.inbox.put(data)
        elif notify.relname == self._reply_channel_bytes:
            self._on_reply_chunk(notify.extra)

    # -- stats replies, on the listener thread ------------------------------------------------

    def _on_reply_chunk(self, payload: bytes) -> None:
        try:
            reply = self._replies.add(payload, time.monotonic())
        except MalformedPayload:
            self.malformed += 1
            return
        on_reply = self._on_reply
        if reply is None or on_reply is None:
            return
        try:
            on_reply(reply)
        except Exception:
            logger.exception("mesh: handling a stats reply failed")

    # -- the sender thread --------------------------------------------------------------------

    def _enqueue(self, items: Iterable[tuple[str, str]]) -> bool:
        batch = list(items)
        with self._queue_lock:
            if (
                not self.connected
                or self._closing.is_set()
                or len(self._queue) + len(batch) > self.send_capacity
            ):
                self.send_refused += len(batch)
                return False
            self._queue.extend(batch)
        self._notify_waker.wake()
        return True

    def _take_burst(self) -> list[tuple[str, str]]:
        burst: list[tuple[str, str]] = []
        chars = 0
        with self._queue_lock:
            queue = self._queue
            while queue and len(burst) < MAX_BURST_FRAMES and chars < MAX_BURST_CHARS:
                item = queue.popleft()
                burst.append(item)
                chars += len(item[1])
            self._in_flight = len(burst)
        return burst

    def _drop_queue(self) -> None:
        with self._queue_lock:
            self.send_lost += len(self._queue) + self._in_flight
            self._queue.clear()
            self._in_flight = 0

    def _run_notifier(self) -> None:
        failures = 0  # in a row
        try:
            while not self._closing.is_set():
                conn = None
                epoch: int | None = None
                try:
                    opening = self._epoch
                    conn = self._connect(self._notify_conninfo)
                    epoch = opening
                    self.notify_pid = conn.info.backend_pid
                    self._role_up("notify", epoch)
                    failures = 0
                    self._pump_bursts(conn, epoch)
                    return
                except _Renew:
                    self._renewing("notify")
                except Exception as exc:
                    if self._closing.is_set():
                        break
                    # Down first, so send() refuses before the queue is emptied.
                    self._role_down("notify", error_line(exc), epoch)
                    self._drop_queue()
                    failures += 1
                    self._closing.wait(retry_delay(failures, RETRY_MIN, RETRY_MAX))
                finally:
                    self.notify_pid = None
                    if conn is not None:
                        conn.close()
        finally:
            self._drop_queue()  # what close() had no time (or no connection) to send
            self._notify_waker.close()

    def _pump_bursts(self, conn: psycopg.Connection[Any], epoch: int) -> None:
        """Publish what is queued until closed and flushed; raises when the connection fails or
        is stale (what was queued while it was current is published first)."""
        from psycopg import OperationalError, pq

        pgconn = conn.pgconn
        poller = select.poll()
        # Readable while idle only when the server is ending the session: watched so a lost
        # sender is reported at once, not at the next frame.
        poller.register(conn.fileno(), select.POLLIN)
        poller.register(self._notify_waker.fd, select.POLLIN)
        while True:
            closing = self._closing.is_set()
            if closing and time.monotonic() >= self._flush_deadline:
                return
            self._notify_waker.clear()
            burst = self._take_burst()
            if burst:
                self._publish(conn, burst)
                continue
            if closing:
                return
            self._check_current(epoch)
            for fd, _ in poller.poll():
                if fd != self._notify_waker.fd:
                    pgconn.consume_input()
                    if pgconn.status != pq.ConnStatus.OK:
                        raise OperationalError("the connection is no longer usable")

    def _publish(self, conn: psycopg.Connection[Any], burst: list[tuple[str, str]]) -> None:
        import psycopg

        try:
            conn.execute(NOTIFY_SQL, ([c for c, _ in burst], [p for _, p in burst]))
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                raise
            # Refused by a healthy server (its notification queue full, a statement timeout):
            # these frames are lost, the connection is kept; peers see the sequence gap.
            with self._queue_lock:
                self._in_flight = 0
                self.send_failed += len(burst)
            self.last_error = f"notify: {error_line(exc)}"
            if not self._send_failure_logged:
                self._send_failure_logged = True
                logger.warning(
                    "mesh: postgresql transport could not publish %d frame(s): %s",
                    len(burst),
                    error_line(exc),
                )
            return
        with self._queue_lock:
            self._in_flight = 0
        if self._send_failure_logged:
            self._send_failure_logged = False
            logger.info("mesh: postgresql transport publishes again")
        self.frames_sent += len(burst)
        self.round_trips += 1
        self.largest_burst = max(self.largest_burst, len(burst))
