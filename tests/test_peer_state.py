"""What a node knows of its peers (``PeerTable``), alone: a fake clock, no socket, no node.

Sequence numbers per ``(origin, epoch)``, the grace a missing frame gets, the first-contact
rule, duplicates and replays, liveness, and the table's bound. (``test_peer_table.py`` is the
database's peer table, for discovery.)
"""

from __future__ import annotations

import pytest

from django_warpmesh.node.peers import (
    GAP_GRACE,
    MAX_MISSING,
    Epoch,
    Peer,
    PeerTable,
    Seq,
)
from django_warpmesh.protocol import Frame, Heartbeat, Kind, Stamped
from tests.fakes import Clock

A, B, C, D = (bytes([n]) * 8 for n in range(1, 5))
EPOCH = 1_700_000_000_000


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def table(clock: Clock) -> PeerTable:
    return PeerTable(clock, liveness=3.0)


def known(table: PeerTable, node_id: bytes = A, *, epoch: int = EPOCH) -> Peer:
    """A peer heard from for the first time, in ``epoch``."""
    peer = table.add(node_id)
    assert table.enter_epoch(peer, epoch) is Epoch.NEW
    return peer


def invalidate(seq: int, origin: bytes = A) -> Frame:
    return Frame(Kind.INVALIDATE, origin, EPOCH, seq, [])


# -- sequence numbers --------------------------------------------------------------------------


def test_frames_in_order_are_applied(table: PeerTable) -> None:
    peer = known(table)
    for seq in (1, 2, 3):
        assert table.is_fresh(peer, invalidate(seq))
        assert table.track_invalidate(peer, seq, ready=True) is Seq.NEXT
    assert (peer.highest, peer.missing) == (3, {})
    assert table.expire() == ([], [])


def test_a_frame_seen_already_is_a_duplicate(table: PeerTable) -> None:
    peer = known(table)
    table.track_invalidate(peer, 1, ready=True)
    table.track_invalidate(peer, 2, ready=True)
    assert not table.is_fresh(peer, invalidate(2))
    assert not table.is_fresh(peer, invalidate(1))
    assert table.track_invalidate(peer, 2, ready=True) is Seq.DUPLICATE
    assert peer.highest == 2


def test_a_frame_late_within_its_grace_fills_the_hole_without_a_gap(
    table: PeerTable, clock: Clock
) -> None:
    peer = known(table)
    table.track_invalidate(peer, 1, ready=True)
    assert table.track_invalidate(peer, 4, ready=True) is Seq.AHEAD
    assert peer.missing == {2: clock.now, 3: clock.now}
    assert table.any_missing()
    clock.advance(GAP_GRACE / 2)
    assert table.expire() == ([], [])  # still within the grace
    assert table.is_fresh(peer, invalidate(3))  # missing: not a duplicate
    assert table.track_invalidate(peer, 3, ready=True) is Seq.LATE
    assert table.track_invalidate(peer, 2, ready=True) is Seq.LATE
    assert (peer.highest, peer.missing) == (4, {})
    assert not table.any_missing()
    clock.advance(GAP_GRACE)
    assert table.expire() == ([], [])  # nothing to flush


def test_a_frame_missing_past_its_grace_is_a_gap(table: PeerTable, clock: Clock) -> None:
    peer = known(table)
    table.track_invalidate(peer, 1, ready=True)
    table.track_invalidate(peer, 3, ready=True)
    clock.advance(GAP_GRACE)
    assert table.expire() == ([], [])  # the grace is not over until it has passed
    clock.advance(0.001)
    assert table.expire() == ([peer], [])
    assert peer.missing == {}
    assert table.expire() == ([], [])  # declared once
    # Arriving after the flush, it is not applied: what it invalidated is gone anyway.
    assert not table.is_fresh(peer, invalidate(2))
    assert table.track_invalidate(peer, 2, ready=True) is Seq.DUPLICATE


