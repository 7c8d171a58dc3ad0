"""How frames travel between nodes: the small interface the node uses, and its implementations.

* :mod:`.base`: :class:`Transport` (send bytes, receive bytes, connected/disconnected events),
  :class:`FrameInbox` (received frames handed from a transport's own thread to the node).
* :mod:`.nats`: a NATS server fans each frame out (``nats://``; the ``nats`` extra).
* :mod:`.postgresql`: PostgreSQL ``LISTEN``/``NOTIFY`` (the ``postgresql`` extra).

The nng mesh (the default) is the node's own: peer-to-peer, with pipes the node binds to peers.
A broker transport has one link, to its server: the node treats losing it as it treats losing
every peer at once (a gap: flush, entries capped until it is back).
"""

from __future__ import annotations

from django_warpmesh.node.transports.base import (
    BrokerTransport,
    FrameInbox,
    TransportError,
    TransportEvents,
    channel_name,
)

__all__ = ["BrokerTransport", "FrameInbox", "TransportError", "TransportEvents", "channel_name"]
