"""Stats replies go to the asker only, over a connection of their own.

Not over the bus: Bus0 sends every frame to every pipe (it cannot address one), so each node's
reply to ``mesh_status`` would reach every peer too, and one status round of an N-node mesh
would cost O(N³) bytes. Instead the asker (the observer node of ``mesh_status``) listens with a
``Rep0`` socket and names its address in the request; a node answers a verified, fresh request
by dialling that address with a ``Req0`` socket and sending its signed reply, then waits for the
empty acknowledgement before it closes (nng drops what is still queued when a socket closes).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pynng

from django_warpmesh.node.config import format_address, parse_address
from django_warpmesh.node.tls import TLSTransport

logger = logging.getLogger("django_warpmesh")

# Replies being delivered at once, at most: each is a thread of its own for a moment.
MAX_IN_FLIGHT = 4
# How long a reply may take to be delivered and acknowledged.
REPLY_TIMEOUT_MS = 3000
# How long the asker's receive waits before it looks whether it is closing.
INBOX_POLL_MS = 100


class ReplyInbox:
    """The asker's end: listens, hands each reply's bytes to ``on_reply``, acknowledges it."""

    def __init__(
        self,
        bind: str,
        *,
        ports: Sequence[int],
        advertise: Callable[[int], str],
        tls: TLSTransport | None,
        max_bytes: int,
        on_reply: Callable[[bytes], None],
    ) -> None:
        self._on_reply = on_reply
        # Receives wait at most this long: closing the socket while a receive is under way on
        # another thread aborts the process (nng), so close() stops the thread first.
        self._socket = pynng.Rep0(recv_max_size=max_bytes, recv_timeout=INBOX_POLL_MS)
        self._closing = threading.Event()
        # A port of the mesh's own range first: the one firewalls already open between the
        # instances; any free port only when all are taken.
        listener: Any = None
        for port in [*ports, 0]:
            url = f"{'tcp' if tls is None else tls.scheme}://{format_address(bind, port)}"
            try:
                listener = (
                    self._socket.listen(url) if tls is None else tls.listen(self._socket, url)
                )
            except pynng.AddressInUse:
                continue
            break
        port = int(str(listener.local_address).rsplit(":", 1)[1])
        self.address = advertise(port)
        self._thread = threading.Thread(target=self._run, name="warpmesh-replies", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self._socket
        while not self._closing.is_set():
            try:
                data = sock.recv()
            except pynng.Closed:
                return
            except pynng.NNGException:  # the poll interval passed (Timeout), or a bad message
                continue
            try:
                self._on_reply(data)
            except Exception:
                logger.exception("mesh: error handling a stats reply (continuing)")
            with contextlib.suppress(pynng.NNGException):
                sock.send(b"")

    def close(self) -> None:
        self._closing.set()
        self._thread.join(INBOX_POLL_MS / 1000 * 4)
        if not self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._socket.close()


class ReplySender:
    """The answering node's end: one short connection per reply, a few at a time."""

    def __init__(self, tls: TLSTransport | None) -> None:
        self._tls = tls
        self._in_flight = threading.BoundedSemaphore(MAX_IN_FLIGHT)

    def send(self, address: str, data: bytes) -> bool:
        """Deliver ``data`` to ``address`` in the background; False (nothing sent) if the
        address is not ``host:port`` or too many replies are on their way already."""
        try:
            host, port = parse_address("stats reply", address)
        except ValueError:
            return False
        if not self._in_flight.acquire(blocking=False):
            return False
        url = f"{'tcp' if self._tls is None else self._tls.scheme}://{format_address(host, port)}"
        thread = threading.Thread(
            target=self._deliver, args=(url, host, data), name="warpmesh-reply", daemon=True
        )
        thread.start()
        return True

    def _deliver(self, url: str, host: str, data: bytes) -> None:
        try:
            sock: Any = pynng.Req0(send_timeout=REPLY_TIMEOUT_MS, recv_timeout=REPLY_TIMEOUT_MS)
            with sock:
                if self._tls is None:
                    sock.dial(url, block=False)
                else:
                    self._tls.dial(sock, url, host)
                sock.send(data)  # waits (up to the timeout) for the connection
                sock.recv()  # the acknowledgement: delivered
        except Exception as exc:  # pynng raises more than NNGException (RuntimeError, once)
            logger.debug("mesh: a stats reply to %s was not delivered (%r)", url, exc)
        finally:
            self._in_flight.release()
