"""The interface between the node and a broker transport (NATS, PostgreSQL ``LISTEN/NOTIFY``).

A broker transport carries opaque, already signed frames: it never parses one. It owns one
connection to its server and a thread of its own that keeps it up (reconnecting with backoff,
forever, until closed), and it tells the node when the link is up or gone
(:class:`TransportEvents`): while it is gone, frames published by other processes are lost to
this one, which the node treats as a gap.

Threads: :meth:`BrokerTransport.send` is called by any thread of the node (a writing thread
sending its own invalidation, or the sender thread), never concurrently (the node holds its
send lock). :meth:`BrokerTransport.receive` is called by the thread that holds the node's drain
lock. The events are called on the transport's own thread.
"""

from __future__ import annotations

import abc
import collections
import hashlib
import logging
import random
import re
import threading
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from django_warpmesh.node.transports.wakeup import WakePipe

logger = logging.getLogger("django_warpmesh")

# The user (and password) part of a URL: "//user:password@host".
_USERINFO = re.compile(r"(?<=//)[^/@]*@")


class TransportError(Exception):
    """A transport that cannot be used as configured (a bad URL, a missing extra), or a frame
    it could not send (the node counts it in ``send_errors``; peers see the sequence gap)."""


class TransportClosed(Exception):
    """The transport was closed: the thread using it stops."""


class Received(NamedTuple):
    """One frame off a transport: its bytes, and where it came from (an nng pipe, which the
    node binds to the peer that speaks on it; None from a broker, which has one link)."""

    data: bytes
    source: Any


class Transport(Protocol):
    """What the node needs of whatever carries its frames: send bytes, receive bytes, a
    descriptor to wait on. The nng mesh (:mod:`.nng`) and the brokers implement it."""

    name: str

    def send(self, data: bytes) -> bool:
        """Send one frame to every peer without blocking. False: not sent (nng: closed, the
        node is stopping; a broker: refused, counted by the node in ``send_errors``); raises
        :class:`TransportError` for a frame it could not send."""

    def receive(self, limit: int) -> list[Received]:
        """Up to ``limit`` frames waiting, oldest first; never blocks. Raises
        :class:`TransportClosed` once closed."""

    @property
    def recv_fd(self) -> int:
        """Readable while frames wait."""

    def describe(self) -> dict[str, Any]:
        """What stats, ``mesh_status`` and the dashboard show of the transport."""


class TransportEvents(Protocol):
    """What a transport tells the node, from the transport's own thread."""

    def transport_connected(self) -> None:
        """The link is up and subscribed: every frame published from now on reaches us."""

    def transport_lost(self, reason: str) -> None:
        """The link went: frames published meanwhile may never reach us."""


