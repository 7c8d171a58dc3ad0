"""The PostgreSQL transport's sender: a queue of payloads and a thread (``warpmesh-pg-notify``)
with a session of its own that publishes them.

It publishes all that is queued in one statement (``SELECT pg_notify(c, p) FROM unnest(...)``):
one round trip and one transaction per burst. Notifications are queued at commit under a lock
global to the server, so one commit per burst instead of one per frame is what keeps a busy mesh
from serialising on that lock. While the sender is idle a frame goes out at once, alone; under
load frames pile up behind the statement in flight and go out together in the next.

Payloads queued but not yet published when the session fails are dropped and counted
(``send_lost``), never sent late.
"""

from __future__ import annotations

import collections
import logging
import select
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from django_warpmesh.node.transports.base import error_line
from django_warpmesh.node.transports.postgresql_sessions import (
    SessionPair,
    SessionThread,
    read_server,
)

if TYPE_CHECKING:
    import psycopg

logger = logging.getLogger("django_warpmesh")

# One burst, at most: both bounds keep a statement (and the global NOTIFY lock its commit takes)
# short, so other processes' bursts are not held up behind ours.
MAX_BURST_FRAMES = 1000
MAX_BURST_CHARS = 1 << 20

NOTIFY_SQL = "SELECT pg_notify(c, p) FROM unnest(%b::text[], %b::text[]) AS t(c, p)"


class Sender(SessionThread):
    """Publishes what :meth:`enqueue` queued, in order, at most ``capacity`` waiting. ``closing``
    (the pair's) ends it: what is queued by then is published first, until the deadline given
    to :meth:`stop`."""

    role = "notify"

    def __init__(
        self, pair: SessionPair, conninfo: str, closing: threading.Event, capacity: int
    ) -> None:
        super().__init__(pair, conninfo, closing, "warpmesh-pg-notify")
        self.capacity = capacity
        self._flush_deadline = 0.0
        # Frames (and reply chunks) to publish: (channel, payload).
        self._queue: collections.deque[tuple[str, str]] = collections.deque()
        self._queue_lock = threading.Lock()
        self._in_flight = 0
        self.frames_sent = 0
        self.round_trips = 0  # NOTIFY statements that succeeded
        self.largest_burst = 0
        self.refused = 0  # not queued: not connected, queue full, frame too large
        self.lost = 0  # queued or in flight when the session failed
        self.failed = 0  # in a statement the server refused (a full queue, a timeout)
        self._failure_logged = False

    def __len__(self) -> int:
        return len(self._queue)

    def enqueue(self, items: Iterable[tuple[str, str]]) -> bool:
        """Queue ``(channel, payload)`` items, all or (refused, counted) none."""
        batch = list(items)
        with self._queue_lock:
            if (
                not self._pair.connected
                or self._stop.is_set()
                or len(self._queue) + len(batch) > self.capacity
            ):
                self.refused += len(batch)
                return False
            self._queue.extend(batch)
        self.waker.wake()
        return True

    def count_refused(self) -> None:
        """One frame refused before it reached the queue."""
        with self._queue_lock:
            self.refused += 1

    def stop(self, deadline: float) -> None:
        self._flush_deadline = deadline
        super().stop(deadline)

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

    def _drop_unsent(self) -> None:
        # After a failure the link is down already: enqueue() refuses before the queue is
        # emptied. At the end, this is what close() had no time (or no session) to send.
        with self._queue_lock:
            self.lost += len(self._queue) + self._in_flight
            self._queue.clear()
            self._in_flight = 0

    def _serve(self, conn: psycopg.Connection[Any], epoch: int) -> None:
        """Publish what is queued until closed and flushed; raises when the session fails or is
        stale (what was queued while it was current is published first)."""
        pgconn = conn.pgconn
        poller = select.poll()
        # Readable while idle only when the server is ending the session: watched so a lost
        # sender is reported at once, not at the next frame.
        poller.register(conn.fileno(), select.POLLIN)
        poller.register(self.waker.fd, select.POLLIN)
        while True:
            closing = self._stop.is_set()
            if closing and time.monotonic() >= self._flush_deadline:
                return
            self.waker.clear()
            burst = self._take_burst()
            if burst:
                self._publish(conn, burst)
                continue
            if closing:
                return
            self._pair.check_current(epoch)
            for fd, _ in poller.poll():
                if fd != self.waker.fd:
                    read_server(pgconn)

    def _publish(self, conn: psycopg.Connection[Any], burst: list[tuple[str, str]]) -> None:
        import psycopg

        try:
            conn.execute(NOTIFY_SQL, ([c for c, _ in burst], [p for _, p in burst]))
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                raise
            # Refused by a healthy server (its notification queue full, a statement timeout):
            # these frames are lost, the session is kept; peers see the sequence gap.
            with self._queue_lock:
                self._in_flight = 0
                self.failed += len(burst)
            self._pair.note_error(self.role, error_line(exc))
            if not self._failure_logged:
                self._failure_logged = True
                logger.warning(
                    "mesh: postgresql transport could not publish %d frame(s): %s",
                    len(burst),
                    error_line(exc),
                )
            return
        with self._queue_lock:
            self._in_flight = 0
        if self._failure_logged:
            self._failure_logged = False
            logger.info("mesh: postgresql transport publishes again")
        self.frames_sent += len(burst)
        self.round_trips += 1
        self.largest_burst = max(self.largest_burst, len(burst))
