"""Hand-made frames from a raw nng socket into a real mesh process: gaps, replays, forgeries."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import pynng
import pytest
from django.test import override_settings

from django_warpmesh import protocol
from django_warpmesh.conf import get_settings
from django_warpmesh.node_factory import frame_key
from django_warpmesh.protocol import Frame, Heartbeat, Kind, Op, OpCode
from harness import free_ports, wait_for
from tests.cluster import MeshProcess

pytestmark = pytest.mark.mesh

SECRET = "raw-frame-tests-secret"


class RawPeer:
    """A peer that speaks the protocol by hand, to send what a real node never would."""

    def __init__(self, address: str, secret: str = SECRET) -> None:
        with override_settings(WARPMESH={"SECRET": secret, "PEERS": []}):
            self.codec = protocol.Codec(frame_key(get_settings()))
        self.node_id = os.urandom(protocol.NODE_ID_SIZE)
        self.epoch = time.time_ns() // 1_000_000
        self.socket = pynng.Bus0(recv_timeout=100)
        self.socket.dial(f"tcp://{address}", block=True)

    def send(
        self,
        kind: Kind,
        seq: int,
        body: object,
        *,
        origin: bytes | None = None,
        epoch: int | None = None,
    ) -> bytes:
        frame = Frame(
            kind, origin or self.node_id, self.epoch if epoch is None else epoch, seq, body
        )
        data = self.codec.encode(frame)
        self.socket.send(data)
        return data

    def hello(self, seq: int = 0) -> None:
        self.send(Kind.HEARTBEAT, seq, protocol.heartbeat_body(Heartbeat("", time.monotonic_ns())))

    def delete(self, seq: int, *keys: str, alias: str = "default") -> bytes:
        # The wire carries full keys: KEY_PREFIX (empty here) and VERSION (1) applied.
        body = protocol.ops_body([Op(alias, OpCode.DELETE, [f":1:{key}" for key in keys])])
        return self.send(Kind.INVALIDATE, seq, body)

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def target() -> Iterator[tuple[MeshProcess, str]]:
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    proc = MeshProcess(
        {
            "BIND": "127.0.0.1",
            "PORT": port,
            "PORT_RANGE": 1,
            "PEERS": [address],
            "SECRET": SECRET,
            "HEARTBEAT": 0.2,
        }
    )
    proc.request("start")
    try:
        yield proc, address
    finally:
        proc.close()


def fill(proc: MeshProcess, *keys: str) -> None:
    for key in keys:
        proc.cache("set", key, key, None)
    assert all(proc.stored(key) for key in keys)


def test_in_order_frames_are_applied(target: tuple[MeshProcess, str]) -> None:
    proc, address = target
    fill(proc, "a", "b", "keep")
    peer = RawPeer(address)
    try:
        peer.hello()
        peer.delete(1, "a")
        peer.delete(2, "b")
        wait_for(lambda: not proc.stored("a") and not proc.stored("b"), 5, message="applied")
        assert proc.stored("keep")
        assert proc.stats()["gaps_detected"] == 0
    finally:
        peer.close()


def test_a_sequence_gap_flushes_the_caches(target: tuple[MeshProcess, str]) -> None:
    proc, address = target
    peer = RawPeer(address)
    try:
        peer.hello()
        peer.delete(1, "x")
        wait_for(lambda: proc.stats()["invalidations_received"] >= 1, 5, message="frame 1")
        fill(proc, "survivor", "other-alias")
        proc.cache("set", "in-other", 1, None, alias="other")
        peer.delete(3, "unrelated")  # frame 2 was "lost"
        wait_for(lambda: proc.stats()["gaps_detected"] == 1, 5, message="gap detected")
        wait_for(lambda: not proc.stored("survivor"), 5, message="flush")
        assert not proc.stored("in-other", alias="other")
    finally:
        peer.close()


def test_a_lost_last_frame_is_noticed_by_the_heartbeat(target: tuple[MeshProcess, str]) -> None:
    proc, address = target
    peer = RawPeer(address)
    try:
        peer.hello(seq=0)
        wait_for(lambda: proc.stats()["frames_received"] >= 1, 5, message="hello")
        fill(proc, "cached")
        # Frame 1 never arrives; the next heartbeat says the last seq was 1.
        peer.hello(seq=1)
        wait_for(lambda: proc.stats()["gaps_detected"] == 1, 5, message="gap from heartbeat")
        wait_for(lambda: not proc.stored("cached"), 5, message="flush")
    finally:
        peer.close()


def test_replays_and_duplicates_are_dropped(target: tuple[MeshProcess, str]) -> None:
    proc, address = target
    peer = RawPeer(address)
    try:
        peer.hello()
        first = peer.delete(1, "a")
        wait_for(lambda: proc.stats()["invalidations_received"] == 1, 5, message="frame 1")
        fill(proc, "a")
        peer.socket.send(first)  # the very same bytes again
        peer.send(
            Kind.INVALIDATE,
            1,
            protocol.ops_body([Op("default", OpCode.CLEAR, None)]),
            epoch=peer.epoch - 1,
        )  # an older epoch of the same node
        peer.delete(2, "marker")
        wait_for(lambda: proc.stats()["invalidations_received"] == 2, 5, message="frame 2")
        stats = proc.stats()
        assert stats["duplicates"] == 1
        assert stats["rejected_by_reason"].get("replayed") == 1
        assert proc.stored("a")
    finally:
        peer.close()


def test_wrong_secret_and_foreign_origin_are_rejected(target: tuple[MeshProcess, str]) -> None:
    proc, address = target
    fill(proc, "a")
    stranger = RawPeer(address, secret="some-other-secret")
    peer = RawPeer(address)
    try:
        stranger.hello()
        stranger.delete(1, "a")
        peer.hello()
        peer.send(
            Kind.INVALIDATE,
            1,
            protocol.ops_body([Op("default", OpCode.DELETE, [":1:a"])]),
            origin=os.urandom(protocol.NODE_ID_SIZE),
        )
        peer.socket.send(b"\x00garbage" * 10)

        def rejected() -> dict[str, int]:
            return proc.stats()["rejected_by_reason"]  # type: ignore[no-any-return]

        # The stranger's first frame fails: its connection is hung up on at once, so its
        # second is rejected too if it was already taken in, or dropped with the connection.
        wait_for(
            lambda: rejected().get("bad_mac", 0) >= 2 and rejected().get("foreign_origin") == 1,
            5,
            message="rejections",
        )
        reasons = rejected()
        assert reasons["bad_mac"] + reasons.get("dropped_connection", 0) <= 3
        assert reasons["foreign_origin"] == 1
        assert proc.stored("a")
        assert proc.cache("get", "a") == "a"
    finally:
        stranger.close()
        peer.close()


def test_replayed_heartbeats_do_not_keep_a_silent_peer_alive(
    target: tuple[MeshProcess, str],
) -> None:
    proc, address = target
    peer = RawPeer(address)
    try:
        captured = peer.send(
            Kind.HEARTBEAT, 0, protocol.heartbeat_body(Heartbeat("", time.monotonic_ns()))
        )
        wait_for(lambda: proc.stats()["peers_lost"] == 0 and connected_ids(proc), 5, message="up")
        # The peer falls silent; someone replays its last heartbeat, again and again.
        duplicates = proc.stats()["duplicates"]
        wait_for(
            lambda: peer.socket.send(captured) or proc.stats()["peers_lost"] >= 1,
            5,
            interval=0.05,
            message="the silent peer to be lost despite the replays",
        )
        assert proc.stats()["duplicates"] > duplicates
    finally:
        peer.close()


def connected_ids(proc: MeshProcess) -> set[str]:
    return {p["id"] for p in proc.stats()["peers"] if p["connected"] and p["id"]}


def ask_for_stats(peer: RawPeer, request_id: int) -> tuple[pynng.Socket, str]:
    """Send a stats request naming a reply address of the peer's own: the reply comes there."""
    inbox = pynng.Rep0(recv_timeout=5000)
    listener = inbox.listen("tcp://127.0.0.1:0")
    reply_to = f"127.0.0.1:{str(listener.local_address).rsplit(':', 1)[1]}"
    peer.send(Kind.STATS_REQUEST, 0, protocol.stamped(time.monotonic_ns(), [request_id, reply_to]))
    return inbox, reply_to


