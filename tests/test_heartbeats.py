"""Heartbeats whose cost does not grow with the mesh: the promised period, the confirmation of
a last frame within HEARTBEAT, and a dead peer found by its closed connections (no network: a
node driven with fakes; test_scale.py shows the same with real processes)."""

from __future__ import annotations

from typing import Any

import pytest

from django_warpmesh import protocol
from django_warpmesh.conf import parse
from django_warpmesh.node import MeshNode
from django_warpmesh.node.peers import HEARTBEAT_FANIN, LIVENESS_HEARTBEATS, heartbeat_period
from django_warpmesh.node.transports.nng import NngTransport
from django_warpmesh.node_factory import StaticRegistry
from django_warpmesh.protocol import Frame, Heartbeat, Kind, Op, OpCode
from tests.fakes import Clock, FakeMessage, FakePipe, FakeSocket

KEY = b"k" * 32
PEER = b"P" * protocol.NODE_ID_SIZE


def node(clock: Clock, **warpmesh: Any) -> MeshNode:
    built = MeshNode(
        parse({"PEERS": [], "HEARTBEAT": 1.0, **warpmesh}), KEY, StaticRegistry([]), clock=clock
    )
    built.ready = True
    built.transport = NngTransport(built.config, FakeSocket())
    return built


def with_members(mesh: MeshNode, count: int) -> None:
    for index in range(count):
        peer = mesh.table.add(index.to_bytes(protocol.NODE_ID_SIZE, "big"))
        peer.alive, peer.heard_ns, peer.heard_at_ns = True, 5, 6


def sent(mesh: MeshNode) -> list[bytes]:
    assert isinstance(mesh.transport, NngTransport)
    return list(mesh.transport.socket.sent)


def sent_heartbeats(mesh: MeshNode) -> list[Heartbeat]:
    frames = [mesh.codec.decode(data) for data in sent(mesh)]
    return [frame.body for frame in frames if frame.kind is Kind.HEARTBEAT]


def heartbeat_from(origin: bytes, period_ms: int, stamp: int = 1) -> bytes:
    body = protocol.heartbeat_body(Heartbeat("127.0.0.1:1", stamp, period_ms=period_ms))
    return protocol.Codec(KEY).encode(Frame(Kind.HEARTBEAT, origin, 1, 0, body))


def connected_pipe(mesh: MeshNode) -> FakePipe:
    pipe = FakePipe()
    mesh._on_pipe_connect(pipe)
    return pipe


@pytest.mark.parametrize(
    ("members", "expected"),
    [(0, 1.0), (1, 1.0), (HEARTBEAT_FANIN, 1.0), (2 * HEARTBEAT_FANIN, 2.0), (63, 63 / 8)],
)
def test_the_period_grows_with_the_mesh_past_the_fan_in(members: int, expected: float) -> None:
    assert HEARTBEAT_FANIN == 8
    assert heartbeat_period(1.0, members) == pytest.approx(expected)


def test_a_heartbeat_promises_the_period_of_the_mesh_it_is_in() -> None:
    mesh = node(Clock())
    with_members(mesh, 63)
    period = mesh.sender._send_heartbeat()
    (heartbeat,) = sent_heartbeats(mesh)
    assert period == pytest.approx(63 / HEARTBEAT_FANIN)
    assert heartbeat.period_ms == round(period * 1000)
    # Its receivers parse a few echo entries, not one per peer.
    assert len(heartbeat.echo) == HEARTBEAT_FANIN
    assert mesh.snapshot()["heartbeat_period"] == period


def test_an_observer_keeps_the_plain_heartbeat() -> None:
    mesh = MeshNode(parse({"PEERS": []}), KEY, StaticRegistry([]), observer=True, clock=Clock())
    mesh.transport = NngTransport(mesh.config, FakeSocket())
    with_members(mesh, 63)
    assert mesh.sender._send_heartbeat() == mesh.config.heartbeat


