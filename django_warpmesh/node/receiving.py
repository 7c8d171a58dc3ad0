"""The receiving half of a node: take, verify, apply; and the periodic checks.

``drain()``, on a reading thread before its read, or the receiver thread when the process is
idle, takes every frame waiting on the transport, verifies it, drops duplicates and replays,
tracks sequence numbers (:mod:`.peers`: a gap flushes the caches it may have made stale) and
applies invalidations in bulk. The receiver's tick runs the gap grace, liveness and the
start-up window.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pynng

from django_warpmesh import protocol
from django_warpmesh.node.interfaces import NodePart
from django_warpmesh.node.peers import LIVENESS_HEARTBEATS, Epoch, Peer, Seq
from django_warpmesh.node.transports.base import Received, TransportClosed
from django_warpmesh.node.waiting import Readable
from django_warpmesh.protocol import Frame, Heartbeat, Kind, Op

if TYPE_CHECKING:
    import select

    from django_warpmesh.node.core import MeshNode

logger = logging.getLogger("django_warpmesh")

# What the receive path compares each frame's verdicts with, as plain globals: an enum member
# costs more to look up, once per frame.
_RESTARTED, _REPLAYED = Epoch.RESTARTED, Epoch.REPLAYED
_NEXT, _MISSED, _GAP, _DUPLICATE = Seq.NEXT, Seq.MISSED, Seq.GAP, Seq.DUPLICATE

# What a closed transport raises: the thread using it stops.
CLOSED: tuple[type[Exception], ...] = (pynng.Closed, TransportClosed)
# Receiver: how many frames to take off the socket before applying them in one go.
RECV_BATCH = 512
# The receiver's tick (gap grace, liveness, readiness): how long it waits for a frame before
# checking anyway, while something is pending and while idle.
TICK_FAST_MS = 50
TICK_IDLE_MS = 250
# Tags of recently accepted frames remembered, to drop the copy from the second pipe cheaply.
RECENT_TAGS = 8192
# How soon after the original a copy of a frame may bind the pipe it came on to its sender.
DUPLICATE_BIND_WINDOW = 1.0


class Receiver(NodePart):
    def __init__(self, node: MeshNode) -> None:
        super().__init__(node)
        # Held by whichever thread takes frames off the socket and applies them (a reading
        # thread draining before its read, or the receiver thread); `_draining` says so without
        # taking it, so a read that finds it held waits for frames already taken to be applied.
        self._drain_lock = threading.Lock()
        self._draining = False
        self._recv_poll: select.poll | None = None
        # Tags of frames accepted lately: (origin, hash of the bytes, when), to know a copy.
        self._recent_tags: OrderedDict[bytes, tuple[bytes, int, float]] = OrderedDict()
        inquiries = node.inquiries
        # What a verified, fresh control frame does, by kind: (the peer, the frame's body,
        # whether the peer was alive before it). INVALIDATE frames are applied in bulk instead.
        self.control_handlers: dict[Kind, Callable[[Peer, Any, bool], None]] = {
            Kind.HEARTBEAT: self._on_heartbeat,
            Kind.BYE: lambda peer, body, was_alive: self._on_bye(peer),
            Kind.STATS_REQUEST: lambda peer, body, was_alive: inquiries._on_stats_request(
                peer, body.value
            ),
            Kind.STATS_REPLY: lambda peer, body, was_alive: inquiries._on_stats_reply(
                peer, body.value
            ),
            Kind.BYE_ACK: lambda peer, body, was_alive: self._on_bye_ack(peer, body.value),
        }

    def run(self) -> None:
        # Wait on nng's "message ready" descriptor, then take what is queued without blocking:
        # a blocking nng receive costs an extra thread hand-off inside nng per message, and each
        # of its timeouts wakes nng's own timer threads too.
        assert self._node.transport is not None
        try:
            ready = Readable(self._node.transport.recv_fd)
        except TransportClosed:
            return
        last_tick = 0.0
        while not self._node.stopping.is_set():
            until_tick = self._tick_every_ms() - (self.clock() - last_tick) * 1000
            try:
                with self.log.surviving("handling received frames", CLOSED):
                    last_tick = self._lap(ready, until_tick, last_tick)
            except CLOSED:
                return

    def _lap(self, ready: Readable, until_tick: float, last_tick: float) -> float:
        """One wait of the receiver thread, the frames it brought, and the tick when due;
        returns when the last tick ran."""
        # Rounded up: a wait that ended a fraction of a millisecond early would spin.
        if ready.wait(max(0, math.ceil(until_tick))):
            with self._drain_lock:
                self._draining = True
                try:
                    self._drain_socket()
                finally:
                    self._draining = False
        # On its cadence, not after every batch: under traffic that is most of a
        # receiver's work per frame. During start-up, at once: readiness is news.
        now = self.clock()
        if not self._node.ready or now - last_tick >= self._tick_every_ms() / 1000:
            last_tick = now
            with self._drain_lock:
                self._tick()
        return last_tick

    def drain(self) -> None:
        """Apply, on the calling (reading) thread, the frames already in the socket's queue.

        Called before a read, so that a read starting after an invalidation reached this
        process never serves the value it invalidates, however long the receiver thread waits
        for the GIL. Costs one non-blocking readiness check when nothing is waiting. If another
        thread is taking frames off the socket, this waits until it has applied them: they may
        hold the invalidation this read must see.
        """
        poll = self._recv_poll
        if poll is None or not (self._draining or poll.poll(0)):
            return
        with (
            contextlib.suppress(*CLOSED),
            self.log.surviving("applying frames on a read", CLOSED),
            self._drain_lock,
        ):
            self._draining = True
            try:
                self._drain_socket()
            finally:
                self._draining = False

    def _drain_socket(self) -> None:
        """Take every frame queued on the socket and apply it (the caller holds the drain lock).

        Each receive is one call into nng that releases the GIL: frames are taken until the
        queue says it is empty, with no readiness check between them, or until as many as it
        can hold (BUFFER_SIZE) were taken: everything queued when the drain started is applied
        by then, and a queue that never empties (a flood) must not keep the receiver from its
        tick (gaps, liveness, idle connections), nor a reading thread from its read.
        """
        transport = self._node.transport
        assert transport is not None
        left = self.config.buffer_size
        while left > 0:
            want = min(RECV_BATCH, left)
            batch = transport.receive(want)
            if batch:
                self._handle_batch(batch)
            if len(batch) < want:
                return
            left -= want

    def _tick_every_ms(self) -> int:
        # Often only while something is pending (a missing frame's grace period, the start-up
        # window): an idle mesh then wakes 4 times a second, not 20.
        if not self._node.ready or self.table.any_missing():
            return TICK_FAST_MS
        return TICK_IDLE_MS

    def _handle_batch(self, batch: list[Received]) -> None:
        if self._node.guard._dropped:
            batch = self._node.guard._without_dropped(batch)
        now = self.clock()
        by_location: dict[str, list[Op]] = defaultdict(list)
        flush = False
        recent = self._recent_tags
        for message in batch:
            self.counters.frames_received += 1
            data = message.data
            # While two pipes join a pair (both dialled; one is hung up soon) a frame arrives
            # twice: the second copy is known by its tag and its bytes, without verifying or
            # parsing it again. The same tag on other bytes is no copy: it is verified (and
            # fails) like any frame, and changes nothing.
            tag = data[-protocol.TAG_SIZE :]
            seen = recent.get(tag)
            if seen is not None and seen[1] == hash(data):
                self._copy_seen(message, tag, seen, now)
                continue
            try:
                frame = self._node.codec.decode(data)
            except protocol.ProtocolError as exc:
                self._reject(exc.reason)
                if message.source is not None:
                    self._node.guard._strike(message.source)
                continue
            fresh, flushing = self._accept(frame, message.source, now, by_location)
            flush |= flushing
            if fresh:
                sender = self.table.peers.get(frame.origin)
                if sender is not None:
                    sender.latest_tag = tag
                recent[tag] = (frame.origin, hash(data), now)
                if len(recent) > RECENT_TAGS:
                    recent.popitem(last=False)
        self._apply(by_location, flush)

    def _apply(self, by_location: dict[str, list[Op]], flush: bool) -> None:
        """A batch's invalidations, in bulk per cache, after the flush it called for."""
        if flush:
            self._flush_all()
        for location, ops in by_location.items():
            store = self._node.stores.get(location)
            if store is not None:
                store.apply(ops)
        if self._node.hub is not None and by_location:
            self._node.hub.forward_ops([op for ops in by_location.values() for op in ops])
        if self._node.links.closing:
            self._node.links.close_parked_dialers()

    def _copy_seen(
        self, message: Received, tag: bytes, seen: tuple[bytes, int, float], now: float
    ) -> None:
        """A copy of a frame accepted already (``seen``: its origin, hash, when)."""
        self.counters.duplicates += 1
        # Binding the pipe it came on tells which pair's link to park; only a copy of its
        # sender's latest frame, close behind the original, may: an older frame replayed must
        # not own a pipe.
        sender = self.table.peers.get(seen[0])
        if (
            sender is not None
            and message.source is not None
            and sender.latest_tag == tag
            and now - seen[2] <= DUPLICATE_BIND_WINDOW
        ):
            self._node.links.bind(message.source, seen[0], self._node.node_id)

    def _reject(self, reason: str) -> None:
        self.counters.frames_rejected += 1
        self.counters.rejected_by_reason[reason] += 1
        self.log.limited(f"reject:{reason}", "mesh: rejected a frame (%s)", reason)

    def _accept(
        self, frame: Frame, pipe: Any, now: float, by_location: dict[str, list[Op]]
    ) -> tuple[bool, bool]:
        """Check one verified frame; queue its ops. Returns whether it was fresh (not a copy
        or a replay) and whether caches must be flushed."""
        origin = frame.origin
        table = self.table
        peer = self._sender_of(frame, pipe)
        if peer is None:
            return False, False
        flush = False
        if frame.epoch != peer.epoch:
            epoch = table.enter_epoch(peer, frame.epoch)
            if epoch is _REPLAYED:
                self._reject("replayed")
                return False, False
            # A new epoch of a peer that had sent: it restarted. What it sent before is unknown.
            flush = epoch is _RESTARTED
        kind = frame.kind
        if not table.is_fresh(peer, frame):
            # A copy of a frame already seen (another pipe, or a replay by someone who captured
            # it): it must not make a silent peer look alive, nor own the pipe it came on.
            self.counters.duplicates += 1
            return False, flush
        if pipe is not None:
            with self.lock:
                # Only now, from a frame that is neither forged nor replayed: whose pipe it is.
                self._node.links.bind_locked(pipe, origin, self._node.node_id)
        if kind is not Kind.INVALIDATE:
            table.saw_control(peer, frame.body.sent_ns)
        if kind is Kind.STATS_REQUEST and not peer.alive:
            # Observers (mesh_status) ask before their first heartbeat may have arrived; answer,
            # but don't count a node that has not introduced itself as a live peer.
            self._node.inquiries._on_stats_request(peer, frame.body.value)
            return True, flush
        was_alive = table.heard(peer, now)
        if not was_alive:
            peer.announce, peer.announce_heartbeats, peer.latency_ms = True, 0, None
        if kind is Kind.INVALIDATE:
            flush |= self._track_invalidate(peer, frame.seq, now, by_location, frame.body)
        else:
            verdict = table.track_seq(peer, frame.seq, self._node.ready, now)
            if verdict is not _NEXT:
                flush |= verdict is _MISSED or (verdict is _GAP and self._gap(peer))
            self.control_handlers[kind](peer, frame.body, was_alive)
        return True, flush

    def _sender_of(self, frame: Frame, pipe: Any) -> Peer | None:
        """The peer a verified frame speaks for; None for our own frames, or a frame an
        authenticated peer sent on another node's pipe."""
        origin = frame.origin
        if origin == self._node.node_id:
            if pipe is not None:
                address = self._node.links.from_self(pipe)
                if address is not None:
                    self._node.membership.found_self(address)
            return None
        with self.lock:
            owner = self._node.links.pipe_owner.get(pipe.id) if pipe is not None else None
            if owner is not None and owner != origin:
                # An authenticated peer speaking for another node on its own pipe.
                self._reject("foreign_origin")
                return None
            return self.table.peers.get(origin) or self.table.add(origin)

    def _track_invalidate(
        self,
        peer: Peer,
        seq: int,
        now: float,
        by_location: dict[str, list[Op]],
        ops: list[Op],
    ) -> bool:
        verdict = self.table.track_invalidate(peer, seq, self._node.ready, now)
        flush = False
        if verdict is not _NEXT:
            if verdict is _DUPLICATE:
                self.counters.duplicates += 1
                return False
            flush = verdict is _MISSED or (verdict is _GAP and self._gap(peer))
        self.counters.invalidations_received += len(ops)
        peer.invalidations_received += len(ops)
        for op in ops:
            self.counters.keys_received += len(op.args) if isinstance(op.args, list) else 1
            by_location[op.location].append(op)
        return flush

    def _gap(self, peer: Peer) -> bool:
        self.counters.gaps_detected += 1
        peer.gaps_detected += 1
        self.log.limited(
            f"gap:{peer.hex_id}",
            "mesh: gap detected from %s (%s): frames were lost, flushing the mesh caches (%s)",
            peer.hex_id,
            peer.address or "address unknown",
            ", ".join(sorted(self._node.stores)) or "none",
        )
        return True

    def _flush_all(self) -> None:
        self.counters.flushes += 1
        for store in list(self._node.stores.values()):
            store.flush()
        if self._node.hub is not None:
            self._node.hub.forward_flush()

    def _on_heartbeat(self, peer: Peer, heartbeat: Heartbeat, was_alive: bool) -> None:
        peer.period = heartbeat.period_ms / 1000
        peer.heard_ns = heartbeat.sent_ns
        peer.heard_at_ns = time.monotonic_ns()
        peer.observer = heartbeat.observer
        if heartbeat.address:
            peer.address = heartbeat.address
        for node_id, sent_ns, held_ns in heartbeat.echo:
            if node_id == self._node.node_id and sent_ns:
                rtt_ns = time.monotonic_ns() - sent_ns - held_ns
                if 0 <= rtt_ns < 60_000_000_000:
                    peer.latency_ms = round(rtt_ns / 2 / 1e6, 3)
        if peer.announce and not peer.observer:
            # Logged once the latency is known: the peer answers our first heartbeat at once.
            peer.announce_heartbeats += 1
            if peer.latency_ms is not None or peer.announce_heartbeats >= LIVENESS_HEARTBEATS:
                peer.announce = False
                logger.info(
                    "mesh: connected to %s (%s)%s",
                    peer.hex_id,
                    peer.address or "address unknown",
                    f", latency {peer.latency_ms} ms" if peer.latency_ms is not None else "",
                )
        if not was_alive and not peer.observer:
            # Answer at once so the new peer need not wait a whole heartbeat to hear from us.
            self._node.sender._heartbeat_now.set()
            self._node.sender._wake.set()
            self._node.membership._check_ready()
            # The last unreachable peer may just have answered.
            self._node.membership._update_degraded()

    def _on_bye(self, peer: Peer) -> None:
        if not peer.observer:
            logger.info("mesh: peer %s (%s) left", peer.hex_id, peer.address)
        self.table.left(peer)
        if not self._node.observer and not self._node.leaving:
            # Everything it sent before its goodbye has been received: it may exit now.
            with self.lock:
                self._node.sender._outbox.append((Kind.BYE_ACK, peer.node_id))
            self._node.sender._wake.set()

    def _on_bye_ack(self, peer: Peer, leaving: bytes) -> None:
        if leaving == self._node.node_id:
            self._node.sender._bye_acks.add(peer.node_id)
            self._node.sender._check_bye_acked()

    def _tick(self) -> None:
        """Periodic checks, run by the receiver between batches: at least every 50 ms while a
        frame is missing or the start-up window is open, every 250 ms otherwise."""
        now = self.clock()
        with self.lock:
            gaps, lost = self.table.expire(now)
        self._node.guard._close_idle_pipes(now)
        flush = False
        for peer in gaps:
            flush |= self._gap(peer)
        for peer in lost:
            if not peer.observer:
                # Whatever it sent since it was last heard may be lost with no later frame to
                # show the gap: everything held here may be stale. It did not say goodbye.
                logger.info(
                    "mesh: lost peer %s (%s); flushing the mesh caches", peer.hex_id, peer.address
                )
                self.counters.peers_lost += 1
                flush = True
        # The cap first: an entry stored between the flush and the cap would outlive it.
        self._node.membership._update_degraded()
        if flush:
            self._flush_all()
        self.log.flush(now)
        self._node.membership._check_ready()