class FrameInbox:
    """Frames received on a transport's thread, waiting for the node's drain.

    ``fd`` is readable while frames wait, so the node's receiver can ``poll`` it as it polls
    nng's receive descriptor, and a reading thread can check it with ``poll(0)``. Bounded: past
    ``capacity`` frames a new one is dropped and counted (the node then sees a sequence gap and
    flushes, as for a full nng buffer).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.dropped = 0
        self._frames: collections.deque[bytes] = collections.deque()
        self._lock = threading.Lock()
        # Woken and cleared under _lock, with the frames it signals: readable exactly while
        # frames wait.
        self._waiting = WakePipe()
        self._closed = False

    @property
    def fd(self) -> int:
        return self._waiting.fd

    def put(self, data: bytes) -> bool:
        """Queue one received frame (on the transport's thread); False if it was dropped."""
        with self._lock:
            if self._closed or len(self._frames) >= self.capacity:
                self.dropped += 1
                return False
            self._frames.append(data)
            self._waiting.wake()
        return True

    def take(self, limit: int) -> list[bytes]:
        """Up to ``limit`` waiting frames, oldest first; never blocks."""
        with self._lock:
            frames = self._frames
            count = min(limit, len(frames))
            taken = [frames.popleft() for _ in range(count)]
            if not frames:
                self._waiting.clear()
            return taken

    def __len__(self) -> int:
        return len(self._frames)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._frames.clear()
        self._waiting.close()


class BrokerTransport(abc.ABC):
    """One connection to a message broker that fans every frame out to every subscriber.

    Subclasses set ``name`` (``"nats"``, ``"postgresql"``) and ``max_frame_bytes`` (the largest
    frame they can carry; the node refuses a ``MAX_FRAME_BYTES`` above it at start), and
    implement the abstract methods. ``url`` is what stats and ``mesh_status`` show: never a
    password.
    """

    name: str = ""
    max_frame_bytes: int = 0

    def __init__(self, url: str, channel: str, *, inbox_capacity: int) -> None:
        self.url = url
        self.channel = channel
        self.inbox = FrameInbox(inbox_capacity)
        self.connected = False
        self.connects = 0  # successful connections, the first included
        self.disconnects = 0
        self.last_error: str | None = None
        self._events: TransportEvents | None = None  # set by start()

    @abc.abstractmethod
    def start(self, events: TransportEvents) -> None:
        """Start the transport's thread, which connects, subscribes, then calls
        ``events.transport_connected()``; returns at once (never waits for the server)."""

    @abc.abstractmethod
    def send(self, data: bytes) -> bool:
        """Publish one frame to every subscriber. Never blocks on the network: False if it
        could not be queued (not connected, its buffer full); the node counts it and peers see
        the sequence gap."""

    def receive(self, limit: int) -> list[Received]:
        """Frames received since the last call (at most ``limit``); never blocks."""
        return [Received(data, None) for data in self.inbox.take(limit)]

    @property
    def recv_fd(self) -> int:
        """Readable while received frames wait (see :class:`FrameInbox`)."""
        return self.inbox.fd

    @abc.abstractmethod
    def open_reply_inbox(self, on_reply: Callable[[bytes], None]) -> str:
        """Start receiving stats replies addressed to this node (an observer: ``mesh_status``);
        returns the address peers send them to. ``on_reply`` runs on the transport's thread."""

    @abc.abstractmethod
    def send_reply(self, address: str, data: bytes) -> bool:
        """Send one stats reply (up to 1 MiB) to the inbox at ``address`` only; never blocks
        on the network."""

    @abc.abstractmethod
    def close(self, timeout: float) -> None:
        """Send what was queued (waiting at most ``timeout`` seconds), then disconnect and stop
        the thread. Idempotent. The inbox is closed last."""

    def describe(self) -> dict[str, Any]:
        """What stats, ``mesh_status`` and the dashboard show of the transport."""
        return {
            "name": self.name,
            "url": self.url,
            "channel": self.channel,
            "connected": self.connected,
            "connects": self.connects,
            "disconnects": self.disconnects,
            "last_error": self.last_error,
            "inbox_dropped": self.inbox.dropped,
        }

    def tell_node(self, call: Callable[[TransportEvents], None]) -> None:
        """Call one of the node's event handlers: for the transport's own threads."""
        if self._events is None:
            return
        try:
            call(self._events)
        except Exception:
            # The node's handler failing must not kill the thread that keeps the link up.
            logger.exception("mesh: the node failed handling a %s transport event", self.name)


def channel_name(key: bytes, prefix: str = "warpmesh") -> str:
    """A subject/channel per mesh, derived from (never revealing) its frame key: processes of
    other projects on the same broker use another one, and never see our frames."""
    fingerprint = hashlib.blake2b(key, digest_size=6, person=b"warpmesh-chan").hexdigest()
    return f"{prefix}_{fingerprint}"


def retry_delay(failures: int, first: float, cap: float) -> float:
    """How long to wait after ``failures`` connection attempts failed in a row: ``first``,
    doubling up to ``cap``, each times a random 0.5-1, so that the processes that lost the server
    together do not all come back in the same instant."""
    # The exponent capped too: a server down for hours must not overflow the float (2.0 ** 1024).
    doublings = min(max(failures - 1, 0), 64)
    return min(cap, first * 2.0**doublings) * random.uniform(0.5, 1.0)


def redact_userinfo(text: str) -> str:
    """``text`` with the ``user:password@`` of any URL in it replaced by ``***@``."""
    return _USERINFO.sub("***@", text)


def error_line(exc: BaseException) -> str:
    """An error as ``last_error`` and the logs show it: one line (a server's messages run over
    several), no password of a URL it quotes, the exception's type if it says nothing."""
    lines = str(exc).strip().splitlines()
    return redact_userinfo(lines[0]) if lines else type(exc).__name__
