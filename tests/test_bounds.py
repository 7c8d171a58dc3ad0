"""What strangers and slow peers can make a node hold (issue 14): frames that fit the receive
limit, connections hung up on, drains that end. Nodes driven directly, without the network."""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any

import pynng

from django_warpmesh import protocol
from django_warpmesh.conf import parse
from django_warpmesh.node import MeshNode
from django_warpmesh.node.core import PIPE_STRIKES, REPLY_MAX_BYTES
from django_warpmesh.node.peers import HEARTBEAT_FANIN
from django_warpmesh.node.transports.nng import NngTransport
from django_warpmesh.node_factory import StaticRegistry
from django_warpmesh.protocol import Frame, Heartbeat, Kind
from tests.fakes import Clock, FakeMessage, FakeNngMessage, FakePipe

KEY = b"k" * 32


def node(clock: Clock | None = None, **warpmesh: Any) -> MeshNode:
    built = MeshNode(
        parse({"PEERS": [], **warpmesh}), KEY, StaticRegistry([]), clock=clock or Clock()
    )
    built.ready = True
    return built


def heartbeat(origin: bytes, codec: protocol.Codec | None = None) -> bytes:
    body = protocol.heartbeat_body(Heartbeat("127.0.0.1:1", time.monotonic_ns()))
    return (codec or protocol.Codec(KEY)).encode(Frame(Kind.HEARTBEAT, origin, 1, 0, body))


def connected(receiver: MeshNode) -> FakePipe:
    pipe = FakePipe()
    receiver._on_pipe_connect(pipe)
    return pipe


# -- connections that send junk -------------------------------------------------------------------


def test_a_connection_that_starts_with_junk_is_hung_up_on_and_its_queued_frames_dropped() -> None:
    receiver = node()
    stranger = connected(receiver)
    receiver.receiver._handle_batch([FakeMessage(os.urandom(200), stranger)])
    assert stranger.closed == 1
    assert receiver.counters.pipes_dropped == 1
    assert receiver.counters.rejected_by_reason["bad_mac"] == 1
    # What it had queued before it was hung up on is dropped unread, not verified one by one.
    receiver.receiver._handle_batch([FakeMessage(os.urandom(200), stranger) for _ in range(50)])
    assert receiver.counters.rejected_by_reason["dropped_connection"] == 50
    assert receiver.counters.rejected_by_reason["bad_mac"] == 1
    assert receiver.counters.frames_received == 51
    assert stranger.closed == 1
    assert receiver.counters.pipes_dropped == 1


def test_a_peer_connection_is_hung_up_on_after_several_invalid_frames_over_its_life() -> None:
    receiver = node()
    pipe = connected(receiver)
    peer = b"\x07" * protocol.NODE_ID_SIZE
    codec = protocol.Codec(KEY)
    receiver.receiver._handle_batch([FakeMessage(heartbeat(peer, codec), pipe)])
    assert receiver.links.pipe_owner[pipe.id] == peer
    # Valid frames in between do not wipe the slate: whoever listens to the mesh can replay one.
    for _ in range(PIPE_STRIKES - 1):
        receiver.receiver._handle_batch(
            [FakeMessage(os.urandom(100), pipe), FakeMessage(heartbeat(peer, codec), pipe)]
        )
    assert pipe.closed == 0
    receiver.receiver._handle_batch([FakeMessage(os.urandom(100), pipe)])
    assert pipe.closed == 1
    assert receiver.counters.pipes_dropped == 1


def test_a_connection_with_nothing_verifiable_is_hung_up_on_after_the_liveness_window() -> None:
    clock = Clock()
    receiver = node(clock, HEARTBEAT=1.0)
    silent, peer_pipe = connected(receiver), connected(receiver)
    receiver.receiver._handle_batch(
        [FakeMessage(heartbeat(b"\x05" * protocol.NODE_ID_SIZE), peer_pipe)]
    )
    clock.now += 2.9  # within 3 heartbeats: a peer's first heartbeat may still be on its way
    receiver.receiver._tick()
    assert silent.closed == 0
    clock.now += 0.2
    receiver.receiver._tick()
    assert silent.closed == 1
    assert peer_pipe.closed == 0
    assert receiver.counters.pipes_dropped == 1
    receiver.receiver._tick()  # nng has not reported it gone yet: hung up on, and counted, once
    assert silent.closed == 1
    assert receiver.counters.pipes_dropped == 1
    receiver._on_pipe_remove(silent)
    receiver.receiver._tick()
    assert silent.closed == 1  # gone: not hung up on again


def test_strikes_of_connections_gone_are_forgotten() -> None:
    receiver = node()
    pipe = connected(receiver)
    receiver.receiver._handle_batch([FakeMessage(heartbeat(b"\x05" * protocol.NODE_ID_SIZE), pipe)])
    receiver.receiver._handle_batch([FakeMessage(os.urandom(100), pipe)])
    assert receiver.guard._strikes == {pipe.id: 1}
    receiver._on_pipe_remove(pipe)
    receiver.receiver._tick()
    assert receiver.guard._strikes == {}