def test_more_missing_than_can_be_waited_on_is_a_gap_at_once(table: PeerTable) -> None:
    peer = known(table)
    table.track_invalidate(peer, 1, ready=True)
    assert table.track_invalidate(peer, 2 + MAX_MISSING, ready=True) is Seq.AHEAD
    assert len(peer.missing) == MAX_MISSING  # as many as can be waited on
    assert table.track_invalidate(peer, 4 + MAX_MISSING, ready=True) is Seq.GAP
    assert (peer.highest, peer.missing) == (4 + MAX_MISSING, {})


def test_other_frames_carry_the_latest_seq_without_using_one(
    table: PeerTable, clock: Clock
) -> None:
    peer = known(table)
    assert table.track_seq(peer, 0, ready=True) is Seq.NEXT  # a heartbeat before any write
    assert table.track_invalidate(peer, 1, ready=True) is Seq.NEXT
    assert table.track_seq(peer, 1, ready=True) is Seq.NEXT
    # A heartbeat saying 3 were sent when 1 arrived: 2 and 3 are missing (the last one too).
    assert table.track_seq(peer, 3, ready=True) is Seq.AHEAD
    assert set(peer.missing) == {2, 3}
    clock.advance(GAP_GRACE + 0.001)
    assert table.expire() == ([peer], [])


# -- first contact --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seq", "ready", "verdict"),
    [
        (0, True, Seq.NEXT),  # it has sent nothing yet
        (0, False, Seq.NEXT),
        (5, True, Seq.MISSED),  # it sent 5 we never got, and we hold values
        (5, False, Seq.NEXT),  # still starting: we hold nothing it could have invalidated
    ],
)
def test_first_contact_through_a_heartbeat(
    table: PeerTable, seq: int, ready: bool, verdict: Seq
) -> None:
    peer = known(table)
    assert table.track_seq(peer, seq, ready=ready) is verdict
    assert (peer.highest, peer.missing) == (seq, {})


@pytest.mark.parametrize(
    ("seq", "ready", "verdict"),
    [
        (1, True, Seq.NEXT),  # its first invalidation frame
        (1, False, Seq.NEXT),
        (2, True, Seq.MISSED),
        (2, False, Seq.NEXT),
    ],
)
def test_first_contact_through_an_invalidation(
    table: PeerTable, seq: int, ready: bool, verdict: Seq
) -> None:
    peer = known(table)
    assert table.is_fresh(peer, invalidate(seq))
    assert table.track_invalidate(peer, seq, ready=ready) is verdict
    assert (peer.highest, peer.missing) == (seq, {})


# -- epochs -----------------------------------------------------------------------------------


def test_a_frame_of_an_earlier_epoch_is_a_replay(table: PeerTable) -> None:
    peer = known(table)
    table.track_invalidate(peer, 1, ready=True)
    assert table.enter_epoch(peer, EPOCH) is Epoch.CURRENT
    assert table.enter_epoch(peer, EPOCH - 1) is Epoch.REPLAYED
    assert (peer.epoch, peer.highest) == (EPOCH, 1)  # nothing forgotten


def test_a_new_epoch_flushes_only_if_the_peer_had_been_tracked(table: PeerTable) -> None:
    peer = known(table)
    # Nothing tracked of it yet (say only an observer's stats request): a new start is news
    # of nothing lost.
    assert table.enter_epoch(peer, EPOCH + 1) is Epoch.NEW
    table.track_invalidate(peer, 1, ready=True)
    table.track_invalidate(peer, 3, ready=True)
    peer.heard_ns = 123
    # It restarted after sending: what it sent before cannot be known. Its sequence starts over.
    assert table.enter_epoch(peer, EPOCH + 2) is Epoch.RESTARTED
    assert (peer.epoch, peer.highest, peer.missing, peer.heard_ns) == (EPOCH + 2, None, {}, 0)
    assert table.track_invalidate(peer, 1, ready=True) is Seq.NEXT


