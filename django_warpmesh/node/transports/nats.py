"""NATS as a broker transport (``nats://host:4222``; the ``nats`` extra, nats-py).

Every process subscribes to one subject, the mesh's channel, on a NATS server (or cluster),
which fans each frame a process publishes out to every other subscriber. NATS keeps nothing: a
frame published while a process is disconnected never reaches it, which is why the node treats
``transport_lost`` as a gap.

Threads. nats-py is asyncio and not thread-safe, so one thread of ours, ``warpmesh-nats``,
runs an event loop that owns the client: every call into nats-py happens there.
:meth:`NatsTransport.send` only appends the frame to an outbox under a lock and, once per
burst, wakes the loop (``call_soon_threadsafe`` writes to the loop's self-pipe); it never
touches the socket nor waits for the loop. The loop publishes the whole outbox in one go.
A frame takes about 0.3 ms from send() to another process's inbox (scripts/nats_latency.py);
but the loop needs the GIL three times on the way out (woken, publish, nats-py's flusher), and
while the sending thread keeps busy in Python each of those can wait for the interpreter's
switch interval (5 ms), so 5-15 ms then.

Reconnecting is ours, not nats-py's. Each connection is a fresh client with nats-py's own
reconnection off, because nats-py's: waits a fixed time between attempts (we back off
exponentially with a cap and jitter, so a restarted server is not hit by every process at the
same instant); keeps buffering publishes while disconnected and replays them into the next
connection, maybe minutes later, after the node has already treated the outage as a gap; and
reports ``reconnected`` from inside its machinery. Here a connection counts only once its
subscriptions are made and confirmed by a round trip (flush): only then is the node told
``transport_connected``, and what was queued for a dead connection is dropped, never replayed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from django_warpmesh.node.stats import EventLog
from django_warpmesh.node.transports.base import (
    BrokerTransport,
    TransportError,
    TransportEvents,
    error_line,
    retry_delay,
)
from django_warpmesh.node.transports.nats_addresses import check_subject, parse_url, shown_url

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

__all__ = ["DEFAULT_MAX_PAYLOAD", "MAX_FRAME_BYTES", "NatsTransport", "check_subject", "parse_url"]

logger = logging.getLogger("django_warpmesh")

# nats-server's default max_payload. The real limit is the server's (its INFO says it), known
# once connected: a frame or reply above it is refused rather than sent, as the server would
# close the connection over it.
DEFAULT_MAX_PAYLOAD = 1024 * 1024
# The largest frame the node may be configured for (its MAX_FRAME_BYTES, 4 KiB by default). Far
# below any max_payload a NATS server is configured with in practice (1 MiB by default, 64 MiB
# at most), so the check at node start never depends on a server that may not be up yet, and a
# frame stays one cheap publish that never waits behind a large one.
MAX_FRAME_BYTES = 64 * 1024
# Bytes queued by send()/send_reply() that the loop has not handed to nats-py yet. Bounded so
# that a stuck loop or a slow server costs refused sends (gaps, which the node recovers from)
# rather than unbounded memory; room for several 1 MiB stats replies at once.
MAX_OUTBOX_BYTES = 4 * 1024 * 1024
# What a queued frame costs besides its bytes (the tuple, the deque slot): counted so that a
# burst of tiny frames is bounded too.
FRAME_OVERHEAD = 64
# nats-py's own buffer of commands written but not yet flushed to the socket (publishes block
# past it until the flusher catches up; ours is the outbox above).
CLIENT_PENDING_BYTES = 2 * MAX_OUTBOX_BYTES
# A server that stops answering (hung, or a network partition with no RST) is noticed by a
# ping every PING_INTERVAL seconds left unanswered for PING_TIMEOUT: within 6 s. A killed server
# is noticed at once (the socket closes). Our pings, not nats-py's: on a stale connection
# nats-py closes the client, and its close waits for the socket to take what it still holds,
# which a hung server never does (so its closed callback may not come for minutes).
PING_INTERVAL = 2.0
PING_TIMEOUT = 4.0
NATS_PY_PING_INTERVAL = 3600
# Between connection attempts: 50 ms, doubling up to 2 s, each times a random 0.5-1 (so that
# every process of a fleet does not retry on the same tick). After a connection is lost the
# first attempt waits 0-100 ms only.
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 2.0
# How much of close()'s timeout is kept for the thread to stop once its connection is closed.
STOP_MARGIN = 0.1


def _import_nats() -> None:
    # Only here: importing django_warpmesh.node.transports (or this module) must never import
    # nats-py, an optional extra.
    try:
        import nats.aio.client  # noqa: F401
    except ImportError as exc:
        raise TransportError(
            f"the NATS transport needs nats-py ({exc}): pip install 'django-warpmesh[nats]'"
        )


@dataclasses.dataclass
class _Session:
    """One nats-py client, from its connection attempt to its end."""

    client: Client
    lost: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    error: str | None = None  # the last error nats-py reported on it


class NatsTransport(BrokerTransport):
    """Frames through a NATS server: see the module's docstring."""

    name = "nats"
    max_frame_bytes = MAX_FRAME_BYTES

    def __init__(
        self, url: str, channel: str, *, inbox_capacity: int, connect_timeout: float = 2.0
    ) -> None:
        servers, shown = parse_url(url)
        check_subject(channel)
        _import_nats()
        super().__init__(shown, channel, inbox_capacity=inbox_capacity)
        self.connect_timeout = connect_timeout
        self.server: str | None = None  # the server connected to now, as shown
        self.send_dropped = 0  # accepted by send(), then dropped: their connection was lost
        self.rtt: float | None = None  # the last ping's round trip, in seconds
        # Class constants, per instance so that a test can shorten them.
        self.ping_interval = PING_INTERVAL
        self.ping_timeout = PING_TIMEOUT
        self._servers = servers
        self._log = EventLog(time.monotonic)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # Shared with the loop's thread, under _lock: what send() checks and fills.
        self._lock = threading.Lock()
        self._outbox: collections.deque[tuple[str, bytes]] = collections.deque()
        self._outbox_bytes = 0
        self._wake_scheduled = False  # a wake-up is on its way: later sends need not send one
        self._max_payload = DEFAULT_MAX_PAYLOAD
        self._replies: dict[str, Callable[[bytes], None]] = {}
        self._new_replies: list[str] = []  # opened while connected: to subscribe on the loop
        # The loop's thread only.
        self._wakeup = asyncio.Event()
        self._stop = asyncio.Event()
        self._stop_deadline = 0.0
        self._lost_at: float | None = None

    # -- any thread -----------------------------------------------------------------------------

    def start(self, events: TransportEvents) -> None:
        with self._lock:
            if self._closed:
                raise TransportError("this NATS transport is closed")
            if self._thread is not None:
                raise TransportError("this NATS transport is already started")
            self._events = events
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=self._thread_main, name="warpmesh-nats", daemon=True
            )
        self._thread.start()

    def send(self, data: bytes) -> bool:
        return self._enqueue(self.channel, data)

    def open_reply_inbox(self, on_reply: Callable[[bytes], None]) -> str:
        address = f"{self.channel}.reply.{secrets.token_hex(8)}"
        with self._lock:
            self._replies[address] = on_reply
            self._new_replies.append(address)
            # Subscribed before anything sent after this call: the publishing task subscribes
            # first, and the server handles one connection's commands in order.
            wake = self.connected and not self._wake_scheduled
            self._wake_scheduled = self._wake_scheduled or wake
        if wake:
            self._wake()
        return address

    def send_reply(self, address: str, data: bytes) -> bool:
        if not address.startswith(f"{self.channel}.reply."):
            # Only a reply inbox of this mesh: a confused request cannot make us publish
            # anywhere else on the server.
            self._log.once("reply-address", "mesh: not a NATS reply inbox: %r", address)
            return False
        if len(data) > self._max_payload:
            self._log.once(
                "reply-size",
                "mesh: a %d-byte stats reply is over the NATS server's max_payload (%d); not sent",
                len(data),
                self._max_payload,
            )
            return False
        return self._enqueue(address, data)

    def _enqueue(self, subject: str, data: bytes) -> bool:
        size = len(data) + FRAME_OVERHEAD
        with self._lock:
            if (
                not self.connected
                or len(data) > self._max_payload
                or self._outbox_bytes + size > MAX_OUTBOX_BYTES
            ):
                return False
            self._outbox.append((subject, data))
            self._outbox_bytes += size
            if self._wake_scheduled:
                return True  # the loop will take this one with the others: one wake per burst
            self._wake_scheduled = True
        self._wake()
        return True

    def _wake(self) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has stopped: being closed
                loop.call_soon_threadsafe(self._wakeup.set)

    def close(self, timeout: float) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.connected = False  # send() refuses from now on; what it accepted is flushed
            thread, loop = self._thread, self._loop
        deadline = time.monotonic() + max(0.0, timeout)
        if thread is not None and loop is not None:
            with contextlib.suppress(RuntimeError):  # its loop has already stopped
                loop.call_soon_threadsafe(self._begin_stop, deadline)
            if thread is not threading.current_thread():  # an event handler closing us
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    logger.warning(
                        "mesh: the NATS transport's thread did not stop within %.1f s; "
                        "left to end on its own",
                        timeout,
                    )
        self.inbox.close()

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "server": self.server,
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "max_payload": self._max_payload,
            "pending_bytes": self._outbox_bytes,
            "send_dropped": self.send_dropped,
        }

    # -- the loop's thread ----------------------------------------------------------------------

    def _thread_main(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._run())
        except Exception:
            logger.exception("mesh: the NATS transport's thread failed; frames stop here")
        finally:
            with self._lock:
                self.connected = False
            # nats-py's own tasks of a connection closed in a hurry (a hung server).
            leftovers = asyncio.all_tasks(loop)
            for task in leftovers:
                task.cancel()
            if leftovers:
                with contextlib.suppress(Exception):
                    loop.run_until_complete(asyncio.wait(leftovers, timeout=STOP_MARGIN))
            loop.close()

    def _begin_stop(self, deadline: float) -> None:
        self._stop_deadline = deadline
        self._stop.set()

    def _time_left(self) -> float:
        return max(0.0, self._stop_deadline - time.monotonic() - STOP_MARGIN)

    async def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                session = await self._connect()
            except Exception as exc:  # a bug of ours or nats-py's: keep trying all the same
                if not failures:
                    logger.exception("mesh: unexpected error connecting to NATS")
                session, self.last_error = None, error_line(exc)
            if session is None:
                if self._stop.is_set():
                    return
                failures += 1
                if failures > 1 or self.connects == 0:  # the first after a loss: logged as lost
                    self._log.limited(
                        "connect",
                        "mesh: cannot connect to the NATS server %s (%s); retrying",
                        self.url,
                        self.last_error,
                    )
                await self._pause(retry_delay(failures, BACKOFF_FIRST, BACKOFF_MAX))
                continue
            failures = 0
            await self._connected(session)
            if not self._stop.is_set():
                await self._pause(random.uniform(0.0, 2 * BACKOFF_FIRST))

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _connect(self) -> _Session | None:
        """One attempt (each server tried twice, in a random order): a session connected,
        subscribed and confirmed, or None (``last_error`` says why)."""
        from nats.aio.client import Client

        session = _Session(Client())
        attempt = asyncio.ensure_future(self._open(session))
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({attempt, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not attempt.done():
            attempt.cancel()
            with contextlib.suppress(BaseException):
                await attempt
        elif attempt.cancelled():
            self.last_error = session.error or "connection attempt cancelled"
        elif (exc := attempt.exception()) is None:
            return session
        else:
            # nats-py ends with "no servers available": the error before it says why.
            self.last_error = session.error or error_line(exc)
        await self._discard(session.client, self._time_left() if self._stop.is_set() else 1.0)
        return None

    async def _open(self, session: _Session) -> None:
        client = session.client

        async def on_error(exc: Exception) -> None:
            session.error = self.last_error = error_line(exc)
            if type(exc).__name__ == "SlowConsumerError":
                self._log.limited("slow", "mesh: NATS dropped frames we read too slowly")

        async def on_closed() -> None:
            session.lost.set()

        # Typed Any: nats-py annotates its timeouts int, and takes (and we give) floats.
        options: dict[str, Any] = {
            "servers": self._servers,
            "name": f"django-warpmesh pid {os.getpid()}",
            "no_echo": True,  # our own frames are not sent back to us
            "allow_reconnect": False,  # ours: see the module's docstring
            # Each server tried twice per attempt, at once: past that nats-py raises and we
            # back off (with 0 it would retry forever, out of our control).
            "max_reconnect_attempts": 1,
            "reconnect_time_wait": 0,
            "connect_timeout": self.connect_timeout,
            "ping_interval": NATS_PY_PING_INTERVAL,  # ours instead: see PING_INTERVAL
            "pending_size": CLIENT_PENDING_BYTES,
            "flush_timeout": self.connect_timeout,
            "error_cb": on_error,
            "closed_cb": on_closed,
        }
        # Two TCP connects and a handshake per server at most: a bound for a stuck one too.
        budget = self.connect_timeout * (2 * len(self._servers) + 2)
        await asyncio.wait_for(client.connect(**options), budget)
        with self._lock:
            replies = list(self._replies.items())
            self._new_replies.clear()
        await client.subscribe(self.channel, cb=self._on_frame)
        for address, on_reply in replies:
            await client.subscribe(address, cb=self._reply_handler(on_reply))
        # The subscriptions are the server's once it answers a ping sent after them.
        flush: Any = client.flush
        await flush(timeout=self.connect_timeout)
        url = client.connected_url
        if url is not None and url.scheme == "tls" and not self._server_uses_tls(client):
            # nats-py upgrades to TLS only when the server asks for it; tls:// must mean TLS.
            raise TransportError("the server at a tls:// URL does not use TLS")
        session.error = None

    @staticmethod
    def _server_uses_tls(client: Client) -> bool:
        # nats-py keeps the server's INFO private; it is where TLS was (or was not) asked for.
        info = getattr(client, "_server_info", None) or {}
        return bool(info.get("tls_required"))

    async def _connected(self, session: _Session) -> None:
        """Runs one live connection, from its subscriptions confirmed to its end (lost, or the
        transport closed)."""
        client = session.client
        url = client.connected_url
        if self._stop.is_set():  # closed while it connected: the node is done with us
            await self._discard(client, self._time_left())
            return
        with self._lock:
            # Anything queued by a send() that raced the previous connection's loss is stale.
            self._outbox.clear()
            self._outbox_bytes = 0
            self._wake_scheduled = False
            self._max_payload = client.max_payload or DEFAULT_MAX_PAYLOAD
            self.connected = not self._closed
        self.server = shown_url(url) if url is not None else self.url
        self.connects += 1
        if self._lost_at is None:
            logger.info(
                "mesh: connected to the NATS server %s (subject %s)", self.server, self.channel
            )
        else:
            logger.info(
                "mesh: reconnected to the NATS server %s after %.1f s",
                self.server,
                time.monotonic() - self._lost_at,
            )
        self.tell_node(lambda events: events.transport_connected())
        publisher = asyncio.ensure_future(self._publish(client))
        waits = {
            publisher,
            asyncio.ensure_future(self._watch(session)),
            asyncio.ensure_future(session.lost.wait()),
            asyncio.ensure_future(self._stop.wait()),
        }
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        with contextlib.suppress(BaseException):
            await publisher
        if self._stop.is_set():
            await self._shut(client)
            return
        with self._lock:
            self.connected = False
            self.send_dropped += len(self._outbox)
            self._outbox.clear()
            self._outbox_bytes = 0
        self.disconnects += 1
        self._lost_at = time.monotonic()
        failure = publisher.exception() if publisher.done() and not publisher.cancelled() else None
        if failure is not None:
            logger.error("mesh: NATS publishing failed", exc_info=failure)
            session.error = f"internal error: {error_line(failure)}"
        reason = session.error or error_line(
            client.last_error or ConnectionError("connection closed")
        )
        self.last_error = reason
        self.rtt = None
        server, self.server = self.server, None
        logger.warning("mesh: lost the NATS server %s (%s); reconnecting", server, reason)
        self.tell_node(lambda events: events.transport_lost(reason))
        await self._discard(client, 1.0)

    async def _watch(self, session: _Session) -> None:
        """Pings the server every ``ping_interval`` seconds; returns, the connection declared
        lost, when one is not answered within ``ping_timeout``."""
        flush: Any = session.client.flush
        while True:
            await asyncio.sleep(self.ping_interval)
            started = time.monotonic()
            try:
                await asyncio.wait_for(flush(timeout=self.ping_timeout), self.ping_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A client closed already was lost for a reason of nats-py's: the better one.
                if not session.lost.is_set() and not session.client.is_closed:
                    session.error = f"no answer to a ping within {self.ping_timeout:g} s"
                logger.debug("mesh: NATS ping failed: %s", error_line(exc))
                return
            self.rtt = time.monotonic() - started

    async def _publish(self, client: Client) -> None:
        """The connection's publishing task: subscribes new reply inboxes, then publishes
        what send() queued, oldest first, whenever woken."""
        from nats import errors

        while True:
            self._wakeup.clear()
            with self._lock:
                addresses, self._new_replies = self._new_replies, []
                callbacks = [(address, self._replies[address]) for address in addresses]
            try:
                for address, on_reply in callbacks:
                    await client.subscribe(address, cb=self._reply_handler(on_reply))
            except (errors.ConnectionClosedError, errors.ConnectionDrainingError):
                return  # the connection is gone; the next one subscribes every reply inbox
            while True:
                with self._lock:
                    if not self._outbox:
                        self._wake_scheduled = False
                        break
                    batch, self._outbox = self._outbox, collections.deque()
                    self._outbox_bytes = 0
                while batch:
                    subject, data = batch[0]
                    try:
                        await client.publish(subject, data)
                    except asyncio.CancelledError:
                        # Closing while nats-py made us wait (its buffer full): close() flushes
                        # what is left, in order. nats-py only ever waits once it has queued
                        # the frame: that one is sent already.
                        batch.popleft()
                        with self._lock:
                            self._outbox.extendleft(reversed(batch))
                        raise
                    except (errors.ConnectionClosedError, errors.OutboundBufferLimitError):
                        with self._lock:
                            self.send_dropped += len(batch)
                        return  # the connection is gone: its end is handled by _connected
                    except errors.Error as exc:  # over max_payload, a bad reply subject
                        with self._lock:
                            self.send_dropped += 1
                        self._log.once(f"publish:{type(exc).__name__}", "mesh: NATS: %s", exc)
                    batch.popleft()
            await self._wakeup.wait()

    async def _shut(self, client: Client) -> None:
        """Closing: publish what send() accepted, wait (as long as close() allows) for the
        server to have it all, then hang up."""
        with self._lock:
            batch, self._outbox = self._outbox, collections.deque()
            self._outbox_bytes = 0
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._flush_out(client, batch), self._time_left())
        await self._discard(client, self._time_left())

    async def _flush_out(self, client: Client, batch: collections.deque[tuple[str, bytes]]) -> None:
        for subject, data in batch:
            await client.publish(subject, data)
        flush: Any = client.flush
        await flush(timeout=max(0.001, self._time_left()))

    @staticmethod
    async def _discard(client: Client, timeout: float) -> None:
        try:
            await asyncio.wait_for(client.close(), max(0.001, timeout))
        except (Exception, asyncio.TimeoutError):
            # Closing writes what nats-py still holds, which a hung server never reads: drop
            # the socket (nats-py has no public way to), or its fd stays open until it does.
            transport = getattr(client, "_transport", None)
            for name in ("_io_writer", "_bare_io_writer"):
                writer = getattr(transport, name, None)
                with contextlib.suppress(Exception):
                    writer.transport.abort()  # type: ignore[union-attr]

    async def _on_frame(self, msg: Msg) -> None:
        self.inbox.put(msg.data)

    def _reply_handler(self, on_reply: Callable[[bytes], None]) -> Callable[[Msg], Awaitable[None]]:
        async def deliver(msg: Msg) -> None:
            try:
                on_reply(msg.data)
            except Exception as exc:
                self._log.once("on-reply", "mesh: a stats reply handler failed: %r", exc)

        return deliver
