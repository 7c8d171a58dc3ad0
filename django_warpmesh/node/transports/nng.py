"""The default transport: one nng ``Bus0`` socket, a connection (pipe) to every peer.

A send goes to every pipe at once (nng copies it to each pipe's queue and drops it for a pipe
whose queue is full: peers then see the sequence gap). The node dials, listens and binds pipes
to peers itself (:mod:`..links`) through :attr:`NngTransport.socket`: those are the mesh's own
business, not a broker's.
"""

from __future__ import annotations

from typing import Any

import pynng

from django_warpmesh.node.config import MeshSettings
from django_warpmesh.node.transports.base import Received, TransportClosed, TransportError


class NngTransport:
    name = "nng"

    def __init__(self, config: MeshSettings, socket: Any = None) -> None:
        # ``socket``: a stand-in for tests; the real one is made here.
        self.socket: Any = socket or pynng.Bus0(
            recv_buffer_size=config.buffer_size,
            send_buffer_size=config.buffer_size,
            recv_max_size=config.max_frame_bytes,
            reconnect_time_min=50,
            reconnect_time_max=1000,
        )
        self.address = ""  # where it listens, once it does (the node sets it)

    def send(self, data: bytes) -> bool:
        try:
            self.socket.send(data)
        except pynng.Closed:
            return False
        except pynng.NNGException as exc:
            raise TransportError(str(exc)) from None
        return True

    def receive(self, limit: int) -> list[Received]:
        # Each receive is one call into nng that releases the GIL, with no readiness check
        # between them: taken until the queue says it is empty.
        sock = self.socket
        batch: list[Received] = []
        try:
            while len(batch) < limit:
                message = sock.recv_msg(block=False)
                batch.append(Received(message.bytes, message.pipe))
        except pynng.TryAgain:
            pass
        except pynng.Closed:
            if not batch:
                raise TransportClosed from None
        return batch

    @property
    def recv_fd(self) -> int:
        try:
            return int(self.socket.recv_fd)
        except pynng.Closed:
            raise TransportClosed from None

    def close(self) -> None:
        self.socket.close()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.address, "connected": True}
