"""Coverage-guided fuzzing of a whole node's receive path with atheris (``pip install atheris``).

    .venv/bin/python -m tests.fuzz.fuzz_node tests/fuzz/corpus_node -max_total_time=120
    .venv/bin/python -m tests.fuzz.fuzz_node --make-corpus     # (re)write the seed corpus

Each input is read as a script of steps against a fresh :class:`MeshNode` that has no socket
(its clock, pipes and stores are fakes, as in ``tests/test_pipes.py``): pipes connect and go in
any order (nng's callbacks), frames arrive in batches on any pipe, and the receiver ticks. The
frames are those of a few fake peers signed with the mesh key (every kind, sequence numbers and
epochs that go on, repeat, jump and go back, heartbeats replayed), copies of earlier frames on
other pipes (duplicates, replays), the node's own frames, frames signed with another key, random
bytes, signed bytes that are no frame, and an earlier frame's tag on other bytes (what anyone
who can connect sees on the wire).

After every step: nothing escaped the node; a frame that fails verification changed nothing of
what the node knows (pipe owners, parking, peers, their sequence numbers and liveness, what was
applied or queued to send); and its maps stay within their bounds (peers, recent tags, missing
sequence numbers per peer, connections hung up on; peers alive are never forgotten for a new
one, so the table's cap holds for the others). The bounds are lowered for the run so a short
input can reach them. ``tests/test_fuzz_corpus.py`` replays the corpus on every test run.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.fakes import Clock, FakeDialer, FakePipe

KEY = b"fuzzing-key-not-a-secret-32bytes"
OTHER_KEY = b"another-key-not-the-mesh-key-32b"
CORPUS = Path(__file__).parent / "corpus_node"
ADDRESS = "127.0.0.1:1"
PIPES = 6  # pipe ids 1..PIPES
PEERS = 4  # fake peers; the table keeps at most MAX_PEERS_FUZZED of them
MAX_PEERS_FUZZED = 3
RECENT_TAGS_FUZZED = 16
MAX_STEPS = 64


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The node's warnings (rejected frames, hung-up connections) are what it should say."""
    log = logging.getLogger("django_warpmesh")
    disabled, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = disabled