def test_an_observer_asking_before_its_first_heartbeat_is_answered_not_listed(
    target: tuple[MeshProcess, str],
) -> None:
    proc, address = target
    peer = RawPeer(address)
    try:
        inbox, _ = ask_for_stats(peer, 7)
        with inbox:
            frame = peer.codec.decode(inbox.recv())
            inbox.send(b"")
        assert frame.kind is Kind.STATS_REPLY
        reply = frame.body.value
        assert isinstance(reply, protocol.StatsReply)
        assert (reply.request_id, reply.requester) == (7, peer.node_id)
        # It has not introduced itself: it is neither a peer nor a lost one.
        assert all(row["id"] != peer.node_id.hex() for row in reply.stats["peers"])
        stats = proc.stats()
        assert all(row["id"] != peer.node_id.hex() for row in stats["peers"])
        assert stats["peers_lost"] == 0
    finally:
        peer.close()


def test_a_stats_reply_goes_to_the_asker_only(target: tuple[MeshProcess, str]) -> None:
    _, address = target
    asker, bystander = RawPeer(address), RawPeer(address)
    try:
        bystander.hello()
        inbox, _ = ask_for_stats(asker, 9)
        with inbox:
            assert asker.codec.decode(inbox.recv()).kind is Kind.STATS_REPLY
            inbox.send(b"")
        # The bus carried no reply: the bystander hears heartbeats only.
        heard = []
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            with contextlib.suppress(pynng.Timeout):
                heard.append(bystander.codec.decode(bystander.socket.recv()).kind)
        assert Kind.HEARTBEAT in heard
        assert Kind.STATS_REPLY not in heard
    finally:
        asker.close()
        bystander.close()
