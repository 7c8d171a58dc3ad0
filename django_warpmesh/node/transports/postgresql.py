"""PostgreSQL ``LISTEN``/``NOTIFY`` as a broker transport (the ``postgresql`` extra: psycopg 3).

Every process of the mesh listens on one channel of the database it already has, and publishes
its frames there with ``pg_notify``: the server fans each one out to every listening session,
this process's own included (a session receives the notifications of every session, its own
sender's too; the node drops frames of its own origin, as it does on the nng bus).

Two connections, both autocommit, each with a daemon thread of its own
(:mod:`.postgresql_sessions`):

* the listener (``warpmesh-pg-listen``, :mod:`.postgresql_listener`) runs ``LISTEN`` and then
  only reads notifications into the inbox, even when the inbox is full: a session that stops
  reading holds back PostgreSQL's notification queue, global to the server.
* the sender (``warpmesh-pg-notify``, :mod:`.postgresql_sender`) takes what
  :meth:`PostgresTransport.send` queued and publishes all of it in one statement: one round trip
  and one commit (under a lock global to the server) per burst, not per frame.

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

These modules import psycopg only when a transport is built, so the node's packages import
without the extra installed.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any

from django_warpmesh.node.transports.base import BrokerTransport, TransportError, TransportEvents
from django_warpmesh.node.transports.postgresql_listener import Listener
from django_warpmesh.node.transports.postgresql_payloads import (
    MAX_FRAME_BYTES,
    MAX_REPLY_BYTES,
    encode_payload,
    reply_payloads,
)
from django_warpmesh.node.transports.postgresql_sender import Sender
from django_warpmesh.node.transports.postgresql_sessions import SessionPair, session_conninfo

__all__ = ["MAX_FRAME_BYTES", "PostgresTransport"]

# A channel is an identifier: at most NAMEDATALEN - 1 bytes. Lower case only, so the quoted name
# LISTEN uses and the string pg_notify takes are the same channel.
CHANNEL_RE = re.compile(r"[a-z0-9_]{1,63}")

# Frames queued for the sender thread, at most (a few seconds of a very busy node).
DEFAULT_SEND_CAPACITY = 8192


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
        listen_conninfo = session_conninfo(conninfo, "warpmesh-listen", {})
        # A NOTIFY transaction commits (and flushes WAL) holding a lock global to the server;
        # waiting for that flush buys nothing, as notifications never outlive a server restart
        # anyway. Without the wait a commit costs about half as much (one frame a statement:
        # 958 vs 1790 commits/s on a local server), and the lock is released sooner for all.
        notify_conninfo = session_conninfo(
            conninfo, "warpmesh-notify", {"synchronous_commit": "off"}
        )
        self._close_lock = threading.Lock()
        self._started = False
        self._closed = False
        closing = threading.Event()  # close() began: refuse sends, flush, then stop
        self._sessions = SessionPair(self, closing)
        self._listener = Listener(self._sessions, listen_conninfo, channel, self.inbox)
        self._sender = Sender(self._sessions, notify_conninfo, closing, send_capacity)

    # What tests and the operator look at, besides describe().

    @property
    def connect_failures(self) -> int:
        """Connections (either) that failed to open or broke."""
        return self._sessions.failures

    @property
    def listen_pid(self) -> int | None:
        """The listener's backend pid, to find it in ``pg_stat_activity``."""
        return self._listener.pid

    @property
    def notify_pid(self) -> int | None:
        """The sender's backend pid."""
        return self._sender.pid

    @property
    def malformed(self) -> int:
        """Received payloads that were not ours to decode."""
        return self._listener.malformed

    @property
    def replies_received(self) -> int:
        return self._listener.replies.received

    @property
    def replies_dropped(self) -> int:
        return self._listener.replies.dropped

    def start(self, events: TransportEvents) -> None:
        with self._close_lock:
            if self._started or self._closed:
                return
            self._started = True
            self._events = events
            self._listener.start()
            self._sender.start()

    def send(self, data: bytes) -> bool:
        if not data or len(data) > MAX_FRAME_BYTES:
            self._sender.count_refused()
            return False
        return self._sender.enqueue(((self.channel, encode_payload(data)),))

    def open_reply_inbox(self, on_reply: Callable[[bytes], None]) -> str:
        return self._listener.open_reply_channel(on_reply)

    def send_reply(self, address: str, data: bytes) -> bool:
        if not CHANNEL_RE.fullmatch(address) or len(data) > MAX_REPLY_BYTES:
            return False
        return self._sender.enqueue((address, payload) for payload in reply_payloads(data))

    def close(self, timeout: float) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + max(0.0, timeout)
        # The sender first, so what was queued goes out while we still listen.
        self._sender.stop(deadline)
        self._listener.stop(deadline)
        self.connected = False
        self.inbox.close()

    def describe(self) -> dict[str, Any]:
        sender, listener = self._sender, self._listener
        info = super().describe()
        info.update(
            connect_failures=self.connect_failures,
            max_frame_bytes=self.max_frame_bytes,
            queued=len(sender),
            send_capacity=sender.capacity,
            frames_sent=sender.frames_sent,
            round_trips=sender.round_trips,
            frames_per_round_trip=(
                round(sender.frames_sent / sender.round_trips, 1) if sender.round_trips else None
            ),
            largest_burst=sender.largest_burst,
            send_refused=sender.refused,
            send_lost=sender.lost,
            send_failed=sender.failed,
            malformed_received=listener.malformed,
            reply_inbox=listener.reply_channel,
            replies_received=listener.replies.received,
            replies_dropped=listener.replies.dropped,
            listen_pid=listener.pid,
            notify_pid=sender.pid,
        )
        return info
