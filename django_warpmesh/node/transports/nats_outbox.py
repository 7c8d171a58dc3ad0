"""What any thread hands the NATS transport's loop: frames and stats replies to publish, and
reply inboxes to subscribe. The one state both sides share, under one lock.

A send never touches the socket nor waits for the loop: it appends to the outbox and, once per
burst, wakes the loop, which then publishes the whole outbox in one go.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

# nats-server's default max_payload. The real limit is the server's (its INFO says it), known
# once connected: a frame or reply above it is refused rather than sent, as the server would
# close the connection over it.
DEFAULT_MAX_PAYLOAD = 1024 * 1024
# Bytes queued by send()/send_reply() that the loop has not handed to nats-py yet. Bounded so
# that a stuck loop or a slow server costs refused sends (gaps, which the node recovers from)
# rather than unbounded memory; room for several 1 MiB stats replies at once.
MAX_OUTBOX_BYTES = 4 * 1024 * 1024
# What a queued frame costs besides its bytes (the tuple, the deque slot): counted so that a
# burst of tiny frames is bounded too.
FRAME_OVERHEAD = 64

Batch = collections.deque[tuple[str, bytes]]
ReplyHandler = Callable[[bytes], None]


class NatsOutbox:
    """``(subject, data)`` items queued for the loop, oldest first, and the reply inboxes.

    Accepts items only while a connection takes them (from :meth:`open` to :meth:`lose` or
    :meth:`refuse`, and never once closed); ``on_accepting`` is told whether it does each time
    that is decided, under the lock (it keeps the transport's ``connected``). ``wake`` is
    called (outside the lock) for the first item queued since the loop last found the outbox
    empty: one wake-up per burst.
    """

    def __init__(self, *, wake: Callable[[], None], on_accepting: Callable[[bool], None]) -> None:
        self._wake = wake
        self._on_accepting = on_accepting
        self._lock = threading.Lock()
        self._items: Batch = collections.deque()
        self.size = 0  # bytes queued, FRAME_OVERHEAD each included
        self.max_payload = DEFAULT_MAX_PAYLOAD  # the server's, once connected
        self.dropped = 0  # accepted, then dropped: their connection was lost
        self._accepting = False
        self._closed = False
        self._wake_scheduled = False  # a wake-up is on its way: later items need not send one
        self._replies: dict[str, ReplyHandler] = {}
        self._new_replies: list[str] = []  # opened while connected: to subscribe on the loop

    # -- any thread ----------------------------------------------------------------------------

    def put(self, subject: str, data: bytes) -> bool:
        size = len(data) + FRAME_OVERHEAD
        with self._lock:
            if (
                not self._accepting
                or len(data) > self.max_payload
                or self.size + size > MAX_OUTBOX_BYTES
            ):
                return False
            self._items.append((subject, data))
            self.size += size
            if self._wake_scheduled:
                return True  # the loop will take this one with the others: one wake per burst
            self._wake_scheduled = True
        self._wake()
        return True

    def add_reply_inbox(self, address: str, on_reply: ReplyHandler) -> None:
        with self._lock:
            self._replies[address] = on_reply
            self._new_replies.append(address)
            # Subscribed before anything sent after this call: the publishing task subscribes
            # first, and the server handles one connection's commands in order.
            wake = self._accepting and not self._wake_scheduled
            self._wake_scheduled = self._wake_scheduled or wake
        if wake:
            self._wake()

    def close(self) -> None:
        """Refuse for good; what was accepted stays, for the loop to flush."""
        with self._lock:
            self._closed = True
            self._set_accepting(False)

    # -- the loop's thread ---------------------------------------------------------------------

    def open(self, max_payload: int) -> None:
        """A connection takes items from now on (unless closed): anything queued by a send that
        raced the previous connection's loss is stale, and goes."""
        with self._lock:
            self._items.clear()
            self.size = 0
            self._wake_scheduled = False
            self.max_payload = max_payload
            self._set_accepting(not self._closed)

    def lose(self) -> None:
        """The connection is lost: refuse, and drop (counted) what it did not take."""
        with self._lock:
            self._set_accepting(False)
            self.dropped += len(self._items)
            self._items.clear()
            self.size = 0

    def refuse(self) -> None:
        """The loop's thread ends."""
        with self._lock:
            self._set_accepting(False)

    def take(self) -> Batch | None:
        """Everything queued, or None (and the next item queued wakes the loop)."""
        with self._lock:
            if not self._items:
                self._wake_scheduled = False
                return None
            return self._take_all()

    def take_all(self) -> Batch:
        with self._lock:
            return self._take_all()

    def put_back(self, batch: Batch) -> None:
        """Items taken but not published, back at the head (closing: to be flushed; ``size``
        no longer matters)."""
        with self._lock:
            self._items.extendleft(reversed(batch))

    def count_dropped(self, count: int) -> None:
        with self._lock:
            self.dropped += count

    def reply_inboxes(self) -> list[tuple[str, ReplyHandler]]:
        """Every reply inbox: a new connection subscribes them all."""
        with self._lock:
            self._new_replies.clear()
            return list(self._replies.items())

    def new_reply_inboxes(self) -> list[tuple[str, ReplyHandler]]:
        """The reply inboxes opened since the last call."""
        with self._lock:
            addresses, self._new_replies = self._new_replies, []
            return [(address, self._replies[address]) for address in addresses]

    def _take_all(self) -> Batch:
        batch, self._items = self._items, collections.deque()
        self.size = 0
        return batch

    def _set_accepting(self, accepting: bool) -> None:
        self._accepting = accepting
        self._on_accepting(accepting)
