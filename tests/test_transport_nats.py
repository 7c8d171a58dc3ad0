"""The NATS transport against a real nats-server of the test's own (tests/natsserver.py).

Needs nats-py (the ``test`` extra) and the ``nats-server`` binary (Debian's ``nats-server``
package). Without nats-py the module is skipped, without the binary the tests that need a
server are; except in CI (``CI=true``), where they fail saying what is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from django_warpmesh.node.transports import TransportError
from django_warpmesh.node.transports.nats import (
    DEFAULT_MAX_PAYLOAD,
    MAX_OUTBOX_BYTES,
    NatsTransport,
)
from harness import ROOT, free_ports, wait_for
from tests.natsserver import NatsServer, PeerProcess, required_binary

try:
    import nats  # noqa: F401
except ImportError:
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("nats-py is not installed (pip install -e '.[test]')", allow_module_level=True)

CHANNEL = "warpmesh_0123456789ab"


class Peer:
    """A NatsTransport under test, what its events said, and every frame it received."""

    def __init__(self, url: str, *, capacity: int = 1000, **options: float) -> None:
        self.transport = NatsTransport(url, CHANNEL, inbox_capacity=capacity, **options)
        self.events: list[str] = []
        self.frames: list[bytes] = []

    def transport_connected(self) -> None:
        self.events.append("connected")

    def transport_lost(self, reason: str) -> None:
        self.events.append(f"lost: {reason}")

    def received(self) -> list[bytes]:
        self.frames.extend(received.data for received in self.transport.receive(1000))
        return self.frames

    def wait_frames(self, *frames: bytes) -> None:
        wait_for(
            lambda: all(frame in self.received() for frame in frames),
            10,
            message=f"{frames} received",
        )

    def wait_events(self, *events: str) -> None:
        """Until the events so far start with ``events`` (a ``lost`` event by its prefix)."""

        def said() -> bool:
            if len(self.events) < len(events):
                return False
            return all(
                seen.startswith(expected)
                for seen, expected in zip(self.events, events, strict=False)
            )

        wait_for(said, 10, message=f"events {events} (so far {self.events})")


@pytest.fixture(scope="module")
def binary() -> str:
    return required_binary()


@pytest.fixture
def server(binary: str, tmp_path: Path) -> Iterator[NatsServer]:
    nats = NatsServer(binary, tmp_path)
    nats.start()
    try:
        yield nats
    finally:
        nats.kill()


@pytest.fixture
def peers() -> Iterator[Callable[..., Peer]]:
    """``peers(url, start=True, **options)``: a Peer, closed (and its thread checked gone) at
    the end of the test."""
    made: list[Peer] = []

    def make(url: str, *, start: bool = True, **options: float) -> Peer:
        peer = Peer(url, **options)
        made.append(peer)
        if start:
            peer.transport.start(peer)
        return peer

    yield make
    for peer in made:
        peer.transport.close(2.0)
    for peer in made:
        thread = peer.transport._link.thread
        assert thread is None or not thread.is_alive(), "a warpmesh-nats thread is left"


def connected(*peers: Peer) -> None:
    wait_for(lambda: all(peer.transport.connected for peer in peers), 10, message="connected")


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "",
        "   ",
        "127.0.0.1:4222",
        "http://127.0.0.1:4222",
        "nats://",
        "nats://:4222",
        "nats://127.0.0.1:99999",
        "nats://127.0.0.1:port",
        "nats://127.0.0.1:0",
        "nats://127.0.0.1:4222/subject",
        "nats://127.0.0.1:4222?tls=1",
        "nats://127.0.0.1:4222,,nats://127.0.0.2:4222",
        "nats://a:4222,redis://b:6379",
    ],
)
def test_a_malformed_url_is_refused_up_front(url: str) -> None:
    with pytest.raises(TransportError, match="NATS URL"):
        NatsTransport(url, CHANNEL, inbox_capacity=10)


def test_a_password_is_never_shown() -> None:
    transport = NatsTransport(
        "nats://alice:s3cret@127.0.0.1:4222, tls://t0ken@[::1], nats://nats.internal",
        CHANNEL,
        inbox_capacity=10,
    )
    assert transport.url == (
        "nats://alice:***@127.0.0.1:4222,tls://***@[::1]:4222,nats://nats.internal:4222"
    )
    assert "s3cret" not in str(transport.describe())
    with pytest.raises(TransportError) as raised:
        NatsTransport("nats://alice:s3cret@127.0.0.1:99999", CHANNEL, inbox_capacity=10)
    assert "s3cret" not in str(raised.value)
    transport.close(1.0)  # never started: nothing to stop
    transport.close(1.0)


@pytest.mark.parametrize("channel", ["", "a b", "warpmesh.*", "warpmesh.>", "a..b", "a."])
def test_a_channel_that_is_no_subject_is_refused(channel: str) -> None:
    with pytest.raises(TransportError, match="subject"):
        NatsTransport("nats://127.0.0.1:4222", channel, inbox_capacity=10)


def test_without_nats_py_the_error_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("nats", "nats.aio", "nats.aio.client"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(TransportError, match=r"pip install 'django-warpmesh\[nats\]'"):
        NatsTransport("nats://127.0.0.1:4222", CHANNEL, inbox_capacity=10)


def test_importing_the_transports_never_imports_nats_py() -> None:
    code = (
        "import sys\n"
        "import django_warpmesh.node.transports as transports\n"
        "assert transports.NatsTransport.name == 'nats'\n"
        "assert 'nats' not in sys.modules, sorted(m for m in sys.modules if 'nats' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


# -- against a server --------------------------------------------------------------------------


@pytest.mark.mesh
def test_frames_cross_between_two_transports_and_never_come_back(
    server: NatsServer, peers: Callable[..., Peer]
) -> None:
    a, b = peers(server.url), peers(server.url)
    connected(a, b)
    assert a.events == b.events == ["connected"]
    assert a.transport.send(b"from a")
    b.wait_frames(b"from a")
    # Sent once the server has passed a's frame on: had a's come back to a, it would be first.
    assert b.transport.send(b"from b")
    a.wait_frames(b"from b")
    assert a.received() == [b"from b"]
    assert b.received() == [b"from a"]
    described = a.transport.describe()
    assert described["name"] == "nats"
    assert described["server"] == server.url
    assert described["connected"] is True
    assert described["connects"] == 1


@pytest.mark.mesh
def test_a_frame_reaches_every_subscriber_in_this_process_and_another(
    server: NatsServer, peers: Callable[..., Peer]
) -> None:
    child = PeerProcess(server.url, CHANNEL)
    try:
        sender, first, second = peers(server.url), peers(server.url), peers(server.url)
        connected(sender, first, second)
        wait_for(lambda: "connected" in child.lines, 15, message="the other process connected")
        assert sender.transport.send(b"fan out")
        first.wait_frames(b"fan out")
        second.wait_frames(b"fan out")
        # The other process got it too: it echoes it to every subscriber but itself.
        for peer in (sender, first, second):
            peer.wait_frames(b"echo:fan out")
        assert sender.received() == [b"echo:fan out"]
    finally:
        child.close()
    assert child.proc.returncode == 0, child.lines
    assert child.lines[-1].startswith("closed in"), child.lines


@pytest.mark.mesh
def test_inbox_keeps_its_capacity_and_counts_what_it_drops(
    server: NatsServer, peers: Callable[..., Peer]
) -> None:
    sender, full = peers(server.url), peers(server.url, capacity=3)
    connected(sender, full)
    frames = [b"frame %d" % number for number in range(10)]
    for frame in frames:
        assert sender.transport.send(frame)
    wait_for(lambda: full.transport.inbox.dropped == 7, 10, message="7 frames dropped")
    assert full.received() == frames[:3]
    assert full.transport.describe()["inbox_dropped"] == 7


@pytest.mark.mesh
def test_reply_inbox_round_trip(server: NatsServer, peers: Callable[..., Peer]) -> None:
    observer = peers(server.url, start=False)
    replies: list[bytes] = []
    # Opened before the transport starts: subscribed as it connects.
    early = observer.transport.open_reply_inbox(replies.append)
    assert early.startswith(f"{CHANNEL}.reply.")
    observer.transport.start(observer)
    node, bystander = peers(server.url), peers(server.url)
    connected(observer, node, bystander)
    big = b"r" * DEFAULT_MAX_PAYLOAD  # a stats reply may be up to 1 MiB
    assert node.transport.send_reply(early, b"small")
    assert node.transport.send_reply(early, big)
    wait_for(lambda: len(replies) == 2, 10, message="two replies")
    assert replies == [b"small", big]
    # Opened while connected, then a request sent at once: the subscription comes first.
    late: list[bytes] = []
    address = observer.transport.open_reply_inbox(late.append)
    assert observer.transport.send(address.encode())
    node.wait_frames(address.encode())
    assert node.transport.send_reply(address, b"late")
    wait_for(lambda: late == [b"late"], 10, message="the reply to the later inbox")
    assert replies == [b"small", big]
    # Replies never reach the channel's subscribers.
    assert bystander.received() == [address.encode()]
    # Refused: over the server's max_payload, or not a reply inbox of this mesh.
    assert not node.transport.send_reply(early, big + b"!")
    assert not node.transport.send_reply(CHANNEL, b"frame")
    assert not node.transport.send_reply("elsewhere.reply.1", b"data")


@pytest.mark.mesh
def test_server_killed_then_restarted_on_the_same_port(
    server: NatsServer, peers: Callable[..., Peer]
) -> None:
    a, b = peers(server.url), peers(server.url)
    replies: list[bytes] = []
    address = a.transport.open_reply_inbox(replies.append)
    connected(a, b)
    server.kill()
    a.wait_events("connected", "lost: ")
    b.wait_events("connected", "lost: ")
    assert not a.transport.connected
    assert a.transport.disconnects == 1
    assert a.transport.last_error
    assert not a.transport.send(b"while down")  # refused at once, never queued
    server.start()
    a.wait_events("connected", "lost: ", "connected")
    b.wait_events("connected", "lost: ", "connected")
    connected(a, b)
    assert a.transport.connects == b.transport.connects == 2
    assert a.transport.send(b"after")
    b.wait_frames(b"after")
    assert b.received() == [b"after"]  # the refused one is not replayed
    assert b.transport.send_reply(address, b"reply")  # the reply inbox is subscribed again
    wait_for(lambda: replies == [b"reply"], 10, message="the reply after reconnecting")


@pytest.mark.mesh
def test_started_while_the_server_is_down_it_connects_once_the_server_starts(
    binary: str, tmp_path: Path, peers: Callable[..., Peer]
) -> None:
    server = NatsServer(binary, tmp_path)  # not started yet
    try:
        early = peers(server.url)
        wait_for(lambda: early.transport.last_error, 10, message="a failed connection attempt")
        assert not early.transport.connected
        assert early.events == []
        assert not early.transport.send(b"too early")
        server.start()
        late = peers(server.url)
        connected(early, late)
        # The event follows the link's state, from the transport's own thread.
        wait_for(lambda: early.events == ["connected"], 10, message="the connected event")
        assert early.transport.send(b"now")
        late.wait_frames(b"now")
    finally:
        server.kill()


@pytest.mark.mesh
def test_a_hung_server_is_lost_sends_are_bounded_and_close_does_not_wait_for_it(
    server: NatsServer, peers: Callable[..., Peer]
) -> None:
    fast = {"connect_timeout": 0.5}
    a, b = peers(server.url, **fast), peers(server.url, **fast)
    for peer in (a, b):
        peer.transport.ping_interval, peer.transport.ping_timeout = 0.2, 0.5
    connected(a, b)
    server.pause()
    # The socket stays open and nothing answers: what send() takes is bounded, not queued
    # for ever (the outbox, behind nats-py's buffer and the sockets').
    frame = b"f" * 60_000
    accepted = 0
    while a.transport.send(frame):
        accepted += 1
        assert accepted * len(frame) < 10 * MAX_OUTBOX_BYTES, "send() never refuses"
    assert a.transport.describe()["pending_bytes"] <= MAX_OUTBOX_BYTES
    # No answer to their pings: the link is declared lost.
    for peer in (a, b):
        peer.wait_events("connected", "lost: no answer to a ping")
    server.resume()
    for peer in (a, b):
        peer.wait_events("connected", "lost: ", "connected")
    assert a.transport.send(b"back")
    b.wait_frames(b"back")
    server.pause()
    started = time.monotonic()
    b.transport.close(1.0)
    assert time.monotonic() - started < 3.0  # its timeout, and some slack for a busy machine
    server.kill()


@pytest.mark.mesh
def test_close_flushes_what_was_sent(server: NatsServer, peers: Callable[..., Peer]) -> None:
    sender, receiver = peers(server.url), peers(server.url, capacity=10_000)
    connected(sender, receiver)
    frames = [b"last words %d" % number for number in range(2000)]
    for frame in frames:
        assert sender.transport.send(frame)
    sender.transport.close(5.0)
    assert not sender.transport.send(b"after close")
    wait_for(lambda: len(receiver.received()) == len(frames), 10, message="every frame")
    assert receiver.received() == frames


@pytest.mark.mesh
def test_close_is_idempotent_and_bounded_with_the_server_down(
    server: NatsServer, peers: Callable[..., Peer]
) -> None:
    up = peers(server.url)
    connected(up)
    server.kill()
    for peer in (up, peers(server.url)):  # lost, and never connected
        started = time.monotonic()
        peer.transport.close(1.0)
        assert time.monotonic() - started < 3.0  # its timeout, and some slack
        thread = peer.transport._link.thread
        assert thread is not None
        assert not thread.is_alive()
        peer.transport.close(1.0)
        assert peer.transport.receive(10) == []
        assert not peer.transport.send(b"closed")
        assert peer.transport.describe()["connected"] is False
    assert [t.name for t in threading.enumerate()].count("warpmesh-nats") == 0


@pytest.mark.mesh
def test_of_several_servers_the_one_that_answers_is_used(
    server: NatsServer, peers: Callable[..., Peer]
) -> None:
    (nobody,) = free_ports(1)
    several, single = peers(f"nats://127.0.0.1:{nobody}, {server.url}"), peers(server.url)
    connected(several, single)
    assert several.transport.server == server.url
    assert several.transport.send(b"through the live one")
    single.wait_frames(b"through the live one")


@pytest.mark.mesh
def test_a_tls_url_means_tls(
    binary: str, tmp_path: Path, peers: Callable[..., Peer], monkeypatch: pytest.MonkeyPatch
) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("this test needs the openssl command to make its certificate")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert,
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    # The default SSL context (what nats-py uses) trusts what SSL_CERT_FILE names.
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    (tmp_path / "tls").mkdir()
    (tmp_path / "plain").mkdir()
    tls = NatsServer(
        binary, tmp_path / "tls", "--tls", "--tlscert", str(cert), "--tlskey", str(key)
    )
    plain = NatsServer(binary, tmp_path / "plain")
    try:
        tls.start()
        plain.start()
        url = f"tls://127.0.0.1:{tls.port}"
        a, b = peers(url), peers(url)
        connected(a, b)
        assert a.transport.url == b.transport.server == url
        assert a.transport.send(b"encrypted")
        b.wait_frames(b"encrypted")
        # A server that does not ask for TLS is not used in the clear behind a tls:// URL.
        clear = peers(f"tls://127.0.0.1:{plain.port}")
        wait_for(
            lambda: "TLS" in (clear.transport.last_error or ""), 10, message="refused as not TLS"
        )
        assert clear.events == []
        assert not clear.transport.connected
    finally:
        tls.kill()
        plain.kill()
