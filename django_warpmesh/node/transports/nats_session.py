"""One nats-py client of the NATS transport, from its connection attempt to its end: how it
connects (nats-py's own reconnection and pings off), and hangs up even on a server that no
longer reads.

Runs on the transport's loop thread only. nats-py is imported only once a transport is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from django_warpmesh.node.transports.base import TransportError
from django_warpmesh.node.transports.nats_outbox import MAX_OUTBOX_BYTES, Batch

if TYPE_CHECKING:
    from nats.aio.client import Client

# nats-py's own buffer of commands written but not yet flushed to the socket (publishes block
# past it until the flusher catches up; ours is the outbox).
CLIENT_PENDING_BYTES = 2 * MAX_OUTBOX_BYTES
# A server that stops answering (hung, or a network partition with no RST) is noticed by a
# ping every PING_INTERVAL seconds left unanswered for PING_TIMEOUT: within 6 s. A killed server
# is noticed at once (the socket closes). Our pings, not nats-py's: on a stale connection
# nats-py closes the client, and its close waits for the socket to take what it still holds,
# which a hung server never does (so its closed callback may not come for minutes).
PING_INTERVAL = 2.0
PING_TIMEOUT = 4.0
NATS_PY_PING_INTERVAL = 3600


def import_nats() -> None:
    # Only here: importing django_warpmesh.node.transports (or .nats) must never import
    # nats-py, an optional extra.
    try:
        import nats.aio.client  # noqa: F401
    except ImportError as exc:
        raise TransportError(
            f"the NATS transport needs nats-py ({exc}): pip install 'django-warpmesh[nats]'"
        )


@dataclasses.dataclass
class NatsSession:
    """One nats-py client, from its connection attempt to its end."""

    client: Client
    lost: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    error: str | None = None  # the last error nats-py reported on it

    async def connect(
        self,
        servers: list[str],
        timeout: float,
        on_error: Callable[[Exception], Awaitable[None]],
    ) -> None:
        """Connect to one of ``servers`` (each tried twice, in a random order, ``timeout``
        seconds each); ``on_error`` hears what nats-py reports."""

        async def on_closed() -> None:
            self.lost.set()

        # Typed Any: nats-py annotates its timeouts int, and takes (and we give) floats.
        options: dict[str, Any] = {
            "servers": servers,
            "name": f"django-warpmesh pid {os.getpid()}",
            "no_echo": True,  # our own frames are not sent back to us
            "allow_reconnect": False,  # ours: see the docstring of .nats
            # Each server tried twice per attempt, at once: past that nats-py raises and we
            # back off (with 0 it would retry forever, out of our control).
            "max_reconnect_attempts": 1,
            "reconnect_time_wait": 0,
            "connect_timeout": timeout,
            "ping_interval": NATS_PY_PING_INTERVAL,  # ours instead: see PING_INTERVAL
            "pending_size": CLIENT_PENDING_BYTES,
            "flush_timeout": timeout,
            "error_cb": on_error,
            "closed_cb": on_closed,
        }
        # Two TCP connects and a handshake per server at most: a bound for a stuck one too.
        budget = timeout * (2 * len(servers) + 2)
        await asyncio.wait_for(self.client.connect(**options), budget)

    async def confirm(self, timeout: float) -> None:
        """Wait until the server has what was sent so far (it answers a ping sent after it);
        raises if a tls:// URL was not answered with TLS."""
        flush: Any = self.client.flush
        await flush(timeout=timeout)
        url = self.client.connected_url
        if url is not None and url.scheme == "tls" and not self._server_uses_tls():
            # nats-py upgrades to TLS only when the server asks for it; tls:// must mean TLS.
            raise TransportError("the server at a tls:// URL does not use TLS")

    def _server_uses_tls(self) -> bool:
        # nats-py keeps the server's INFO private; it is where TLS was (or was not) asked for.
        info = getattr(self.client, "_server_info", None) or {}
        return bool(info.get("tls_required"))

    async def publish_all(self, batch: Batch, time_left: Callable[[], float]) -> None:
        """Publish ``batch`` and wait (``time_left()`` seconds, once it is written) until the
        server has it all."""
        for subject, data in batch:
            await self.client.publish(subject, data)
        flush: Any = self.client.flush
        await flush(timeout=max(0.001, time_left()))

    async def hang_up(self, timeout: float) -> None:
        """Close the client, within ``timeout`` seconds whatever the server does."""
        client = self.client
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
