"""What a node knows of each peer it hears: sequence numbers, liveness, the freshness of frames.

Pure state, driven by the receiving thread: no socket, no store, no log. :class:`PeerTable`
takes a clock and answers with decisions (:class:`Epoch`, :class:`Seq`, the peers whose gap or
silence went on too long); the node counts, logs and flushes.

Per ``(origin, epoch)`` the highest ``seq`` seen is kept. The next one is applied; one seen
already is a duplicate; a jump leaves the numbers in between missing for ``GAP_GRACE`` seconds
(two pipes joining the same pair can reorder frames), after which they are a gap. Heartbeats
and the other frames carry the sender's latest ``seq`` without using one, so even a lost last
frame shows.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable
from typing import Any

from django_warpmesh.protocol import Frame, Kind

# How long a sequence number may stay missing before we call it lost. Frames of one origin can
# arrive out of order when two pipes join the same pair of nodes (both dialled each other).
GAP_GRACE = 0.05
# A peer heard from within this many of its heartbeat periods counts as alive.
LIVENESS_HEARTBEATS = 3
# Heartbeats a node hears per HEARTBEAT interval at most, whatever the mesh's size: past this
# many peers, each one's period grows with the mesh (see heartbeat_period), so the idle cost of
# a process is constant in N and only the liveness bound of a silent peer grows.
HEARTBEAT_FANIN = 8
# Missing seqs tracked per peer before a gap is declared at once instead of waited on.
MAX_MISSING = 4096
# Peers (alive or remembered for their sequence numbers) kept at most.
MAX_PEERS = 4096


@dataclasses.dataclass
class Peer:
    node_id: bytes
    epoch: int = 0
    address: str = ""
    # The address we dialled it by, when that differs from the one it advertises (a proxy,
    # NAT, a DNS name): what PEERS or the peer table call it.
    dialed_as: str = ""
    highest: int | None = None
    missing: dict[int, float] = dataclasses.field(default_factory=dict)
    pipes: set[int] = dataclasses.field(default_factory=set)
    last_heard: float = 0.0
    heard_ns: int = 0  # the sent_ns of its last heartbeat, echoed back to measure the RTT
    control_ns: int = 0  # the stamp of its last control frame accepted (replay protection)
    latest_tag: bytes = b""  # the tag of its latest frame accepted (see MeshNode._handle_batch)
    heard_at_ns: int = 0
    # Its promised heartbeat period (seconds; 0: not stated yet, the table's default applies).
    period: float = 0.0
    # Since when it has had no connection left (nng mesh only): a process that dies on a host
    # that stays up closes its connections, which shows long before its silence does.
    pipeless_since: float | None = None
    latency_ms: float | None = None
    alive: bool = False
    # When it said goodbye (None: it did not, or came back since): its address is not missed.
    left_at: float | None = None
    observer: bool = False
    invalidations_received: int = 0
    gaps_detected: int = 0
    remote_stats: dict[str, Any] | None = None
    # "connected" not logged yet since it came alive: waits a few heartbeats for the latency.
    announce: bool = False
    announce_heartbeats: int = 0

    @property
    def hex_id(self) -> str:
        return self.node_id.hex()


class Epoch(enum.Enum):
    """What a frame's epoch says of its sender (a new epoch is a new start of it)."""

    CURRENT = "current"
    NEW = "new"  # its first start we hear of, or a restart before it had sent anything
    RESTARTED = "restarted"  # a new start after it had sent: what it sent before is unknown
    REPLAYED = "replayed"  # an earlier start's frame: dropped


class Seq(enum.Enum):
    """What a frame's sequence number says: whether to apply it, and whether to flush."""

    NEXT = "next"  # in order (or nothing before it to miss): apply
    LATE = "late"  # a missing one, arrived within its grace: apply
    AHEAD = "ahead"  # skipped some: apply; the skipped get GAP_GRACE to arrive
    MISSED = "missed"  # first heard after it had sent while we held values: flush, not a gap
    GAP = "gap"  # more missing than can be waited on: a gap, flush
    DUPLICATE = "duplicate"  # seen already: drop


