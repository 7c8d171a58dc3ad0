"""Stats requests and replies (``mesh_status``): asked on the bus, answered to the asker only."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django_warpmesh import protocol
from django_warpmesh.node.interfaces import NodePart
from django_warpmesh.node.peers import Peer
from django_warpmesh.protocol import Frame, Kind

if TYPE_CHECKING:
    from django_warpmesh.node.core import MeshNode


class Inquiries(NodePart):
    def __init__(self, node: MeshNode) -> None:
        super().__init__(node)
        self._stats_waiters: dict[int, Callable[[bytes, dict[str, Any]], None]] = {}

    def _on_stats_request(self, peer: Peer, request: protocol.StatsRequest) -> None:
        """Answer the asker only, on a connection of its own (see replies.py)."""
        if self._node.observer or (self._node.replies is None and self._node.broker is None):
            return
        reply = protocol.StatsReply(request.request_id, peer.node_id, self._node.snapshot())
        with self._node.sender._send_lock:
            stamp = self._node.sender._next_stamp()
        frame = Frame(
            Kind.STATS_REPLY,
            self._node.node_id,
            self._node.epoch,
            self._node.sender._seq,
            protocol.stamped(stamp, protocol.stats_reply_body(reply)),
        )
        try:
            data = self._node.reply_codec.encode(frame)
        except Exception as exc:
            self.counters.send_errors += 1
            self.log.once("encode:STATS_REPLY", "mesh: cannot send a stats reply (%r)", exc)
            return
        if self._node.broker is not None:
            sent = self._node.broker.send_reply(request.reply_to, data)
        else:
            assert self._node.replies is not None
            sent = self._node.replies.send(request.reply_to, data)
        if not sent:
            self.counters.send_errors += 1

    def _on_reply_bytes(self, data: bytes) -> None:
        """The observer's inbox: a reply to one of our requests, verified like any frame.

        Replay protection is the request: a reply counts only while its request is open.
        """
        try:
            frame = self._node.reply_codec.decode(data)
        except protocol.ProtocolError as exc:
            self._node.receiver._reject(exc.reason)
            return
        if frame.kind is not Kind.STATS_REPLY:
            self._node.receiver._reject("unexpected_kind")
            return
        reply = frame.body.value
        if reply.requester != self._node.node_id:
            return
        waiter = self._stats_waiters.get(reply.request_id)
        if waiter is not None:
            waiter(frame.origin, reply.stats)

    def _on_stats_reply(self, peer: Peer, reply: protocol.StatsReply) -> None:
        if reply.requester != self._node.node_id:
            return
        waiter = self._stats_waiters.get(reply.request_id)
        if waiter is not None:
            waiter(peer.node_id, reply.stats)

    def request_stats(
        self, request_id: int, on_reply: Callable[[bytes, dict[str, Any]], None]
    ) -> None:
        """Ask every peer for its stats (mesh_status); replies arrive on the receiver thread."""
        self._stats_waiters[request_id] = on_reply
        reply_to = self._node.reply_address
        with self.lock:
            self._node.sender._outbox.append((Kind.STATS_REQUEST, [request_id, reply_to]))
        self._node.sender._wake.set()

    def cancel_stats_request(self, request_id: int) -> None:
        """Stop passing on replies to ``request_id`` (late ones are then ignored)."""
        self._stats_waiters.pop(request_id, None)
