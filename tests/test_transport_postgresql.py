"""The PostgreSQL LISTEN/NOTIFY transport against a real server: frames fan out, sizes and bytes
survive, bursts keep their order, outages are reported and recovered from, and closing is
bounded when the server is gone.

The shared server (tests/settings.py's environment variables) must be reachable: without it
these tests are skipped, except with ``CI=true``, where they fail. The restart test also runs a
private server of its own (``initdb``, as the ``postgres`` OS user) on a free loopback port; it
is skipped where that cannot be done, and the backend-termination test covers outages there.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from django_warpmesh.node.transports import TransportError, postgresql_sender
from django_warpmesh.node.transports import postgresql as pg
from django_warpmesh.node.transports import postgresql_payloads as payloads
from django_warpmesh.node.transports.postgresql import PostgresTransport
from harness import ROOT, free_ports, wait_for
from tests.pgserver import PrivateServer, private_postgres


def shared_conninfo() -> str:
    return (
        f"host={os.environ.get('WARPMESH_PG_HOST', '127.0.0.1')} "
        f"port={os.environ.get('WARPMESH_PG_PORT', '5432')} "
        f"dbname={os.environ.get('WARPMESH_PG_NAME', 'test')} "
        f"user={os.environ.get('WARPMESH_PG_USER', 'postgres')}"
    )


@pytest.fixture(scope="module")
def conninfo() -> str:
    from tests.server_available import require

    require("postgresql")
    return shared_conninfo()


@pytest.fixture
def channel() -> str:
    """A channel of this test's own: other tests (and other runs) on the server never see it."""
    return f"warpmesh_t_{secrets.token_hex(6)}"