# -- the drain ends -------------------------------------------------------------------------------


class EndlessSocket:
    """A receive queue that never empties (a flood), counting what was taken."""

    def __init__(self) -> None:
        self.taken = 0
        self.pipe = FakePipe()

    def recv_msg(self, block: bool = True) -> FakeNngMessage:
        self.taken += 1
        return FakeNngMessage(os.urandom(64), self.pipe)


def test_a_drain_takes_at_most_what_the_queue_can_hold() -> None:
    receiver = node(BUFFER_SIZE=1000)
    sock = EndlessSocket()
    receiver.transport = NngTransport(receiver.config, sock)
    receiver.receiver._drain_socket()
    # Everything queued when it started is at most BUFFER_SIZE frames: taken, and no more, so
    # a flood cannot keep the receiver from its tick, nor a reading thread from its read.
    assert sock.taken == 1000


class FewSocket(EndlessSocket):
    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    def recv_msg(self, block: bool = True) -> FakeNngMessage:
        if self.taken == self.count:
            raise pynng.TryAgain(-1, "empty")
        return super().recv_msg(block)


def test_a_drain_takes_everything_queued() -> None:
    receiver = node()
    sock = FewSocket(700)
    receiver.transport = NngTransport(receiver.config, sock)
    receiver.receiver._drain_socket()
    assert sock.taken == 700
    assert receiver.counters.frames_received == 700


def test_pynng_forgets_the_pipes_of_connections_gone() -> None:
    receiver = node()

    class Sock:
        _pipe_notify_lock = threading.Lock()

    sock = Sock()
    live = connected(receiver)
    # pynng adds a Pipe back for a frame taken after its connection went: never removed.
    sock._pipes = {live.id: live, 999_001: FakePipe(999_001), 999_002: FakePipe(999_002)}  # type: ignore[attr-defined]
    receiver.socket = sock
    receiver.receiver._tick()
    assert set(sock._pipes) == {live.id}  # type: ignore[attr-defined]


# -- every frame the node sends fits the receive limit -------------------------------------------


def test_a_heartbeat_with_more_live_peers_than_fit_echoes_them_in_turns() -> None:
    """A heartbeat echoes HEARTBEAT_FANIN peers at most (its cost to every receiver does not
    grow with the mesh), never more than fit a frame, and every peer in turn."""
    sender = node()
    sent: list[bytes] = []

    class Sock:
        def send(self, data: bytes) -> None:
            sent.append(data)

    sender.transport = NngTransport(sender.config, Sock())
    ids = [i.to_bytes(protocol.NODE_ID_SIZE, "big") for i in range(1, 501)]
    for node_id in ids:
        peer = sender.table.add(node_id)
        peer.alive, peer.heard_ns, peer.heard_at_ns = True, 5, 6
    echoed: set[bytes] = set()
    for _ in range(math.ceil(len(ids) / HEARTBEAT_FANIN)):
        sender.sender._send_heartbeat()
    for data in sent:
        assert len(data) <= sender.config.max_frame_bytes
        echo = sender.codec.decode(data).body.echo
        assert len(echo) == HEARTBEAT_FANIN
        echoed |= {entry[0] for entry in echo}
    assert echoed == set(ids)


def test_a_stats_reply_larger_than_a_bus_frame_reaches_the_asker_whole() -> None:
    """Replies go to the asker on a connection of their own, not on the bus: a whole snapshot
    (a row per peer) is not bound by MAX_FRAME_BYTES, only by REPLY_MAX_BYTES."""
    responder, asker = node(), node()
    for i in range(1, 301):
        peer = responder.table.add(i.to_bytes(protocol.NODE_ID_SIZE, "big"))
        peer.alive, peer.address = True, f"10.0.{i // 256}.{i % 256}:7934"
    sent: list[tuple[str, bytes]] = []

    class Replies:
        def send(self, address: str, data: bytes) -> bool:
            sent.append((address, data))
            return True

    responder.replies = Replies()  # type: ignore[assignment]
    got: list[dict[str, Any]] = []
    asker.inquiries._stats_waiters[42] = lambda node_id, stats: got.append(stats)
    responder.inquiries._on_stats_request(
        responder.table.add(asker.node_id), protocol.StatsRequest(42, "127.0.0.1:9")
    )
    ((address, data),) = sent
    assert address == "127.0.0.1:9"
    assert responder.config.max_frame_bytes < len(data) <= REPLY_MAX_BYTES
    asker.inquiries._on_reply_bytes(data)
    (stats,) = got
    assert len(stats["peers"]) == 300
    assert responder.counters.send_errors == asker.counters.frames_rejected == 0
