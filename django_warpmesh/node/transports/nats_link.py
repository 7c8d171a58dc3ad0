"""The NATS transport's link to its server: a thread (``warpmesh-nats``) running the asyncio
loop that owns nats-py's client. nats-py is asyncio and not thread-safe: every call into it
happens there.

The loop connects (a fresh client each time, its subscriptions confirmed before the node is
told ``transport_connected``), runs the connection (publishing what the outbox holds whenever
woken, pinging the server) until it is lost or the transport closed, and connects again,
backing off. Why the reconnecting is ours and not nats-py's: see :mod:`.nats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from django_warpmesh.node.stats import EventLog
from django_warpmesh.node.transports.base import error_line, retry_delay
from django_warpmesh.node.transports.nats_addresses import shown_url
from django_warpmesh.node.transports.nats_outbox import DEFAULT_MAX_PAYLOAD, Batch, NatsOutbox
from django_warpmesh.node.transports.nats_session import NatsSession

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

    from django_warpmesh.node.transports.nats import NatsTransport

logger = logging.getLogger("django_warpmesh")

# Between connection attempts: 50 ms, doubling up to 2 s, each times a random 0.5-1 (so that
# every process of a fleet does not retry on the same tick). After a connection is lost the
# first attempt waits 0-100 ms only.
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 2.0
# How much of close()'s timeout is kept for the thread to stop once its connection is closed.
STOP_MARGIN = 0.1


class NatsLink:
    """Keeps ``transport`` connected to one of ``servers``, on a thread of its own; keeps the
    transport's ``connects``, ``disconnects``, ``last_error``, ``server`` and ``rtt``, and tells
    the node when the link comes and goes."""

    def __init__(self, transport: NatsTransport, servers: list[str]) -> None:
        self._transport = transport
        self._servers = servers
        self._log = EventLog(time.monotonic)
        self.thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The loop's thread only.
        self._wakeup = asyncio.Event()
        self._stop = asyncio.Event()
        self._stop_deadline = 0.0
        self._lost_at: float | None = None

    @property
    def _outbox(self) -> NatsOutbox:
        return self._transport.outbox

    # -- any thread ----------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._thread_main, name="warpmesh-nats", daemon=True)
        self.thread.start()

    def wake(self) -> None:
        """Have the loop publish what the outbox holds."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has stopped: being closed
                loop.call_soon_threadsafe(self._wakeup.set)

    def stop(self, timeout: float) -> None:
        """Publish what the outbox holds, hang up and end the thread, waited for ``timeout``
        seconds at the most (not at all from the thread itself: an event handler closing us)."""
        thread, loop = self.thread, self._loop
        deadline = time.monotonic() + max(0.0, timeout)
        if thread is None or loop is None:
            return
        with contextlib.suppress(RuntimeError):  # its loop has already stopped
            loop.call_soon_threadsafe(self._begin_stop, deadline)
        if thread is threading.current_thread():
            return
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            logger.warning(
                "mesh: the NATS transport's thread did not stop within %.1f s; "
                "left to end on its own",
                timeout,
            )

    # -- the loop's thread ---------------------------------------------------------------------

    def _thread_main(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._run())
        except Exception:
            logger.exception("mesh: the NATS transport's thread failed; frames stop here")
        finally:
            self._outbox.refuse()
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
        transport = self._transport
        failures = 0
        while not self._stop.is_set():
            try:
                session = await self._connect()
            except Exception as exc:  # a bug of ours or nats-py's: keep trying all the same
                if not failures:
                    logger.exception("mesh: unexpected error connecting to NATS")
                session, transport.last_error = None, error_line(exc)
            if session is None:
                if self._stop.is_set():
                    return
                failures += 1
                if failures > 1 or transport.connects == 0:  # the first after a loss is logged
                    self._log.limited(
                        "connect",
                        "mesh: cannot connect to the NATS server %s (%s); retrying",
                        transport.url,
                        transport.last_error,
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

    async def _connect(self) -> NatsSession | None:
        """One attempt (each server tried twice, in a random order): a session connected,
        subscribed and confirmed, or None (``last_error`` says why)."""
        from nats.aio.client import Client

        session = NatsSession(Client())
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
            self._transport.last_error = session.error or "connection attempt cancelled"
        elif (exc := attempt.exception()) is None:
            return session
        else:
            # nats-py ends with "no servers available": the error before it says why.
            self._transport.last_error = session.error or error_line(exc)
        await session.hang_up(self._time_left() if self._stop.is_set() else 1.0)
        return None

    async def _open(self, session: NatsSession) -> None:
        transport = self._transport

        async def on_error(exc: Exception) -> None:
            session.error = transport.last_error = error_line(exc)
            if type(exc).__name__ == "SlowConsumerError":
                self._log.limited("slow", "mesh: NATS dropped frames we read too slowly")

        await session.connect(self._servers, transport.connect_timeout, on_error)
        client = session.client
        replies = self._outbox.reply_inboxes()
        await client.subscribe(transport.channel, cb=self._on_frame)
        for address, on_reply in replies:
            await client.subscribe(address, cb=self._reply_handler(on_reply))
        # The subscriptions are the server's once it answers a ping sent after them.
        await session.confirm(transport.connect_timeout)
        session.error = None

    async def _connected(self, session: NatsSession) -> None:
        """Runs one live connection, from its subscriptions confirmed to its end (lost, or the
        transport closed)."""
        if self._stop.is_set():  # closed while it connected: the node is done with us
            await session.hang_up(self._time_left())
            return
        self._went_up(session.client)
        publisher = asyncio.ensure_future(self._publish(session.client))
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
            await self._shut(session)
            return
        self._went_down(session, publisher)
        await session.hang_up(1.0)

    def _went_up(self, client: Client) -> None:
        transport = self._transport
        url = client.connected_url
        self._outbox.open(client.max_payload or DEFAULT_MAX_PAYLOAD)
        transport.server = shown_url(url) if url is not None else transport.url
        transport.connects += 1
        if self._lost_at is None:
            logger.info(
                "mesh: connected to the NATS server %s (subject %s)",
                transport.server,
                transport.channel,
            )
        else:
            logger.info(
                "mesh: reconnected to the NATS server %s after %.1f s",
                transport.server,
                time.monotonic() - self._lost_at,
            )
        transport.tell_node(lambda events: events.transport_connected())

    def _went_down(self, session: NatsSession, publisher: asyncio.Future[None]) -> None:
        transport = self._transport
        self._outbox.lose()
        transport.disconnects += 1
        self._lost_at = time.monotonic()
        failure = publisher.exception() if publisher.done() and not publisher.cancelled() else None
        if failure is not None:
            logger.error("mesh: NATS publishing failed", exc_info=failure)
            session.error = f"internal error: {error_line(failure)}"
        last_error = session.client.last_error
        reason = session.error or error_line(last_error or ConnectionError("connection closed"))
        transport.last_error = reason
        transport.rtt = None
        server, transport.server = transport.server, None
        logger.warning("mesh: lost the NATS server %s (%s); reconnecting", server, reason)
        transport.tell_node(lambda events: events.transport_lost(reason))

    async def _watch(self, session: NatsSession) -> None:
        """Pings the server every ``ping_interval`` seconds; returns, the connection declared
        lost, when one is not answered within ``ping_timeout``."""
        transport = self._transport
        flush: Any = session.client.flush
        while True:
            await asyncio.sleep(transport.ping_interval)
            started = time.monotonic()
            timeout = transport.ping_timeout
            try:
                await asyncio.wait_for(flush(timeout=timeout), timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A client closed already was lost for a reason of nats-py's: the better one.
                if not session.lost.is_set() and not session.client.is_closed:
                    session.error = f"no answer to a ping within {timeout:g} s"
                logger.debug("mesh: NATS ping failed: %s", error_line(exc))
                return
            transport.rtt = time.monotonic() - started

    async def _publish(self, client: Client) -> None:
        """The connection's publishing task: subscribes new reply inboxes, then publishes
        what send() queued, oldest first, whenever woken."""
        from nats import errors

        while True:
            self._wakeup.clear()
            try:
                for address, on_reply in self._outbox.new_reply_inboxes():
                    await client.subscribe(address, cb=self._reply_handler(on_reply))
            except (errors.ConnectionClosedError, errors.ConnectionDrainingError):
                return  # the connection is gone; the next one subscribes every reply inbox
            while (batch := self._outbox.take()) is not None:
                if not await self._publish_batch(client, batch):
                    return  # the connection is gone: its end is handled by _connected
            await self._wakeup.wait()

    async def _publish_batch(self, client: Client, batch: Batch) -> bool:
        """Publish ``batch``, oldest first; False if the connection is gone."""
        from nats import errors

        while batch:
            subject, data = batch[0]
            try:
                await client.publish(subject, data)
            except asyncio.CancelledError:
                # Closing while nats-py made us wait (its buffer full): close() flushes what is
                # left, in order. nats-py only ever waits once it has queued the frame: that
                # one is sent already.
                batch.popleft()
                self._outbox.put_back(batch)
                raise
            except (errors.ConnectionClosedError, errors.OutboundBufferLimitError):
                self._outbox.count_dropped(len(batch))
                return False
            except errors.Error as exc:  # over max_payload, a bad reply subject
                self._outbox.count_dropped(1)
                self._log.once(f"publish:{type(exc).__name__}", "mesh: NATS: %s", exc)
            batch.popleft()
        return True

    async def _shut(self, session: NatsSession) -> None:
        """Closing: publish what send() accepted, wait (as long as close() allows) for the
        server to have it all, then hang up."""
        batch = self._outbox.take_all()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.publish_all(batch, self._time_left), self._time_left())
        await session.hang_up(self._time_left())

    async def _on_frame(self, msg: Msg) -> None:
        self._transport.inbox.put(msg.data)

    def _reply_handler(self, on_reply: Callable[[bytes], None]) -> Callable[[Msg], Awaitable[None]]:
        async def deliver(msg: Msg) -> None:
            try:
                on_reply(msg.data)
            except Exception as exc:
                self._log.once("on-reply", "mesh: a stats reply handler failed: %r", exc)

        return deliver
