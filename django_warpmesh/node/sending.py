"""The sending half of a node: the queue of invalidations, frames, heartbeats, the goodbye.

``publish()`` appends to a bounded in-memory queue and never blocks; ``deliver()``, on the
writing thread, takes the send lock without waiting and sends what is queued. If another thread
is sending, that send (or the sender thread, woken for it) takes it. The sender thread also
sends heartbeats (each promising the next: the period grows with the mesh, see
:func:`.peers.heartbeat_period`), goodbyes and the control frames the other parts queue.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from typing import TYPE_CHECKING, Any

from django_warpmesh import protocol
from django_warpmesh.node.interfaces import NodePart
from django_warpmesh.node.ops import coalesce, single_op
from django_warpmesh.node.peers import HEARTBEAT_FANIN, heartbeat_period
from django_warpmesh.node.transports.base import TransportError
from django_warpmesh.node.waiting import Wakeup
from django_warpmesh.protocol import Frame, Heartbeat, Kind, Op, OpCode

if TYPE_CHECKING:
    from django_warpmesh.node.core import MeshNode

logger = logging.getLogger("django_warpmesh")

# Largest body of one frame the sender builds (less when MAX_FRAME_BYTES is smaller, as it is
# by default): small frames keep one slow peer's share of the socket buffer small.
FRAME_BODY_BUDGET = 256 * 1024
# A heartbeat's fixed part besides the frame's: array header, sent_ns, observer, the echo's
# array header, the address's string header, the period; and one echo entry at most (id,
# sent_ns, held_ns).
HEARTBEAT_FIXED = 1 + 9 + 1 + 5 + 3 + 9
ECHO_ENTRY_MAX = 1 + (2 + protocol.NODE_ID_SIZE) + 9 + 9
# The share of a period a heartbeat may come early (never late: peers hold us to the promise).
HEARTBEAT_JITTER = 0.2
# How many times a writing thread sends what other threads queued while it was sending, before
# it leaves the rest to the sender thread (a steady stream from other threads must not keep it).
DELIVER_ROUNDS = 4


class Sender(NodePart):
    def __init__(self, node: MeshNode) -> None:
        super().__init__(node)
        self._queue: list[tuple[str, OpCode, Any]] = []
        self._overflowed: set[str] = set()
        self._wake = Wakeup()
        # Held by whichever thread sends (a writing thread delivering its own invalidation, or
        # the sender thread): one send at a time keeps frames in sequence order.
        self._send_lock = threading.Lock()
        self._stamp = 0  # the last control frame's stamp (see _next_stamp)
        # Leaving (stop): invalidations are no longer held back after this clock reading, and
        # the goodbye is acknowledged by the peers it was sent to.
        self._leave_by = math.inf
        self._bye_sent = threading.Event()
        self._bye_recipients: set[bytes] | None = None
        self._bye_acks: set[bytes] = set()
        self._bye_acked = threading.Event()
        self._seq = 0
        self._heartbeat_now = threading.Event()
        self._outbox: list[tuple[Kind, Any]] = []
        self._echo_from = 0  # where the next heartbeat's echo starts, when not all fit
        self._echoed: set[bytes] = set()  # peers echoed once at least (their RTT can be known)
        # When a heartbeat is due to confirm the invalidations sent since the last one (inf:
        # none sent), and the period the last heartbeat promised.
        self._confirm_by = math.inf
        self.period = node.config.heartbeat

    def queue_control(self, kind: Kind, body: Any) -> None:
        """A control frame for the sender thread to send (a goodbye, an acknowledgement)."""
        with self.lock:
            self._outbox.append((kind, body))
        self._wake.set()

    def beat_soon(self) -> None:
        """A heartbeat now, not at the end of the period (a new connection, a new peer)."""
        self._heartbeat_now.set()
        self._wake.set()

    def publish(self, location: str, code: OpCode, arg: Any) -> None:
        """Queue one invalidation. Never blocks on the network, never raises.

        Caches call it holding their store's lock, so that ops are queued in the order the store
        applied them. Hence the lock order: a store's lock, then this node's lock; nothing may
        take a store's lock while holding the node's (the receiver applies and flushes without
        it).
        """
        with self.lock:
            queue = self._queue
            if len(queue) >= self.config.queue_size:
                self._overflowed.add(location)
                self.counters.queue_overflows += 1
                return
            queue.append((location, code, arg))

    def deliver(self) -> None:
        """Send what is queued now, on the calling (writing) thread. Never blocks, never raises.

        Called after ``publish`` once the store's lock is released. If another thread is
        sending, that send (or the sender thread, woken here) takes the queue: a writing thread
        never waits for another. Sending here saves the hand-off to the sender thread, which on
        a busy worker waits for the GIL (up to ``sys.getswitchinterval()``, 5 ms).
        """
        for _ in range(DELIVER_ROUNDS):
            if not self._queue:
                return
            if self._holding():
                break
            if not self._send_lock.acquire(blocking=False):
                # Another thread is sending. A writing thread looks at the queue again once it
                # is done, but the sender thread (sending a heartbeat, say) does not: wake it,
                # or the frame waits for its next heartbeat (found by benchmark section 8).
                self._wake.set()
                return
            try:
                with self.log.surviving("sending an invalidation"):
                    self._send_queued()
            finally:
                self._send_lock.release()
            # Ops queued meanwhile by threads that found the lock taken: ours to send.
        if self._queue:
            self._wake.set()

    def run(self) -> None:
        next_heartbeat = 0.0
        while True:
            self._wake.wait(self._next_wait(self.clock(), next_heartbeat))
            stopping = self._node.stopping.is_set()
            with self.log.surviving("in the sender thread"):
                self._send_pending()
                now = self.clock()
                # Nothing after the goodbye: a heartbeat would make the peers count us alive
                # again, then lost, and flush.
                beat = now >= min(next_heartbeat, self._confirm_by) or self._heartbeat_now.is_set()
                if beat and not stopping and not self._bye_sent.is_set():
                    self._heartbeat_now.clear()
                    with self._send_lock:
                        period = self._send_heartbeat()
                    # Up to a fifth early, at random: nodes started together would otherwise
                    # beat together forever, and a write landing on their burst waits behind it.
                    next_heartbeat = now + period * random.uniform(1 - HEARTBEAT_JITTER, 1.0)
            if stopping:
                return

    def _next_wait(self, now: float, next_heartbeat: float) -> float:
        """How long the sender thread sleeps: until its next heartbeat (the period's, or the
        one confirming a frame sent since the last, see _send_invalidate), or a leaving
        node's deadline for its held invalidations; and never longer than HEARTBEAT, so that
        a confirmation a writing thread scheduled meanwhile is seen in time. The writing thread
        does not wake it for that: on a busy worker the woken thread would take the send lock
        and then wait for the GIL, holding up the writer's next frame by switch intervals."""
        due = min(next_heartbeat, self._confirm_by, self._leave_by, now + self.config.heartbeat)
        return max(0.0, due - now)

    def _take_pending(self) -> tuple[list[tuple[str, OpCode, Any]], set[str], list[Any]]:
        with self.lock:
            outbox, self._outbox = self._outbox, []
            if self._holding():
                # The goodbye closes the invalidations: it waits with them.
                self._outbox = [item for item in outbox if item[0] is Kind.BYE]
                return [], set(), [item for item in outbox if item[0] is not Kind.BYE]
            queue, self._queue = self._queue, []
            overflowed, self._overflowed = self._overflowed, set()
        return queue, overflowed, outbox

    def _holding(self) -> bool:
        """Invalidations wait for the start-up window to end: the peers known at start are
        connected by then. Sent before, a frame reaches nobody (nng drops it when no pipe is
        up) but uses a sequence number, and every peer would then see a first contact that
        skipped one and flush its whole cache. A leaving node waits at most until it must go.
        """
        return not self._node.ready and self.clock() < self._leave_by

    def _send_pending(self) -> None:
        with self._send_lock:
            queue, overflowed, outbox = self._take_pending()
            self._send_invalidations(queue, overflowed)
            self._send_outbox(outbox)

    def _send_queued(self) -> None:
        """The invalidations queued now (the caller holds the send lock)."""
        with self.lock:
            if self._holding():
                return
            queue, self._queue = self._queue, []
            overflowed, self._overflowed = self._overflowed, set()
        if len(queue) == 1 and not overflowed:
            op = single_op(*queue[0])
            if op is not None:
                # The common case of a write sent at once: nothing to merge or to split.
                self._send_invalidate([op])
                return
        self._send_invalidations(queue, overflowed)

    def _send_invalidations(
        self, queue: list[tuple[str, OpCode, Any]], overflowed: set[str]
    ) -> None:
        if queue or overflowed:
            budget = min(FRAME_BODY_BUDGET, self.config.max_frame_bytes - protocol.FRAME_OVERHEAD)
            try:
                chunks = protocol.split_ops(coalesce(queue, overflowed), budget)
            except Exception:
                # Something msgpack cannot encode (a tag with a lone surrogate, say): the batch
                # is already off the queue, and dropping it would lose it unseen. Cache by
                # cache, what can be split is sent as usual; the rest goes whole to
                # _send_invalidate, which sends a CLEAR of that cache instead.
                chunks = []
                for location in dict.fromkeys([*overflowed, *(entry[0] for entry in queue)]):
                    try:
                        ops = coalesce(
                            [e for e in queue if e[0] == location], overflowed & {location}
                        )
                    except Exception:
                        self.log.once("coalesce", "mesh: cannot coalesce invalidations; clearing")
                        ops = [Op(location, OpCode.CLEAR, None)]
                    try:
                        chunks += protocol.split_ops(ops, budget)
                    except Exception:
                        chunks.append(ops)
            for chunk in chunks:
                self._send_invalidate(chunk)

    def _send_outbox(self, outbox: list[Any]) -> None:
        for kind, body in outbox:
            if kind is Kind.BYE:
                self._send_bye()
            else:
                self._send(Kind(kind), body)

    def _send_bye(self) -> None:
        with self.lock:
            self._bye_recipients = self.table.alive_members()
        self._send(Kind.BYE, None)
        self._bye_sent.set()
        self._check_bye_acked()

    def _check_bye_acked(self) -> None:
        recipients = self._bye_recipients
        if recipients is not None and recipients <= self._bye_acks:
            self._bye_acked.set()

    def _send_invalidate(self, ops: list[Op]) -> None:
        # The seq is taken before anything can fail: a frame that is never sent still leaves a
        # gap that peers see on our next frame (a heartbeat at the latest), and they flush.
        self._seq += 1
        if self._confirm_by == math.inf:
            # The first frame since the last heartbeat: if it is lost and nothing follows it,
            # only a heartbeat shows the gap, so one goes within HEARTBEAT (not the period,
            # which grows with the mesh). Once per heartbeat, not per frame.
            self._confirm_by = self.clock() + self.config.heartbeat
        frame = Frame(
            Kind.INVALIDATE, self._node.node_id, self._node.epoch, self._seq, protocol.ops_body(ops)
        )
        try:
            data = self._node.codec.encode(frame)
        except Exception as exc:
            # One key larger than a frame (a ProtocolError), or something msgpack cannot
            # encode: tell peers to drop that whole cache instead.
            if not isinstance(exc, protocol.ProtocolError):
                self.counters.send_errors += 1
                self.log.once(
                    "encode",
                    "mesh: cannot encode an invalidation (%r); peers clear that cache instead",
                    exc,
                )
            locations = dict.fromkeys(op.location for op in ops)
            clear = [Op(location, OpCode.CLEAR, None) for location in locations]
            try:
                data = self._node.codec.encode(frame._replace(body=protocol.ops_body(clear)))
            except Exception:
                return  # not even that (a cache's own name): peers flush on the seq's gap
        if self._send_bytes(data):
            self.counters.invalidations_sent += len(ops)
            self.counters.keys_sent += sum(
                len(op.args) if isinstance(op.args, list) else 1 for op in ops
            )

    def _send(self, kind: Kind, body: Any) -> None:
        """A control frame (the caller holds the send lock): stamped, then sent."""
        if kind is not Kind.HEARTBEAT:  # a heartbeat's own sent_ns is its stamp
            body = protocol.stamped(self._next_stamp(), body)
        frame = Frame(kind, self._node.node_id, self._node.epoch, self._seq, body)
        try:
            data = self._node.codec.encode(frame)
        except Exception as exc:
            # Larger than a frame (a stats reply of a huge mesh), say: this one is lost, not
            # the frames after it (the goodbye among them).
            self.counters.send_errors += 1
            self.log.once(
                f"encode:{kind.name}", "mesh: cannot send a %s frame (%r)", kind.name, exc
            )
            return
        self._send_bytes(data)

    def _next_stamp(self) -> int:
        """Strictly increasing over this node's control frames: their replay protection."""
        self._stamp = max(self._stamp + 1, time.monotonic_ns())
        return self._stamp

    def _send_bytes(self, data: bytes) -> bool:
        assert self._node.transport is not None
        try:
            if not self._node.transport.send(data):
                if self._node.broker is not None:
                    # Refused: the link is down (peers see the gap) or its buffer is full.
                    self.counters.send_errors += 1
                return False
        except TransportError as exc:
            self.counters.send_errors += 1
            self.log.limited("send", "mesh: send failed (%s); peers will see a gap and flush", exc)
            return False
        self.counters.frames_sent += 1
        return True

    def _send_heartbeat(self) -> float:
        """Send a heartbeat (the caller holds the send lock); returns the period it promised."""
        now_ns = self._next_stamp()
        with self.lock:
            echo = self.table.echo(now_ns)
            members = self.table.members_alive()
        period = self.config.heartbeat if self._node.observer else self.heartbeat_period(members)
        # Echo a few peers per heartbeat, new ones first, the rest in turn: every peer still
        # gets its round trip measured, and a heartbeat costs its receivers the same whatever
        # the mesh's size (and fits MAX_FRAME_BYTES, as every frame must).
        room = self.config.max_frame_bytes - protocol.FRAME_OVERHEAD - HEARTBEAT_FIXED
        fits = max(
            1, min(HEARTBEAT_FANIN, (room - len(self._node.address.encode())) // ECHO_ENTRY_MAX)
        )
        if len(echo) > fits:
            echoed = self._echoed
            new = [entry for entry in echo if entry[0] not in echoed][:fits]
            rest = [entry for entry in echo if entry[0] in echoed]
            start = self._echo_from % len(rest) if rest else 0
            echo = new + (rest + rest)[start : start + fits - len(new)]
            self._echo_from = start + fits - len(new)
            self._echoed = {entry[0] for entry in rest} | {entry[0] for entry in echo}
        else:
            self._echoed = {entry[0] for entry in echo}
        heartbeat = Heartbeat(
            self._node.address, now_ns, tuple(echo), self._node.observer, round(period * 1000)
        )
        self._send(Kind.HEARTBEAT, protocol.heartbeat_body(heartbeat))
        self._confirm_by = math.inf
        self.period = period
        return period

    def heartbeat_period(self, members: int) -> float:
        return heartbeat_period(self.config.heartbeat, members)
