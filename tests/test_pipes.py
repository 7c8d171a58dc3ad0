"""Which pipes a node counts for a peer, and when it hangs up its own dialer: the node's
bookkeeping driven directly, in the orders nng's threads can produce."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from django_warpmesh import protocol
from django_warpmesh.conf import parse
from django_warpmesh.node import MeshNode
from django_warpmesh.node_factory import StaticRegistry
from django_warpmesh.protocol import Frame, Heartbeat, Kind
from tests.fakes import FakeDialer, FakeMessage, FakePipe

KEY = b"k" * 32
SMALLER, LARGER = b"\x00" * protocol.NODE_ID_SIZE, b"\xff" * protocol.NODE_ID_SIZE
ADDRESS = "127.0.0.1:1"


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
    node.links.dialers[ADDRESS] = dialer
    built = Pair(node, dialer, Heartbeats(peer_id), FakePipe(1, dialer), FakePipe(2))
    node._on_pipe_connect(built.ours)
    node.receiver._handle_batch([built.peer.on(built.ours)])
    return built


def test_a_pipe_whose_first_frame_beats_its_connect_callback_still_counts() -> None:
    p = pair(SMALLER, LARGER)
    # The peer's own pipe delivers a frame before nng has run our connect callback for it.
    p.node.receiver._handle_batch([p.peer.on(p.theirs)])
    assert p.node.table.peers[LARGER].pipes == {1}
    assert not p.dialer.closed
    p.node._on_pipe_connect(p.theirs)
    p.node.receiver._handle_batch([p.peer.on(p.theirs)])
    assert p.node.table.peers[LARGER].pipes == {1, 2}
    # Both pipes of the pair are up: the smaller id hangs up its own dialer.
    assert p.dialer.closed
    assert p.node.links.parked == {ADDRESS: LARGER}


def test_a_pipe_already_gone_is_not_counted() -> None:
    p = pair(SMALLER, LARGER)
    p.node._on_pipe_connect(p.theirs)
    p.node._on_pipe_remove(p.theirs)
    p.node.receiver._handle_batch(
        [p.peer.on(p.theirs)]
    )  # a frame nng had queued before the pipe went
    assert p.node.table.peers[LARGER].pipes == {1}
    assert not p.dialer.closed


def test_the_larger_id_keeps_its_dialer() -> None:
    p = pair(LARGER, SMALLER)
    p.node._on_pipe_connect(p.theirs)
    p.node.receiver._handle_batch([p.peer.on(p.theirs)])
    assert p.node.table.peers[SMALLER].pipes == {1, 2}
    assert not p.dialer.closed
    assert p.node.links.parked == {}


def test_a_stranger_repeating_a_sniffed_tag_owns_no_pipe_and_parks_nothing() -> None:
    p = pair(SMALLER, LARGER)
    stranger = FakePipe(3)
    p.node._on_pipe_connect(stranger)
    sniffed = p.peer.on(p.ours).data  # a frame the peer sent, seen on the wire
    p.node.receiver._handle_batch([FakeMessage(sniffed, p.ours)])
    rejected = p.node.counters.frames_rejected
    # Its tag, behind bytes of the stranger's own: not a copy, so verified, and rejected.
    forged = bytes(200) + sniffed[-protocol.TAG_SIZE :]
    p.node.receiver._handle_batch([FakeMessage(forged, stranger)] * 3)
    assert p.node.counters.frames_rejected == rejected + 3
    assert stranger.id not in p.node.links.pipe_owner
    assert not p.dialer.closed
    assert ADDRESS in p.node.links.dialers


def test_an_old_frame_replayed_owns_no_pipe() -> None:
    p = pair(SMALLER, LARGER)
    captured = p.peer.on(p.ours)
    p.node.receiver._handle_batch([captured])
    p.node.receiver._handle_batch([p.peer.on(p.ours)])  # newer frames since
    replayer = FakePipe(3)
    p.node._on_pipe_connect(replayer)
    # The whole frame, byte for byte, replayed later on another pipe: valid, but not fresh.
    duplicates = p.node.counters.duplicates
    p.node.receiver._handle_batch([FakeMessage(captured.data, replayer)])
    assert p.node.counters.duplicates == duplicates + 1
    assert replayer.id not in p.node.links.pipe_owner
    assert not p.dialer.closed


def test_a_copy_of_our_own_frame_does_not_make_us_our_own_peer() -> None:
    """A second copy of one of our own frames (we dialled ourselves over two pipes) binds no
    pipe to our own id and makes no peer of us (what tests/fuzz/fuzz_node.py checks)."""
    p = pair(SMALLER, LARGER)
    own = Heartbeats(SMALLER, epoch=p.node.epoch)
    first, second = FakePipe(3), FakePipe(4)
    for pipe in (first, second):
        p.node._on_pipe_connect(pipe)
    frame = own.on(first)
    p.node.receiver._handle_batch([frame])
    p.node.receiver._handle_batch([FakeMessage(frame.data, second)])
    assert SMALLER not in p.node.table.peers
    assert p.node.links.self_pipes >= {3}
    assert 4 not in p.node.links.pipe_owner
