"""Which pipes a node counts for a peer, and when it hangs up its own dialer: the node's
bookkeeping driven directly, in the orders nng's threads can produce."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from django_warpmesh import protocol
from django_warpmesh.conf import parse
from django_warpmesh.mesh import StaticRegistry
from django_warpmesh.node import MeshNode
from django_warpmesh.protocol import Frame, Heartbeat, Kind

KEY = b"k" * 32
SMALLER, LARGER = b"\x00" * protocol.NODE_ID_SIZE, b"\xff" * protocol.NODE_ID_SIZE
ADDRESS = "127.0.0.1:1"


@dataclass
class FakeDialer:
    closed: bool = False

    def close(self) -> None:
        self.closed = True


@dataclass
class FakePipe:
    id: int
    dialer: FakeDialer | None = None


@dataclass
class FakeMessage:
    bytes: bytes
    pipe: FakePipe


@dataclass
class Heartbeats:
    """Heartbeats from the peer ``origin``, each one fresh."""

    origin: bytes
    codec: protocol.Codec = field(default_factory=lambda: protocol.Codec(KEY))
    epoch: int = field(default_factory=lambda: time.time_ns() // 1_000_000)

    def on(self, pipe: FakePipe) -> FakeMessage:
        body = protocol.heartbeat_body(Heartbeat(ADDRESS, time.monotonic_ns()))
        return FakeMessage(
            self.codec.encode(Frame(Kind.HEARTBEAT, self.origin, self.epoch, 0, body)), pipe
        )


@dataclass
class Pair:
    """A node (not started) with its own dialer to the peer, and the pair's two pipes."""

    node: MeshNode
    dialer: FakeDialer
    peer: Heartbeats
    ours: FakePipe
    theirs: FakePipe


def pair(node_id: bytes, peer_id: bytes) -> Pair:
    node = MeshNode(parse({"PEERS": [ADDRESS]}), KEY, StaticRegistry([]))
    node.node_id = node_id
    dialer = FakeDialer()
    node._links.dialers[ADDRESS] = dialer
    built = Pair(node, dialer, Heartbeats(peer_id), FakePipe(1, dialer), FakePipe(2))
    node._on_pipe_connect(built.ours)
    node._handle_batch([built.peer.on(built.ours)])
    return built


def test_a_pipe_whose_first_frame_beats_its_connect_callback_still_counts() -> None:
    p = pair(SMALLER, LARGER)
    # The peer's own pipe delivers a frame before nng has run our connect callback for it.
    p.node._handle_batch([p.peer.on(p.theirs)])
    assert p.node._table.peers[LARGER].pipes == {1}
    assert not p.dialer.closed
    p.node._on_pipe_connect(p.theirs)
    p.node._handle_batch([p.peer.on(p.theirs)])
    assert p.node._table.peers[LARGER].pipes == {1, 2}
    # Both pipes of the pair are up: the smaller id hangs up its own dialer.
    assert p.dialer.closed
    assert p.node._links.parked == {ADDRESS: LARGER}


def test_a_pipe_already_gone_is_not_counted() -> None:
    p = pair(SMALLER, LARGER)
    p.node._on_pipe_connect(p.theirs)
    p.node._on_pipe_remove(p.theirs)
    p.node._handle_batch([p.peer.on(p.theirs)])  # a frame nng had queued before the pipe went
    assert p.node._table.peers[LARGER].pipes == {1}
    assert not p.dialer.closed


def test_the_larger_id_keeps_its_dialer() -> None:
    p = pair(LARGER, SMALLER)
    p.node._on_pipe_connect(p.theirs)
    p.node._handle_batch([p.peer.on(p.theirs)])
    assert p.node._table.peers[SMALLER].pipes == {1, 2}
    assert not p.dialer.closed
    assert p.node._links.parked == {}
