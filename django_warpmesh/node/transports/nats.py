"""NATS as a broker transport (``nats://host:4222``; the ``nats`` extra, nats-py).

Every process subscribes to one subject, the mesh's channel, on a NATS server (or cluster),
which fans each frame a process publishes out to every other subscriber. NATS keeps nothing: a
frame published while a process is disconnected never reaches it, which is why the node treats
``transport_lost`` as a gap.

Threads. nats-py is asyncio and not thread-safe, so one thread of ours, ``warpmesh-nats``,
runs an event loop that owns the client: every call into nats-py happens there
(:mod:`.nats_link`, one client at a time: :mod:`.nats_session`).
:meth:`NatsTransport.send` only appends the frame to an outbox under a lock and, once per
burst, wakes the loop (``call_soon_threadsafe`` writes to the loop's self-pipe); it never
touches the socket nor waits for the loop (:mod:`.nats_outbox`). The loop publishes the whole
outbox in one go. A frame takes about 0.3 ms from send() to another process's inbox
(scripts/nats_latency.py); but the loop needs the GIL three times on the way out (woken,
publish, nats-py's flusher), and while the sending thread keeps busy in Python each of those
can wait for the interpreter's switch interval (5 ms), so 5-15 ms then.

Reconnecting is ours, not nats-py's. Each connection is a fresh client with nats-py's own
reconnection off, because nats-py's: waits a fixed time between attempts (we back off
exponentially with a cap and jitter, so a restarted server is not hit by every process at the
same instant); keeps buffering publishes while disconnected and replays them into the next
connection, maybe minutes later, after the node has already treated the outage as a gap; and
reports ``reconnected`` from inside its machinery. Here a connection counts only once its
subscriptions are made and confirmed by a round trip (flush): only then is the node told
``transport_connected``, and what was queued for a dead connection is dropped, never replayed.

The server URLs and subjects are parsed and checked by :mod:`.nats_addresses`.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from django_warpmesh.node.stats import EventLog
from django_warpmesh.node.transports.base import BrokerTransport, TransportError, TransportEvents
from django_warpmesh.node.transports.nats_addresses import check_subject, parse_url
from django_warpmesh.node.transports.nats_link import NatsLink
from django_warpmesh.node.transports.nats_outbox import (
    DEFAULT_MAX_PAYLOAD,
    MAX_OUTBOX_BYTES,
    NatsOutbox,
)
from django_warpmesh.node.transports.nats_session import PING_INTERVAL, PING_TIMEOUT, import_nats

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "MAX_FRAME_BYTES",
    "MAX_OUTBOX_BYTES",
    "NatsTransport",
    "check_subject",
    "parse_url",
]

# The largest frame the node may be configured for (its MAX_FRAME_BYTES, 4 KiB by default). Far
# below any max_payload a NATS server is configured with in practice (1 MiB by default, 64 MiB
# at most), so the check at node start never depends on a server that may not be up yet, and a
# frame stays one cheap publish that never waits behind a large one.
MAX_FRAME_BYTES = 64 * 1024


class NatsTransport(BrokerTransport):
    """Frames through a NATS server: see the module's docstring."""

    name = "nats"
    max_frame_bytes = MAX_FRAME_BYTES

    def __init__(
        self, url: str, channel: str, *, inbox_capacity: int, connect_timeout: float = 2.0
    ) -> None:
        servers, shown = parse_url(url)
        check_subject(channel)
        import_nats()
        super().__init__(shown, channel, inbox_capacity=inbox_capacity)
        self.connect_timeout = connect_timeout
        self.server: str | None = None  # the server connected to now, as shown
        self.rtt: float | None = None  # the last ping's round trip, in seconds
        # Class constants, per instance so that a test can shorten them.
        self.ping_interval = PING_INTERVAL
        self.ping_timeout = PING_TIMEOUT
        self._log = EventLog(time.monotonic)
        self._lock = threading.Lock()  # start() and close()
        self._started = False
        self._closed = False
        self._link = NatsLink(self, servers)
        # send() accepts while the link has a connection: that is what ``connected`` says.
        self.outbox = NatsOutbox(wake=self._link.wake, on_accepting=self._set_connected)

    @property
    def send_dropped(self) -> int:
        """Accepted by send(), then dropped: their connection was lost."""
        return self.outbox.dropped

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected

    def start(self, events: TransportEvents) -> None:
        with self._lock:
            if self._closed:
                raise TransportError("this NATS transport is closed")
            if self._started:
                raise TransportError("this NATS transport is already started")
            self._started = True
            self._events = events
            self._link.start()

    def send(self, data: bytes) -> bool:
        return self.outbox.put(self.channel, data)

    def open_reply_inbox(self, on_reply: Callable[[bytes], None]) -> str:
        address = f"{self.channel}.reply.{secrets.token_hex(8)}"
        self.outbox.add_reply_inbox(address, on_reply)
        return address

    def send_reply(self, address: str, data: bytes) -> bool:
        if not address.startswith(f"{self.channel}.reply."):
            # Only a reply inbox of this mesh: a confused request cannot make us publish
            # anywhere else on the server.
            self._log.once("reply-address", "mesh: not a NATS reply inbox: %r", address)
            return False
        max_payload = self.outbox.max_payload
        if len(data) > max_payload:
            self._log.once(
                "reply-size",
                "mesh: a %d-byte stats reply is over the NATS server's max_payload (%d); not sent",
                len(data),
                max_payload,
            )
            return False
        return self.outbox.put(address, data)

    def close(self, timeout: float) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.outbox.close()  # send() refuses from now on; what it accepted is flushed
        self._link.stop(timeout)
        self.inbox.close()

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "server": self.server,
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "max_payload": self.outbox.max_payload,
            "pending_bytes": self.outbox.size,
            "send_dropped": self.outbox.dropped,
        }
