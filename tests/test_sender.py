"""The sender thread's batches, driven directly: whatever it cannot encode, peers still learn of.

A node that is never started sends into a fake socket; the frames it sent are handed to a
second node's receiver, as nng would deliver them, and that node's stores show what a peer did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from django_warpmesh import protocol
from django_warpmesh.conf import parse
from django_warpmesh.node import GAP_GRACE, MeshNode
from django_warpmesh.node.transports.nng import NngTransport
from django_warpmesh.node_factory import StaticRegistry
from django_warpmesh.protocol import Kind, Op, OpCode
from tests.fakes import Clock, FakeMessage, FakePipe, FakeSocket

KEY = b"k" * 32
UNSENDABLE = "\udcff"  # a lone surrogate (os.fsdecode of a non-UTF-8 name): msgpack refuses it


@dataclass
class RecordingStore:
    applied: list[Op] = field(default_factory=list)
    flushes: int = 0

    def apply(self, ops: Sequence[Op]) -> None:
        self.applied.extend(ops)

    def flush(self) -> None:
        self.flushes += 1


@dataclass
class Link:
    sender: MeshNode
    socket: FakeSocket
    peer: MeshNode
    stores: dict[str, RecordingStore]
    clock: Clock

    def deliver(self) -> list[protocol.Frame]:
        """Hand what the sender sent since the last call to the peer; return it decoded."""
        sent, self.socket.sent = self.socket.sent, []
        self.peer.receiver._handle_batch([FakeMessage(data, FakePipe(1)) for data in sent])
        return [self.sender.codec.decode(data) for data in sent]


@pytest.fixture
def link() -> Link:
    sender = MeshNode(parse({"PEERS": []}), KEY, StaticRegistry([]))
    socket = FakeSocket()
    sender.transport = NngTransport(sender.config, socket)
    sender.ready = True  # connected to its peers: it sends at once instead of holding
    clock = Clock()
    peer = MeshNode(parse({"PEERS": []}), KEY, StaticRegistry([]), clock=clock)
    peer.ready = True  # it holds values: a gap must flush them
    stores = {alias: RecordingStore() for alias in ("c", "d")}
    for alias, store in stores.items():
        peer.register_store(alias, store)
    built = Link(sender, socket, peer, stores, clock)
    # First contact: the peer now follows the sender's sequence numbers.
    sender.publish("d", OpCode.DELETE, [":1:hello"])
    sender.sender._send_pending()
    (hello,) = built.deliver()
    assert hello.seq == 1
    stores["d"].applied.clear()
    return built


def invalidations(frames: list[protocol.Frame]) -> list[Op]:
    return [op for frame in frames if frame.kind is Kind.INVALIDATE for op in frame.body]


def test_a_key_that_cannot_be_encoded_clears_its_cache_on_peers_and_spares_the_rest(
    link: Link,
) -> None:
    queued: list[tuple[str, OpCode, Any]] = [
        ("c", OpCode.DELETE, [":1:ok"]),
        ("c", OpCode.DELETE_UNLESS, (UNSENDABLE, b"value")),
        ("d", OpCode.DELETE, [":1:fine"]),
        ("d", OpCode.TAGS, ["s:tag"]),
    ]
    for entry in queued:
        link.sender.publish(*entry)
    link.sender.sender._send_pending()
    frames = link.deliver()
    assert [frame.seq for frame in frames] == list(range(2, 2 + len(frames)))
    assert Op("c", OpCode.CLEAR, None) in invalidations(frames)
    # The peer dropped its whole copy of the cache the bad key was in, and the other cache's
    # ops arrived as they were.
    assert link.stores["c"].applied == [Op("c", OpCode.CLEAR, None)]
    assert link.stores["d"].applied == [
        Op("d", OpCode.DELETE, [":1:fine"]),
        Op("d", OpCode.TAGS, ["s:tag"]),
    ]
    assert link.sender.counters.send_errors == 1
    assert link.peer.counters.gaps_detected == 0


def test_a_frame_that_cannot_be_built_at_all_leaves_a_gap_peers_flush_on(link: Link) -> None:
    # Not even a CLEAR of this cache can be encoded: its name is what msgpack refuses.
    link.sender.publish(UNSENDABLE, OpCode.DELETE, [":1:k"])
    link.sender.sender._send_pending()
    assert link.deliver() == []
    # The next frame the peer hears (a heartbeat here) shows the sequence number that was used.
    link.sender.sender._send_heartbeat()
    (heartbeat,) = link.deliver()
    assert heartbeat.seq == 2
    link.clock.now += GAP_GRACE * 2
    link.peer.receiver._tick()
    assert link.peer.counters.gaps_detected == 1
    assert all(store.flushes == 1 for store in link.stores.values())


def test_a_batch_with_nothing_wrong_is_sent_as_before(link: Link) -> None:
    link.sender.publish("c", OpCode.DELETE, [":1:a"])
    link.sender.publish("c", OpCode.DELETE_UNLESS, (":1:b", b"v"))
    link.sender.sender._send_pending()
    (frame,) = link.deliver()
    assert frame.seq == 2
    assert frame.body == [
        Op("c", OpCode.DELETE, [":1:a"]),
        Op("c", OpCode.DELETE_UNLESS, [[":1:b", protocol.digest(b"v")]]),
    ]
    assert link.sender.counters.send_errors == 0


def test_a_reply_too_large_for_a_frame_loses_only_itself() -> None:
    node = MeshNode(parse({"PEERS": [], "MAX_FRAME_BYTES": 4096}), KEY, StaticRegistry([]))
    socket = FakeSocket()
    node.transport = NngTransport(node.config, socket)
    node.ready = True
    huge = protocol.StatsReply(1, b"R" * protocol.NODE_ID_SIZE, {"peers": ["x" * 100] * 100})
    node.sender._outbox += [
        (Kind.STATS_REPLY, protocol.stats_reply_body(huge)),
        (Kind.BYE, None),
    ]
    node.sender._send_pending()
    sent = [node.codec.decode(data) for data in socket.sent]
    assert [frame.kind for frame in sent] == [Kind.BYE]  # the goodbye still goes out
    assert node.counters.send_errors == 1