def test_a_frame_sent_after_a_heartbeat_is_confirmed_within_heartbeat_not_the_period() -> None:
    """A lost last frame shows only on the sender's next frame: that is a heartbeat within
    HEARTBEAT of it, however long the idle period has grown."""
    clock = Clock()
    mesh = node(clock)
    with_members(mesh, 63)
    mesh.sender._send_heartbeat()
    assert mesh.sender._confirm_by == float("inf")
    next_heartbeat = clock.now + 63 / HEARTBEAT_FANIN  # as the sender thread computed it
    clock.advance(0.3)
    # Asleep for at most HEARTBEAT, whatever the period: it sees a confirmation in time...
    assert mesh.sender._next_wait(clock.now, next_heartbeat) == pytest.approx(1.0)
    mesh.sender._send_invalidate([Op("default", OpCode.DELETE, ["k"])])
    assert mesh.sender._confirm_by == pytest.approx(clock.now + 1.0)
    # ...without the writing thread waking it (see Sender._next_wait).
    assert not mesh.sender._wake.wait(0)
    clock.advance(0.2)
    mesh.sender._send_invalidate([Op("default", OpCode.DELETE, ["j"])])
    assert mesh.sender._confirm_by == pytest.approx(clock.now - 0.2 + 1.0)  # once per heartbeat
    assert mesh.sender._next_wait(clock.now, next_heartbeat) == pytest.approx(0.8)
    mesh.sender._send_heartbeat()  # the confirmation: it carries the last seq
    assert mesh.sender._confirm_by == float("inf")
    frames = [mesh.codec.decode(data) for data in sent(mesh)]
    assert frames[-1].kind is Kind.HEARTBEAT
    assert frames[-1].seq == 2


def test_a_peer_is_lost_after_the_periods_it_promised_not_ours() -> None:
    clock = Clock()
    mesh = node(clock)
    pipe = connected_pipe(mesh)
    mesh.receiver._handle_batch([FakeMessage(heartbeat_from(PEER, period_ms=10_000), pipe)])
    peer = mesh.table.peers[PEER]
    assert peer.alive
    assert peer.period == 10.0
    clock.advance(LIVENESS_HEARTBEATS * 1.0 + 1)  # past our own liveness window
    mesh.receiver._tick()
    assert peer.alive
    clock.advance(LIVENESS_HEARTBEATS * 10.0)
    mesh.receiver._tick()
    assert not peer.alive
    assert mesh.counters.peers_lost == 1


def test_a_peer_whose_connections_all_closed_is_lost_after_our_own_window() -> None:
    """A process killed on a host that stays up closes its connections: it is lost (and the
    caches flushed) within LIVENESS_HEARTBEATS x HEARTBEAT, not its long promised period."""
    clock = Clock()
    mesh = node(clock)
    first, second = connected_pipe(mesh), connected_pipe(mesh)
    for stamp, pipe in enumerate((first, second), start=1):
        mesh.receiver._handle_batch([FakeMessage(heartbeat_from(PEER, 60_000, stamp), pipe)])
    peer = mesh.table.peers[PEER]
    assert peer.pipes == {first.id, second.id}
    mesh._on_pipe_remove(first)
    clock.advance(LIVENESS_HEARTBEATS * 1.0 + 1)
    mesh.receiver._tick()
    assert peer.alive  # one connection left: alive
    mesh._on_pipe_remove(second)
    clock.advance(LIVENESS_HEARTBEATS * 1.0 - 0.5)
    mesh.receiver._tick()
    assert peer.alive  # it may reconnect (a network blip): its next heartbeat shows any gap
    clock.advance(1.0)
    mesh.receiver._tick()
    assert not peer.alive
    assert mesh.counters.flushes == 1


def test_a_peer_that_reconnects_in_time_is_not_lost() -> None:
    clock = Clock()
    mesh = node(clock)
    old = connected_pipe(mesh)
    mesh.receiver._handle_batch([FakeMessage(heartbeat_from(PEER, 60_000, 1), old)])
    mesh._on_pipe_remove(old)
    clock.advance(1.0)
    new = connected_pipe(mesh)
    mesh.receiver._handle_batch([FakeMessage(heartbeat_from(PEER, 60_000, 2), new)])
    clock.advance(LIVENESS_HEARTBEATS * 1.0 + 1)
    mesh.receiver._tick()
    assert mesh.table.peers[PEER].alive
    assert mesh.counters.flushes == 0


def test_a_write_that_finds_the_sender_thread_sending_wakes_it() -> None:
    """The sender thread, busy with a heartbeat, does not look at the queue again when it is
    done: a writing thread that leaves its frame queued must wake it, or the frame waits for
    the next heartbeat (up to a period)."""
    mesh = node(Clock())
    assert not mesh.sender._wake.wait(0)
    with mesh.sender._send_lock:  # the sender thread, mid-heartbeat
        mesh.publish("default", OpCode.DELETE, [":1:k"])
        mesh.deliver()
        assert mesh.queued == 1  # left for the thread that holds the lock
    assert mesh.sender._wake.wait(0)
    mesh.sender._send_pending()  # what the woken sender thread does
    assert mesh.queued == 0
    (frame,) = [mesh.codec.decode(data) for data in sent(mesh)]
    assert frame.kind is Kind.INVALIDATE