class Draw:
    """Reads numbers off the input; zeros once it is used up (then the script ends)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    @property
    def done(self) -> bool:
        return self.at >= len(self.data)

    def byte(self) -> int:
        if self.at >= len(self.data):
            return 0
        self.at += 1
        return self.data[self.at - 1]

    def below(self, n: int) -> int:
        if n <= 256:
            return self.byte() % n
        return (self.byte() << 8 | self.byte()) % n

    def chance(self, in_256: int) -> bool:
        return self.byte() < in_256

    def raw(self, most: int) -> bytes:
        size = self.below(most + 1)
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk


@dataclass
class FakeMessage:
    data: bytes
    source: FakePipe


@dataclass
class RecordingStore:
    applied: int = 0
    flushes: int = 0

    def apply(self, ops: Sequence[Any]) -> None:
        self.applied += len(ops)

    def flush(self) -> None:
        self.flushes += 1


@dataclass
class FakePeer:
    node_id: bytes
    epoch: int = 1_700_000_000_000
    seq: int = 0
    sent_ns: int = 1_000
    epochs: list[int] = field(default_factory=list)


class Harness:
    def __init__(self, protocol: ModuleType, core: ModuleType, peers: ModuleType) -> None:
        self.protocol, self.core, self.peers_module = protocol, core, peers
        # The node's own limit (MAX_FRAME_BYTES' default), so "verifies" means the same here.
        limit = core.MeshSettings().max_frame_bytes
        self.codec = protocol.Codec(KEY, max_frame_bytes=limit)
        self.other = protocol.Codec(OTHER_KEY, max_frame_bytes=limit)

    @contextlib.contextmanager
    def small_bounds(self) -> Iterator[None]:
        """Bounds low enough for a short input to reach them (restored after)."""
        receiving = sys.modules[self.core.__name__.rpartition(".")[0] + ".receiving"]
        saved = receiving.RECENT_TAGS, self.peers_module.MAX_MISSING
        receiving.RECENT_TAGS, self.peers_module.MAX_MISSING = RECENT_TAGS_FUZZED, 64
        try:
            yield
        finally:
            receiving.RECENT_TAGS, self.peers_module.MAX_MISSING = saved

    def one_input(self, data: bytes) -> None:
        with self.small_bounds(), quiet():
            Run(self, Draw(data)).run()

    # -- what "fails verification" means, computed apart from the node -------------------------

    def verifies(self, data: bytes) -> bool:
        p = self.protocol
        if len(data) < 8 + p.TAG_SIZE or len(data) > self.codec.max_frame_bytes:
            return False
        payload, tag = data[: -p.TAG_SIZE], data[-p.TAG_SIZE :]
        mac = hmac.new(KEY, payload, hashlib.sha256).digest()[: p.TAG_SIZE]
        if not hmac.compare_digest(mac, tag):
            return False
        try:
            self.codec.decode(data)
        except p.ProtocolError:
            return False
        return True

    def seed_corpus(self) -> dict[str, bytes]:
        import random

        rng = random.Random(14)
        corpus = {f"random-{i}": rng.randbytes(rng.randrange(16, 400)) for i in range(24)}
        # Scripts that mostly deliver frames (step 2), on pipes connected first (step 0).
        for i in range(8):
            steps = bytearray()
            for pipe in range(PIPES):
                steps += bytes([0, pipe])
            for _ in range(30):
                steps += bytes([2, rng.randrange(4)]) + rng.randbytes(12)
                if rng.random() < 0.2:
                    steps += bytes([3, rng.randrange(256)])
            corpus[f"frames-{i}"] = bytes(steps)
        return corpus


class Run:
    def __init__(self, harness: Harness, draw: Draw) -> None:
        from django_warpmesh.conf import parse
        from django_warpmesh.node import MeshNode
        from django_warpmesh.node_factory import StaticRegistry

        self.h, self.draw = harness, draw
        p = harness.protocol
        self.clock = Clock()
        node = MeshNode(
            parse({"PEERS": [ADDRESS], "HEARTBEAT": 1.0}),
            KEY,
            StaticRegistry([]),
            clock=self.clock,
        )
        node.node_id = bytes([draw.byte()]) + b"\x80" * (p.NODE_ID_SIZE - 1)
        node.ready = draw.chance(200)
        node.table.max_peers = MAX_PEERS_FUZZED
        self.dialer = FakeDialer()
        node.links.dialers[ADDRESS] = self.dialer
        self.stores = {alias: RecordingStore() for alias in ("a", "b")}
        for alias, store in self.stores.items():
            node.register_store(alias, store)
        self.node = node
        self.pipes = {i: FakePipe(i, self.dialer if i == 1 else None) for i in range(1, PIPES + 1)}
        self.peers = [
            FakePeer(bytes([16 * (i + 1)]) + b"\x40" * (p.NODE_ID_SIZE - 1)) for i in range(PEERS)
        ]
        self.sent: list[bytes] = []  # every message delivered so far (for copies and tags)
        self.waiting = False
        # The most peers alive at once, at any moment (a batch can make one alive and the next
        # leave): the table's size is bounded by it.
        self.peak_alive = 0
        heard = node.table.heard

        def counted(peer: Any, now: float | None = None) -> bool:
            was_alive = heard(peer, now)
            alive = sum(p.alive for p in node.table.peers.values())
            self.peak_alive = max(self.peak_alive, alive)
            return was_alive

        node.table.heard = counted  # type: ignore[method-assign]

    def run(self) -> None:
        for _ in range(MAX_STEPS):
            if self.draw.done:
                return
            step = self.draw.below(5)
            if step == 0:
                pipe = self.pipes[1 + self.draw.below(PIPES)]
                pipe.closed = 0
                self.node._on_pipe_connect(pipe)
            elif step == 1:
                self.node._on_pipe_remove(self.pipes[1 + self.draw.below(PIPES)])
            elif step in (2, 4):
                self.deliver([self.message() for _ in range(1 + self.draw.below(4))])
            else:
                self.clock.now += self.draw.byte() / 64
                if self.draw.chance(32) and not self.waiting:
                    self.node.request_stats(1, lambda node_id, stats: None)
                    self.waiting = True
                self.node.receiver._tick()
            self.check_bounds()

    # -- frames ---------------------------------------------------------------------------------

    def message(self) -> FakeMessage:
        pipe = self.pipes[1 + self.draw.below(PIPES)]
        door = self.draw.below(10)
        p = self.h.protocol
        if door <= 3:
            frame = self.frame()
            data = self.signed(frame)
            if self.draw.chance(160):
                # Mostly on a pipe of that peer's own (its two links, like a real pair), so
                # that frames get past the owner check to the sequence numbers and the rest.
                home = 1 + (frame.origin[0] // 16 - 1) % PIPES
                pipe = self.pipes[home if self.draw.chance(128) else 1 + home % PIPES]
        elif door == 4 and self.sent:
            data = self.sent[self.draw.below(len(self.sent))]  # a copy: duplicate, or replay
        elif door == 5:
            data = self.h.other.encode(self.frame())  # another key
        elif door == 6 and self.sent:
            # An earlier frame's tag (anyone connected sees them) on other bytes.
            tag = self.sent[self.draw.below(len(self.sent))][-p.TAG_SIZE :]
            data = self.draw.raw(40) + tag
        elif door == 7:
            payload = self.draw.raw(64)  # signed, but no frame: the parser behind the MAC
            data = payload + self.h.codec._tag(payload)
        elif door == 8:
            frame = self.frame()._replace(origin=self.node.node_id)  # our own, come back
            data = self.signed(frame)
        else:
            data = self.draw.raw(80)
        self.sent.append(data)
        return FakeMessage(data, pipe)

    def signed(self, frame: Any) -> bytes:
        try:
            return bytes(self.h.codec.encode(frame))
        except self.h.protocol.ProtocolError:
            return b"too large"

    def frame(self) -> Any:
        p = self.h.protocol
        peer = self.peers[self.draw.below(PEERS)]
        epoch_move = self.draw.below(8)
        if epoch_move == 0:
            peer.epochs.append(peer.epoch)
            peer.epoch += 1 + self.draw.byte()  # a restart
            peer.seq = 0
        epoch = peer.epoch
        if epoch_move == 1 and peer.epochs:
            epoch = peer.epochs[self.draw.below(len(peer.epochs))]  # an earlier start's
        kind = p.Kind(1 + self.draw.below(len(p.Kind)))
        seq_move = self.draw.below(8)
        if kind is p.Kind.INVALIDATE:
            if seq_move <= 4:
                peer.seq += 1
            elif seq_move == 5:
                peer.seq += 2 + self.draw.below(200)  # frames lost
            elif seq_move == 6:
                peer.seq = max(0, peer.seq - self.draw.below(4))  # gone back: a replay
        elif seq_move == 7:
            peer.seq += self.draw.below(100)
        # Control frames carry a stamp, strictly increasing per sender (a heartbeat's sent_ns):
        # mostly a new one, sometimes one already used (a replay).
        if kind is not p.Kind.INVALIDATE and not self.draw.chance(48):
            peer.sent_ns += 1 + self.draw.byte()
        body: Any = None
        if kind is p.Kind.INVALIDATE:
            alias = "ab"[self.draw.below(2)]
            code = p.OpCode(1 + self.draw.below(len(p.OpCode)))
            args: Any = {
                p.OpCode.DELETE: [":1:k"],
                p.OpCode.DELETE_UNLESS: [[":1:k", b"12345678"]],
                p.OpCode.CLEAR: None,
                p.OpCode.PATTERN: ":1:*",
                p.OpCode.TAGS: ["t:x"],
            }[code]
            body = p.ops_body([p.Op(alias, code, args)])
        elif kind is p.Kind.HEARTBEAT:
            echo = ((self.node.node_id, 5, 1),) if self.draw.chance(64) else ()
            heartbeat = p.Heartbeat(ADDRESS, peer.sent_ns, echo, self.draw.chance(32))
            body = p.heartbeat_body(heartbeat)
        elif kind is p.Kind.STATS_REQUEST:
            body = [self.draw.below(4), "127.0.0.1:9"]
        elif kind is p.Kind.STATS_REPLY:
            requester = self.node.node_id if self.draw.chance(200) else peer.node_id
            stats: dict[str, Any] = {"node_id": peer.node_id.hex(), "peers": [{"id": "x"}]}
            body = p.stats_reply_body(p.StatsReply(self.draw.below(3), requester, stats))
        elif kind is p.Kind.BYE_ACK:
            body = self.node.node_id if self.draw.chance(128) else peer.node_id
        if kind not in (p.Kind.INVALIDATE, p.Kind.HEARTBEAT):
            body = p.stamped(peer.sent_ns, body)
        return p.Frame(kind, peer.node_id, epoch, peer.seq, body)

    # -- delivery and the checks ----------------------------------------------------------------

    def deliver(self, messages: list[FakeMessage]) -> None:
        """Frames that verify go in batches; each one that does not goes alone, with what the
        node knows compared before and after it."""
        batch: list[FakeMessage] = []
        for message in messages:
            if self.h.verifies(message.data):
                batch.append(message)
                continue
            if batch:
                self.node.receiver._handle_batch(batch)
                batch = []
            before = self.state()
            self.node.receiver._handle_batch([message])
            after = self.state()
            if after != before:
                raise AssertionError(
                    f"a frame that fails verification changed the node's state: {message!r}\n"
                    + "\n".join(
                        f"  {name}: {b!r} -> {a!r}"
                        for name, b, a in zip(STATE_NAMES, before, after, strict=True)
                        if a != b
                    )
                )
        if batch:
            self.node.receiver._handle_batch(batch)

    def state(self) -> tuple[Any, ...]:
        node, links = self.node, self.node.links
        return (
            dict(links.pipe_owner),
            dict(links.pipe_dialed),
            dict(links.parked),
            set(links.unpark),
            [id(d) for d in links.closing],
            dict(links.dialers),
            set(links.live_pipes),
            set(links.self_pipes),
            {
                node_id: (
                    peer.epoch,
                    peer.highest,
                    dict(peer.missing),
                    set(peer.pipes),
                    peer.last_heard,
                    peer.alive,
                    peer.heard_ns,
                    peer.control_ns,
                    peer.latest_tag,
                    peer.observer,
                    peer.address,
                    peer.dialed_as,
                    peer.latency_ms,
                    peer.invalidations_received,
                )
                for node_id, peer in node.table.peers.items()
            },
            node.ready,
            list(node.sender._outbox),
            set(node.sender._bye_acks),
            dict(node.receiver._recent_tags),
            [(s.applied, s.flushes) for s in self.stores.values()],
            (
                node.counters.flushes,
                node.counters.invalidations_received,
                node.counters.gaps_detected,
            ),
        )

    def check_bounds(self) -> None:
        node = self.node
        table = node.table
        # Peers alive are never forgotten for a new one (test_peer_state.py says why), and the
        # table shrinks back only as new ones come: it holds at most the cap, or the most peers
        # ever alive at once and one more on its way to being heard.
        assert len(table.peers) <= max(MAX_PEERS_FUZZED, self.peak_alive + 1), len(table.peers)
        assert len(node.receiver._recent_tags) <= RECENT_TAGS_FUZZED, len(
            node.receiver._recent_tags
        )
        for peer in table.peers.values():
            assert len(peer.missing) <= self.h.peers_module.MAX_MISSING, len(peer.missing)
            assert peer.pipes <= node.links.live_pipes, (peer.pipes, node.links.live_pipes)
        assert len(node.guard._dropped) <= self.h.core.DROPPED_PIPES_KEPT
        assert len(node.guard._strikes) <= PIPES
        assert set(node.links.pipes) <= node.links.live_pipes


STATE_NAMES = (
    "pipe_owner",
    "pipe_dialed",
    "parked",
    "unpark",
    "closing",
    "dialers",
    "live_pipes",
    "self_pipes",
    "peers",
    "ready",
    "outbox",
    "bye_acks",
    "recent_tags",
    "stores (applied, flushes)",
    "counters (flushes, invalidations_received, gaps_detected)",
)


def harness() -> Harness:
    from django_warpmesh import protocol
    from django_warpmesh.node import core, peers

    return Harness(protocol, core, peers)


def main() -> None:
    if "--make-corpus" in sys.argv:
        CORPUS.mkdir(exist_ok=True)
        for name, data in harness().seed_corpus().items():
            (CORPUS / name).write_bytes(data)
        return
    import atheris

    with atheris.instrument_imports(include=["django_warpmesh"]):
        built = harness()
    atheris.Setup(sys.argv, built.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
