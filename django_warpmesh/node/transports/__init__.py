"""How frames travel between nodes: the small interface the node uses, and its implementations.

* :mod:`.base`: :class:`Transport` (send bytes, receive bytes, a descriptor to wait on),
  :class:`BrokerTransport` (a broker connection, with connected/lost events),
  :class:`FrameInbox` (received frames handed from a transport's own thread to the node), and
  what every broker transport uses (reconnection backoff, error lines);
  :mod:`.wakeup`: the pipe behind every descriptor a transport makes readable on purpose.
* :mod:`.nng`: the default, a peer-to-peer mesh of nng ``Bus0`` connections.
* :mod:`.nats`: a NATS server fans each frame out (``nats://``; the ``nats`` extra). Its parts:
  :mod:`.nats_addresses` (server URLs, subjects), :mod:`.nats_outbox` (what sends queue),
  :mod:`.nats_link` (the loop thread keeping the connection), :mod:`.nats_session` (one
  nats-py client).
* :mod:`.postgresql`: PostgreSQL ``LISTEN``/``NOTIFY`` (the ``postgresql`` extra). Its parts:
  :mod:`.postgresql_payloads` (what goes in a payload), :mod:`.postgresql_sessions` (opening
  and keeping the two sessions), :mod:`.postgresql_listener`, :mod:`.postgresql_sender`.

On the nng mesh each peer has connections (pipes) of its own, which the node binds to the peer
that speaks on them and hangs up on when they send junk; their connect and remove events come
through nng's callbacks. A broker transport has one link, to its server: the node treats losing
it as it treats losing every peer at once (a gap: flush, entries capped until it is back).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django_warpmesh.node.transports.base import (
    BrokerTransport,
    FrameInbox,
    Received,
    Transport,
    TransportClosed,
    TransportError,
    TransportEvents,
    channel_name,
)

if TYPE_CHECKING:
    from django_warpmesh.node.transports.nats import NatsTransport

__all__ = [
    "BrokerTransport",
    "FrameInbox",
    "NatsTransport",
    "Received",
    "Transport",
    "TransportClosed",
    "TransportError",
    "TransportEvents",
    "channel_name",
]


def __getattr__(name: str) -> Any:
    # Imported on first use: its module brings asyncio (nats-py itself only once a transport
    # is made), which a process on the nng mesh has no use for.
    if name == "NatsTransport":
        from django_warpmesh.node.transports.nats import NatsTransport

        return NatsTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