def test_a_replayed_control_frame_is_not_fresh(table: PeerTable) -> None:
    peer = known(table)
    table.saw_control(peer, 1000)
    old = Frame(Kind.HEARTBEAT, A, EPOCH, 0, Heartbeat("127.0.0.1:1", 999))
    new = Frame(Kind.HEARTBEAT, A, EPOCH, 0, Heartbeat("127.0.0.1:1", 1001))
    assert not table.is_fresh(peer, old)
    assert table.is_fresh(peer, new)
    # One stamp for every control kind: an old goodbye or stats request is a replay too.
    for kind, value in [(Kind.BYE, None), (Kind.STATS_REQUEST, 7), (Kind.BYE_ACK, B)]:
        assert not table.is_fresh(peer, Frame(kind, A, EPOCH, 0, Stamped(1000, value)))
        assert table.is_fresh(peer, Frame(kind, A, EPOCH, 0, Stamped(1001, value)))
    # A new epoch (it restarted) starts its stamps over.
    table.enter_epoch(peer, EPOCH + 1)
    assert table.is_fresh(peer, Frame(Kind.BYE, A, EPOCH + 1, 0, Stamped(5, None)))


# -- liveness ---------------------------------------------------------------------------------


def test_a_peer_silent_past_the_liveness_window_is_lost_once(
    table: PeerTable, clock: Clock
) -> None:
    peer = known(table)
    assert table.heard(peer) is False  # it was not alive before
    assert peer.alive
    assert peer.last_heard == clock.now
    clock.advance(2.0)
    assert table.heard(peer) is True
    clock.advance(3.0)
    assert table.expire() == ([], [])  # exactly the window: still alive
    clock.advance(0.001)
    assert table.expire() == ([], [peer])
    assert not peer.alive
    assert table.expire() == ([], [])


def test_a_peer_that_said_goodbye_is_not_lost(table: PeerTable, clock: Clock) -> None:
    peer = known(table)
    table.heard(peer)
    table.left(peer)
    clock.advance(10.0)
    assert table.expire() == ([], [])


def test_the_address_of_a_peer_that_said_goodbye_is_not_missed_for_a_while(
    table: PeerTable, clock: Clock
) -> None:
    peer = known(table)
    peer.address, peer.dialed_as = "10.0.0.1:7934", "web-1:7934"
    table.heard(peer)
    assert table.departed_addresses(since=0.0) == set()  # alive: not departed
    table.left(peer)
    left_at = clock()
    assert table.departed_addresses(since=left_at) == {"10.0.0.1:7934", "web-1:7934"}
    assert table.departed_addresses(since=left_at + 0.001) == set()  # too long ago
    table.heard(peer)  # back (the same node): alive again, no longer departed
    assert table.departed_addresses(since=0.0) == set()


def test_what_the_rest_of_the_node_reads(table: PeerTable) -> None:
    member, observer, silent = known(table, A), known(table, B), known(table, C)
    member.address, member.dialed_as = "10.0.0.1:7934", "web-1:7934"
    observer.address, observer.observer = "10.0.0.2:7934", True
    silent.address = "10.0.0.3:7934"
    for peer in (member, observer):
        table.heard(peer)
    member.heard_ns, member.heard_at_ns = 50, 100
    # Both names of each live peer (the observer was not dialled: no second name).
    assert table.alive_addresses() == {"10.0.0.1:7934", "web-1:7934", "10.0.0.2:7934", ""}
    assert table.alive_members() == {A}
    assert table.echo(now_ns=400) == [(A, 50, 300)]
    assert table.members() == [member, silent]


# -- the table's bound ------------------------------------------------------------------------


def test_at_max_peers_the_peer_silent_longest_is_forgotten(clock: Clock) -> None:
    table = PeerTable(clock, liveness=3.0, max_peers=3)
    a, b, c = (table.get_or_add(node_id) for node_id in (A, B, C))
    for peer in (b, a, c):
        table.heard(peer)
        clock.advance(1.0)
    table.left(a)
    table.left(b)
    d = table.get_or_add(D)
    assert set(table.peers) == {A, C, D}  # b was heard first among those not alive
    assert table.get(B) is None
    assert table.get_or_add(D) is d


def test_live_peers_are_never_forgotten_for_a_new_one(clock: Clock) -> None:
    table = PeerTable(clock, liveness=3.0, max_peers=2)
    for node_id in (A, B):
        table.heard(table.add(node_id))
    table.add(C)
    assert set(table.peers) == {A, B, C}