class Events:
    """What a transport told its node, in order."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.reasons: list[str] = []

    def transport_connected(self) -> None:
        self.log.append("connected")

    def transport_lost(self, reason: str) -> None:
        self.reasons.append(reason)
        self.log.append("lost")


class Started:
    def __init__(self, transport: PostgresTransport) -> None:
        self.transport = transport
        self.events = Events()
        transport.start(self.events)

    def collect(self, count: int, timeout: float = 10.0) -> list[bytes]:
        """Exactly ``count`` frames from the inbox (failing after ``timeout``)."""
        frames: list[bytes] = []

        def enough() -> bool:
            frames.extend(r.data for r in self.transport.receive(count - len(frames)))
            return len(frames) >= count

        wait_for(enough, timeout, message=f"{count} frames (got {len(frames)})")
        return frames


Factory = Callable[..., Started]


@pytest.fixture
def start(request: pytest.FixtureRequest, channel: str) -> Iterator[Factory]:
    """Starts transports (on the shared server and this test's channel unless told otherwise),
    closing them all at the end."""
    started: list[Started] = []

    def make(**options: Any) -> Started:
        options.setdefault("inbox_capacity", 4096)
        options.setdefault("display_url", "postgresql://127.0.0.1/test")
        if "conninfo" not in options:  # the shared server, which must then be reachable
            options["conninfo"] = request.getfixturevalue("conninfo")
        transport = PostgresTransport(
            options.pop("conninfo"), options.pop("channel", channel), **options
        )
        started.append(Started(transport))
        return started[-1]

    yield make
    for node in started:
        node.transport.close(2.0)


def connected(*nodes: Started) -> None:
    wait_for(lambda: all(node.transport.connected for node in nodes), message="connected")


def admin_execute(conninfo: str, query: str, params: tuple[Any, ...] = ()) -> list[Any]:
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as conn:
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description else []


def threads_alive(transport: PostgresTransport) -> bool:
    threads = (transport._listener.thread, transport._sender.thread)
    return any(thread is not None and thread.is_alive() for thread in threads)


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    return free_ports(1)[0]


# -- without a server ----------------------------------------------------------------------------


def test_importing_the_transports_never_imports_psycopg() -> None:
    code = (
        "import sys\n"
        "import django_warpmesh.node.transports\n"
        "import django_warpmesh.node.transports.postgresql\n"
        "assert 'psycopg' not in sys.modules, 'psycopg imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


@pytest.mark.parametrize("name", ["", "Upper", "with-dash", "x" * 64, 'q"uote'])
def test_a_channel_must_be_a_plain_identifier(name: str) -> None:
    with pytest.raises(TransportError, match="channel"):
        PostgresTransport("dbname=test", name, inbox_capacity=1, display_url="x")


def test_a_malformed_connection_string_never_shows_its_password() -> None:
    with pytest.raises(TransportError) as raised:
        PostgresTransport(
            "password=hunter2 nonsense", "warpmesh_x", inbox_capacity=1, display_url="x"
        )
    assert "hunter2" not in str(raised.value)


def test_max_frame_bytes_is_the_largest_frame_whose_encoding_fits_one_payload() -> None:
    assert PostgresTransport.max_frame_bytes == pg.MAX_FRAME_BYTES == payloads.MAX_FRAME_BYTES
    encode = payloads.encode_payload
    assert len(encode(bytes(pg.MAX_FRAME_BYTES))) <= payloads.PAYLOAD_LIMIT
    assert len(encode(bytes(pg.MAX_FRAME_BYTES + 1))) > payloads.PAYLOAD_LIMIT
    header = f"{'f' * 16}:{payloads.MAX_REPLY_CHUNKS - 1}:{payloads.MAX_REPLY_CHUNKS}:"
    assert len(header) <= payloads.REPLY_HEADER_CHARS
    assert len(header + encode(bytes(payloads.REPLY_CHUNK_BYTES))) <= payloads.PAYLOAD_LIMIT


def test_close_before_start_is_harmless() -> None:
    transport = PostgresTransport("dbname=test", "warpmesh_x", inbox_capacity=1, display_url="x")
    transport.close(1.0)
    transport.close(1.0)
    transport.start(Events())  # after close: never connects
    assert not transport.connected
    assert not transport.send(b"frame")


# -- on the shared server ------------------------------------------------------------------------


@pytest.mark.broker
def test_every_transport_receives_every_frame_its_own_included(start: Factory) -> None:
    nodes = [start() for _ in range(3)]
    connected(*nodes)
    assert all(node.events.log == ["connected"] for node in nodes)
    for index, node in enumerate(nodes):
        assert node.transport.send(f"frame from {index}".encode())
    expected = {f"frame from {index}".encode() for index in range(3)}
    for node in nodes:
        # A listening session receives its own sender's notifications too (documented).
        assert set(node.collect(3)) == expected
    assert nodes[0].transport.describe()["frames_sent"] == 1


@pytest.mark.broker
def test_frames_up_to_max_frame_bytes_round_trip_exactly_and_larger_are_refused(
    start: Factory,
) -> None:
    sender, receiver = start(), start()
    connected(sender, receiver)
    frames = [os.urandom(4096), os.urandom(PostgresTransport.max_frame_bytes)]
    for frame in frames:
        assert sender.transport.send(frame)
    assert not sender.transport.send(os.urandom(PostgresTransport.max_frame_bytes + 1))
    assert not sender.transport.send(b"")
    assert receiver.collect(2) == frames
    info = sender.transport.describe()
    assert info["send_refused"] == 2
    assert info["send_failed"] == 0


@pytest.mark.broker
def test_every_byte_value_round_trips(start: Factory) -> None:
    sender, receiver = start(), start()
    connected(sender, receiver)
    frames = [bytes(range(256)), bytes(reversed(range(256))) * 4, b"\0", b"\0\xff" * 100]
    for frame in frames:
        assert sender.transport.send(frame)
    assert receiver.collect(len(frames)) == frames


@pytest.mark.broker
def test_a_burst_arrives_complete_and_in_order(start: Factory) -> None:
    sender, receiver = start(), start()
    connected(sender, receiver)
    frames = [index.to_bytes(4, "big") + os.urandom(1020) for index in range(2000)]
    for frame in frames:
        assert sender.transport.send(frame)
    assert receiver.collect(len(frames)) == frames
    assert sender.collect(len(frames)) == frames
    info = sender.transport.describe()
    assert info["frames_sent"] == 2000
    # Sent in bursts: never more statements than frames, never more frames in one than allowed.
    assert 1 <= info["round_trips"] <= 2000
    assert info["largest_burst"] <= postgresql_sender.MAX_BURST_FRAMES


@pytest.mark.broker
def test_the_inbox_drops_and_counts_frames_past_its_capacity(start: Factory) -> None:
    sender, receiver = start(), start(inbox_capacity=5)
    connected(sender, receiver)
    frames = [bytes([index]) * 10 for index in range(20)]
    for frame in frames:
        assert sender.transport.send(frame)
    wait_for(lambda: receiver.transport.inbox.dropped == 15, message="15 frames dropped")
    assert [received.data for received in receiver.transport.receive(100)] == frames[:5]
    assert receiver.transport.describe()["inbox_dropped"] == 15
    # Room again once drained.
    assert sender.transport.send(b"after")
    assert receiver.collect(1) == [b"after"]


@pytest.mark.broker
def test_malformed_payloads_are_dropped_and_counted(
    conninfo: str, channel: str, start: Factory
) -> None:
    node = start()
    connected(node)
    address = node.transport.open_reply_inbox(lambda data: None)
    for payload in ("not base64!", "", "QUJD=", "héllo"):  # the last three: padding, non-ASCII
        admin_execute(conninfo, "SELECT pg_notify(%s, %s)", (channel, payload))
    admin_execute(conninfo, f"NOTIFY \"{channel}\", 'raw NOTIFY, not a frame'")
    for payload in (
        "no header",
        "0123:0:1:QUJD",
        "0123456789abcdef:1:1:QUJD",
        "0123456789abcdef:0:1:!",
    ):
        admin_execute(conninfo, "SELECT pg_notify(%s, %s)", (address, payload))
    assert node.transport.send(b"a good frame")
    assert node.collect(1) == [b"a good frame"]
    wait_for(lambda: node.transport.malformed == 9, message="9 malformed payloads counted")
    assert node.transport.receive(10) == []
    assert node.transport.describe()["malformed_received"] == 9
    assert node.transport.connected


@pytest.mark.broker
def test_a_large_reply_is_chunked_and_reassembled(start: Factory) -> None:
    asker, answerer, bystander = start(), start(), start()
    connected(asker, answerer, bystander)
    replies: list[bytes] = []
    address = asker.transport.open_reply_inbox(replies.append)
    assert address.startswith(f"{asker.transport.channel}_r_")
    assert len(address) <= 63
    assert asker.transport.open_reply_inbox(replies.append) == address  # one inbox
    data = os.urandom(600_000)
    assert answerer.transport.send_reply(address, data)
    assert answerer.transport.send_reply(address, b"")
    wait_for(lambda: len(replies) == 2, message="two replies")
    assert replies == [data, b""]
    assert not answerer.transport.send_reply(address, bytes(payloads.MAX_REPLY_BYTES + 1))
    assert not answerer.transport.send_reply("not a channel!", b"x")
    # Replies travel on the asker's channel only: nothing reached the mesh's.
    assert bystander.transport.receive(10) == []
    assert asker.transport.describe()["replies_received"] == 2


@pytest.mark.broker
def test_incomplete_replies_are_dropped_when_too_many_or_too_old(
    conninfo: str, start: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(payloads, "REPLY_TIMEOUT", 0.3)
    node = start()
    connected(node)
    replies: list[bytes] = []
    address = node.transport.open_reply_inbox(replies.append)
    for index in range(payloads.MAX_OPEN_REPLIES + 1):  # chunk 0 of 2 of each: never complete
        admin_execute(
            conninfo,
            "SELECT pg_notify(%s, %s)",
            (address, f"{index:016x}:0:2:{payloads.encode_payload(b'x')}"),
        )
    # One too many was dropped at once, the others when they grew too old.
    wait_for(
        lambda: node.transport.replies_dropped == payloads.MAX_OPEN_REPLIES + 1,
        message="every incomplete reply dropped",
    )
    assert replies == []


@pytest.mark.broker
@pytest.mark.parametrize("killed", [("listen",), ("notify",), ("listen", "notify")])
def test_killed_backends_are_reported_lost_then_reconnected(
    conninfo: str, start: Factory, killed: tuple[str, ...]
) -> None:
    node, peer = start(), start()
    connected(node, peer)
    before = {node.transport.listen_pid, node.transport.notify_pid}
    pids = {role: getattr(node.transport, f"{role}_pid") for role in killed}
    names = dict(
        admin_execute(
            conninfo,
            "SELECT pid, application_name FROM pg_stat_activity WHERE pid = ANY(%s)",
            (list(pids.values()),),
        )
    )
    assert names == {pid: f"warpmesh-{role}" for role, pid in pids.items()}
    admin_execute(
        conninfo,
        "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid",
        (list(pids.values()),),
    )
    # Seen by the thread that owns each connection, idle or not.
    wait_for(lambda: node.events.log[:2] == ["connected", "lost"], message="lost")
    wait_for(lambda: node.events.log == ["connected", "lost", "connected"], message="reconnected")
    # Both connections are new, the one not killed too: it was opened before the loss, so it
    # might have died in the same event, unnoticed yet.
    assert not before & {node.transport.listen_pid, node.transport.notify_pid}
    info = node.transport.describe()
    assert (info["connects"], info["disconnects"]) == (2, 1)
    assert info["last_error"] is not None
    assert peer.events.log == ["connected"]
    node.transport.receive(100)
    assert node.transport.send(b"from the recovered node")
    assert peer.transport.send(b"to the recovered node")
    assert set(node.collect(2)) == {b"from the recovered node", b"to the recovered node"}
    assert set(peer.collect(2)) == {b"from the recovered node", b"to the recovered node"}


# -- with no server ------------------------------------------------------------------------------


@pytest.mark.broker
def test_an_unreachable_server_is_retried_and_sends_are_refused(start: Factory) -> None:
    node = start(conninfo=f"host=127.0.0.1 port={closed_port()} dbname=test user=postgres")
    # Both connections failed, then failed again: still trying.
    wait_for(lambda: node.transport.connect_failures >= 4, message="retries")
    assert not node.transport.connected
    assert node.events.log == []
    assert node.transport.last_error is not None
    assert not node.transport.send(b"frame")  # refused, not queued for later
    assert node.transport.describe()["queued"] == 0
    node.transport.close(1.0)
    node.transport.close(1.0)
    assert not threads_alive(node.transport)


@pytest.mark.broker
def test_close_is_bounded_when_the_server_hangs(start: Factory) -> None:
    # Accepts TCP connections (the kernel does, into the backlog) and never answers.
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    try:
        port = hung.getsockname()[1]
        node = start(conninfo=f"host=127.0.0.1 port={port} dbname=test connect_timeout=2")
        node.transport.close(0.2)  # returns although both threads are still connecting
        node.transport.close(0.2)
        assert not node.transport.connected
        assert not node.transport.send(b"frame")
        # And the threads end once their connection attempts give up.
        wait_for(lambda: not threads_alive(node.transport), message="threads ended")
        assert node.events.log == []
    finally:
        hung.close()


# -- a private server, stopped and started ------------------------------------------------------


@pytest.fixture
def private_server() -> Iterator[PrivateServer]:
    with private_postgres() as server:
        yield server


@pytest.mark.broker
def test_a_server_restart_is_survived(private_server: PrivateServer) -> None:
    channel = f"warpmesh_t_{secrets.token_hex(6)}"
    nodes = [
        Started(
            PostgresTransport(
                private_server.conninfo, channel, inbox_capacity=100, display_url="private"
            )
        )
        for _ in range(2)
    ]
    try:
        # The server is not up yet: both keep trying.
        wait_for(lambda: all(node.transport.connect_failures >= 2 for node in nodes))
        assert not any(node.transport.send(b"too early") for node in nodes)
        private_server.start()
        connected(*nodes)
        assert nodes[0].transport.send(b"before")
        assert nodes[1].collect(1) == [b"before"]

        private_server.stop()
        for node in nodes:
            wait_for(lambda node=node: node.events.log == ["connected", "lost"], message="lost")
            assert not node.transport.connected
            assert not node.transport.send(b"during")
        private_server.start()
        for node in nodes:
            wait_for(
                lambda node=node: node.events.log == ["connected", "lost", "connected"],
                timeout=15,
                message="reconnected",
            )
        connected(*nodes)
        for node in nodes:
            node.transport.receive(100)
        assert nodes[1].transport.send(b"after")
        assert nodes[0].collect(1) == [b"after"]
        assert nodes[0].transport.describe()["disconnects"] == 1
    finally:
        for node in nodes:
            node.transport.close(2.0)
