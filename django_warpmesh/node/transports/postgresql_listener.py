"""The PostgreSQL transport's listener: a session that runs ``LISTEN`` on the mesh's channel
(and on this node's reply channel, once it has one), and a thread (``warpmesh-pg-listen``)
that then only reads notifications.

It reads its socket even when the inbox is full (dropping, and counting, what does not fit): a
session that stops reading holds back the tail of PostgreSQL's notification queue, which is
global to the server, and once that queue is full every ``NOTIFY`` of the cluster fails.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import select
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django_warpmesh.node.transports.base import FrameInbox
from django_warpmesh.node.transports.postgresql_payloads import (
    MalformedPayload,
    ReplyAssembler,
    decode_payload,
)
from django_warpmesh.node.transports.postgresql_sessions import (
    SessionPair,
    SessionThread,
    read_server,
)

if TYPE_CHECKING:
    import psycopg
    from psycopg import pq

logger = logging.getLogger("django_warpmesh")

# How long open_reply_channel waits for the listener to have run LISTEN on the reply channel.
REPLY_LISTEN_WAIT = 2.0


class Listener(SessionThread):
    """Frames notified on ``channel`` into ``inbox``; stats replies notified on this node's
    reply channel (see :meth:`open_reply_channel`) put back together and handed over."""

    role = "listen"

    def __init__(self, pair: SessionPair, conninfo: str, channel: str, inbox: FrameInbox) -> None:
        super().__init__(pair, conninfo, threading.Event(), "warpmesh-pg-listen")
        self._channel = channel
        self._channel_bytes = channel.encode("ascii")
        self._inbox = inbox
        self.malformed = 0  # received payloads that were not ours to decode

        self._reply_lock = threading.Lock()
        self.reply_channel: str | None = None
        self._reply_channel_bytes = b""
        self._on_reply: Callable[[bytes], None] | None = None
        self._listening_reply: str | None = None  # on the current session
        self._reply_listening = threading.Event()
        self.replies = ReplyAssembler()

    def open_reply_channel(self, on_reply: Callable[[bytes], None]) -> str:
        """LISTEN on a channel of this node's own (``<channel>_r_<random hex>``); when connected,
        wait (briefly) until the listener has, so a request sent next is answered into it."""
        with self._reply_lock:
            self._on_reply = on_reply
            channel = self.reply_channel
            if channel is None:
                channel = f"{self._channel[: 63 - 15]}_r_{secrets.token_hex(6)}"
                # The bytes first: the listener matches notifications against them once it
                # sees the channel (and LISTENs on it).
                self._reply_channel_bytes = channel.encode("ascii")
                self.reply_channel = channel
        self.waker.wake()
        if self._pair.connected:
            self._reply_listening.wait(REPLY_LISTEN_WAIT)
        return channel

    def _prepare(self, conn: psycopg.Connection[Any]) -> None:
        from psycopg import sql

        # Raw notifications (bytes), also those that arrive while LISTEN runs: psycopg's own
        # handler would decode each payload to str first.
        conn.pgconn.notify_handler = self._on_notify
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
        self._listening_reply = None
        self._listen_reply(conn)

    def _listen_reply(self, conn: psycopg.Connection[Any]) -> None:
        from psycopg import sql

        channel = self.reply_channel
        if channel is None or channel == self._listening_reply:
            return
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        self._listening_reply = channel
        self._reply_listening.set()

    def _serve(self, conn: psycopg.Connection[Any], epoch: int) -> None:
        """Read notifications until stopped; raises when the session fails or is stale."""
        pgconn = conn.pgconn
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        poller.register(self.waker.fd, select.POLLIN)
        while True:
            # Before waiting: a statement (LISTEN) may have left notifications in libpq's
            # buffer, and the socket would not say so.
            while (notify := pgconn.notifies()) is not None:
                self._on_notify(notify)
            # Only a reply being reassembled needs a clock (to expire it).
            ready = poller.poll(1000 if self.replies.pending else None)
            if self._stop.is_set():
                break
            for fd, _ in ready:
                if fd == self.waker.fd:
                    self.waker.clear()
                    self._pair.check_current(epoch)
                    self._listen_reply(conn)
                else:
                    read_server(pgconn)
            if self.replies.pending:
                self.replies.expire(time.monotonic())
        with contextlib.suppress(Exception):
            conn.execute("UNLISTEN *")

    def _on_notify(self, notify: pq.PGnotify) -> None:
        if notify.relname == self._channel_bytes:
            data = decode_payload(notify.extra)
            if not data:
                self.malformed += 1
                return
            self._inbox.put(data)
        elif notify.relname == self._reply_channel_bytes:
            self._on_reply_chunk(notify.extra)

    def _on_reply_chunk(self, payload: bytes) -> None:
        try:
            reply = self.replies.add(payload, time.monotonic())
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