# The verdict of nearly every frame, as a plain global: an enum member costs more to look up.
_NEXT = Seq.NEXT


class PeerTable:
    """Every peer heard from (at most ``max_peers``), by node id.

    Not thread-safe: the node calls it under its own lock where other threads read it, and from
    the thread that holds its drain lock where frames are tracked.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        liveness: float = float(LIVENESS_HEARTBEATS),
        max_peers: int = MAX_PEERS,
    ) -> None:
        self.clock = clock
        # Seconds without a frame after which a peer is lost (one that stated no period), and
        # without a connection (one that had one): LIVENESS_HEARTBEATS x our own HEARTBEAT.
        self.liveness = liveness
        self.max_peers = max_peers
        self.peers: dict[bytes, Peer] = {}

    def get(self, node_id: bytes) -> Peer | None:
        return self.peers.get(node_id)

    def add(self, node_id: bytes) -> Peer:
        """A new peer; at ``max_peers``, the one silent the longest is forgotten for it."""
        peers = self.peers
        if len(peers) >= self.max_peers:
            stale = min(
                (p for p in peers.values() if not p.alive),
                key=lambda p: p.last_heard,
                default=None,
            )
            if stale is not None:
                del peers[stale.node_id]
        peer = peers[node_id] = Peer(node_id)
        return peer

    def get_or_add(self, node_id: bytes) -> Peer:
        return self.peers.get(node_id) or self.add(node_id)

    # -- one verified frame, step by step -----------------------------------------------------

    @staticmethod
    def enter_epoch(peer: Peer, epoch: int) -> Epoch:
        if epoch < peer.epoch:
            return Epoch.REPLAYED
        if epoch == peer.epoch:
            return Epoch.CURRENT
        # Same id, new epoch: it (re)started. Its sequence starts over.
        restarted = peer.highest is not None
        peer.epoch, peer.highest, peer.missing = epoch, None, {}
        peer.heard_ns = peer.control_ns = 0
        return Epoch.RESTARTED if restarted else Epoch.NEW

    @staticmethod
    def is_fresh(peer: Peer, frame: Frame) -> bool:
        """False for a copy of a frame already seen (another pipe, or a replay)."""
        if frame.kind is Kind.INVALIDATE:
            highest = peer.highest
            return highest is None or frame.seq > highest or frame.seq in peer.missing
        # Every other kind is stamped by the sender, strictly increasing over its control
        # frames (a heartbeat's sent_ns is its stamp): a replayed one is an old one.
        return bool(frame.body.sent_ns > peer.control_ns)

    @staticmethod
    def saw_control(peer: Peer, sent_ns: int) -> None:
        """A fresh control frame was accepted: anything stamped before it is a replay."""
        peer.control_ns = sent_ns

    def heard(self, peer: Peer, now: float | None = None) -> bool:
        """It is alive as of ``now``; returns whether it already was."""
        was_alive = peer.alive
        peer.last_heard = self.clock() if now is None else now
        peer.alive = True
        peer.left_at = None
        return was_alive

    def left(self, peer: Peer, now: float | None = None) -> None:
        """It said goodbye: not alive, and not lost either."""
        peer.alive = False
        peer.left_at = self.clock() if now is None else now

    def track_invalidate(self, peer: Peer, seq: int, ready: bool, now: float | None = None) -> Seq:
        """An INVALIDATE frame numbered ``seq`` (invalidation frames count from 1)."""
        highest = peer.highest
        if highest is None:
            peer.highest = seq
            return Seq.MISSED if _first_contact_missed(seq - 1, ready) else Seq.NEXT
        if seq == highest + 1:
            peer.highest = seq
            return _NEXT
        if seq > highest:
            verdict = self._note_missing(peer, highest + 1, seq, now)
            peer.highest = seq
            return verdict
        if peer.missing.pop(seq, None) is None:
            return Seq.DUPLICATE
        return Seq.LATE

    def track_seq(self, peer: Peer, seq: int, ready: bool, now: float | None = None) -> Seq:
        """Any other frame: it carries the sender's latest ``seq`` without using one."""
        highest = peer.highest
        if highest is None:
            peer.highest = seq
            return Seq.MISSED if _first_contact_missed(seq, ready) else Seq.NEXT
        if seq > highest:
            peer.highest = seq
            return self._note_missing(peer, highest + 1, seq + 1, now)
        return _NEXT

    def _note_missing(self, peer: Peer, first: int, end: int, now: float | None) -> Seq:
        if end - first + len(peer.missing) > MAX_MISSING:
            peer.missing.clear()
            return Seq.GAP
        at = self.clock() if now is None else now
        for seq in range(first, end):
            peer.missing[seq] = at
        return Seq.AHEAD

    # -- periodically -------------------------------------------------------------------------

    def expire(self, now: float | None = None) -> tuple[list[Peer], list[Peer]]:
        """The peers whose missing frames are past their grace (a gap: their missing are
        forgotten), and those silent longer than the liveness window (now lost)."""
        if now is None:
            now = self.clock()
        gaps: list[Peer] = []
        lost: list[Peer] = []
        for peer in self.peers.values():
            if peer.missing and now - min(peer.missing.values()) > GAP_GRACE:
                peer.missing.clear()
                gaps.append(peer)
            if peer.alive and (
                now - peer.last_heard > self.liveness_of(peer)
                or (peer.pipeless_since is not None and now - peer.pipeless_since > self.liveness)
            ):
                peer.alive = False
                lost.append(peer)
        return gaps, lost

    def liveness_of(self, peer: Peer) -> float:
        """How long ``peer`` may stay silent before it is lost: its own promise, if it made one."""
        return LIVENESS_HEARTBEATS * peer.period if peer.period else self.liveness

    def members_alive(self) -> int:
        """How many peers alive are part of the mesh (not observers): what a period scales with."""
        return sum(1 for peer in self.peers.values() if peer.alive and not peer.observer)

    def any_missing(self) -> bool:
        return any(peer.missing for peer in list(self.peers.values()))

    # -- what the rest of the node reads (under its lock) -------------------------------------

    def alive_addresses(self) -> set[str]:
        """The addresses of the peers alive: advertised, and dialled as."""
        return {a for p in self.peers.values() if p.alive for a in (p.address, p.dialed_as)}

    def departed_addresses(self, since: float) -> set[str]:
        """The addresses of the peers that said goodbye at ``since`` or later, and have not come
        back: nothing of theirs can be missed, until discovery drops them."""
        return {
            a
            for p in self.peers.values()
            if not p.alive and p.left_at is not None and p.left_at >= since
            for a in (p.address, p.dialed_as)
            if a
        }

    def alive_members(self) -> set[bytes]:
        """The ids of the peers alive that are part of the mesh (not observers)."""
        return {peer.node_id for peer in self.peers.values() if peer.alive and not peer.observer}

    def echo(self, now_ns: int) -> list[tuple[bytes, int, int]]:
        """For a heartbeat: each live peer's last heartbeat stamp, and how long it was held."""
        return [
            (peer.node_id, peer.heard_ns, now_ns - peer.heard_at_ns)
            for peer in self.peers.values()
            if peer.alive and peer.heard_ns
        ]

    def members(self) -> list[Peer]:
        """Every peer but observers (``mesh_status``)."""
        return [peer for peer in self.peers.values() if not peer.observer]


def heartbeat_period(heartbeat: float, members: int) -> float:
    """A node's heartbeat period in a mesh of ``members`` other processes: ``heartbeat`` up to
    HEARTBEAT_FANIN of them, then growing with the mesh, so that every node hears about
    HEARTBEAT_FANIN heartbeats per ``heartbeat`` seconds whatever its size."""
    return heartbeat * max(1.0, members / HEARTBEAT_FANIN)


def _first_contact_missed(sent_before: int, ready: bool) -> bool:
    # A node that is still in its start-up window holds nothing it could have missed.
    return sent_before > 0 and ready
