"""The mesh node: one per process, one nng ``Bus0`` socket, the frame pipeline, three threads.

The frame pipeline is driven by whichever thread gets there first:

* **deliver** (encode and send): ``publish()`` appends to a bounded in-memory queue and never
  blocks; ``deliver()``, on the writing thread, takes the send lock without waiting and sends
  what is queued. If another thread is sending, that send (or the **sender** thread, woken for
  it) takes it. The sender thread also sends heartbeats, goodbyes and stats replies.
* **drain** (take, verify, apply): ``drain()``, on a reading thread before its read, or the
  **receiver** thread when the process is idle, takes every frame waiting on the socket,
  verifies it, drops duplicates and replays, tracks sequence numbers (:mod:`.peers`: a gap
  flushes the caches it may have made stale) and applies invalidations in bulk. The receiver's
  tick runs the gap grace, liveness and the start-up window.
* The **maintenance** thread runs peer discovery (database or static list) and dials a peer
  again when the pipe that peer opened to us goes (:mod:`.links`); it may block on the
  database, which is why it is alone.

Nothing here knows Django or its cache: caches register a :class:`.Store` per cache name.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import socket
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pynng

from django_warpmesh import protocol
from django_warpmesh.node import stats
from django_warpmesh.node.config import MeshSettings, format_address, parse_address
from django_warpmesh.node.interfaces import DiscoveryError, PeerRegistry, Store
from django_warpmesh.node.links import Links
from django_warpmesh.node.ops import coalesce, single_op
from django_warpmesh.node.peers import (
    HEARTBEAT_FANIN,
    LIVENESS_HEARTBEATS,
    Epoch,
    Peer,
    PeerTable,
    Seq,
    heartbeat_period,
)
from django_warpmesh.node.relay import RelayHub, wire_op
from django_warpmesh.node.replies import ReplyInbox, ReplySender
from django_warpmesh.node.tls import TLSTransport
from django_warpmesh.node.transports.base import (
    BrokerTransport,
    Received,
    Transport,
    TransportClosed,
    TransportError,
)
from django_warpmesh.node.transports.nng import NngTransport
from django_warpmesh.protocol import Frame, Heartbeat, Kind, Op, OpCode

logger = logging.getLogger("django_warpmesh")

# What the receive path compares each frame's verdicts with, as plain globals: an enum member
# costs more to look up, once per frame.
_RESTARTED, _REPLAYED = Epoch.RESTARTED, Epoch.REPLAYED
_NEXT, _MISSED, _GAP, _DUPLICATE = Seq.NEXT, Seq.MISSED, Seq.GAP, Seq.DUPLICATE

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
# Largest body of one frame the sender builds (less when MAX_FRAME_BYTES is smaller, as it is
# by default): small frames keep one slow peer's share of the socket buffer small.
FRAME_BODY_BUDGET = 256 * 1024
# Frames that fail verification on one connection before the node hangs up on it. Counted over
# the connection's life, not in a row: a stranger who listens to the mesh could otherwise keep
# its connection by slipping a recorded (valid) frame in between. A peer holding the key never
# sends one.
PIPE_STRIKES = 8
# Connections hung up on whose frames still queued are dropped unread, remembered at most.
DROPPED_PIPES_KEPT = 1024
# A heartbeat's fixed part besides the frame's: array header, sent_ns, observer, the echo's
# array header, the address's string header; and one echo entry at most (id, sent_ns, held_ns).
HEARTBEAT_FIXED = 1 + 9 + 1 + 5 + 3
ECHO_ENTRY_MAX = 1 + (2 + protocol.NODE_ID_SIZE) + 9 + 9
# Largest stats reply: a whole snapshot, a row per peer (4,096 at most: about 600 KB). Replies
# never ride the bus (see replies.py), so they do not count against MAX_FRAME_BYTES: only an
# observer (mesh_status) takes them in, one connection at a time, while it waits for them.
REPLY_MAX_BYTES = 1024 * 1024
# Failed discovery syncs in a row after which the node counts as degraded (entries capped): a
# peer that joined meanwhile cannot be found, and one failure may be a blip.
DISCOVERY_FAILURES_DEGRADED = 2
# How many times a writing thread sends what other threads queued while it was sending, before
# it leaves the rest to the sender thread (a steady stream from other threads must not keep it).
DELIVER_ROUNDS = 4
# How much longer than its linger stop() waits for the sender to finish before closing the socket.
SENDER_GRACE = 1.0
# Longest wait between two discovery attempts while they fail (they back off from the interval).
DISCOVERY_MAX_BACKOFF = 60.0


class Wakeup:
    """Wakes the one thread that waits on it; a wake-up that finds it already set is merged.

    A bare lock used as a binary semaphore: half the cost of :class:`threading.Event` (no
    condition variable) on the path from a cache write to the sender thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        with contextlib.suppress(RuntimeError):  # already set: one wake-up covers both
            self._lock.release()

    def wait(self, timeout: float) -> bool:
        """Wait until set or ``timeout`` seconds have passed; True (and clear it) if it was set."""
        return self._lock.acquire(timeout=timeout)


@contextlib.contextmanager
def _held(lock: threading.Lock, timeout: float) -> Iterator[bool]:
    """Hold ``lock`` for the block if it can be had within ``timeout``; says whether it was."""
    acquired = lock.acquire(timeout=timeout)
    try:
        yield acquired
    finally:
        if acquired:
            lock.release()


class _Readable:
    """Waits until a file descriptor (nng's receive-ready descriptor) is readable."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._poll: select.poll | None
        if hasattr(select, "poll"):
            self._poll = select.poll()
            self._poll.register(fd, select.POLLIN)
        else:  # Windows
            self._poll = None

    def wait(self, timeout_ms: int) -> bool:
        if self._poll is None:
            return bool(select.select([self.fd], [], [], timeout_ms / 1000)[0])
        # A closed socket reads as ready (POLLNVAL): the receive that follows raises Closed.
        return bool(self._poll.poll(timeout_ms))


class MeshNode:
    enabled = True

    def __init__(
        self,
        config: MeshSettings,
        key: bytes,
        registry: PeerRegistry,
        *,
        observer: bool = False,
        clock: Callable[[], float] = time.monotonic,
        broker: BrokerTransport | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.observer = observer
        self.node_id = os.urandom(protocol.NODE_ID_SIZE)
        self.epoch = time.time_ns() // 1_000_000
        self.pid = os.getpid()
        self.started_at = time.time()
        self.codec = protocol.Codec(key, max_frame_bytes=config.max_frame_bytes)
        self._reply_codec = protocol.Codec(
            key, max_frame_bytes=max(config.max_frame_bytes, REPLY_MAX_BYTES)
        )
        self.counters = stats.Counters()
        self.address = ""
        self.listen_error: str | None = None
        self.max_timeout: float | None = None
        self.degraded = False
        self.ready = False
        self._clock = clock
        self._log = stats.EventLog(clock)
        self._stores: dict[str, Store] = {}
        self._lock = threading.Lock()  # guards the queue, peers and pipes; never held over nng
        self._queue: list[tuple[str, OpCode, Any]] = []
        self._overflowed: set[str] = set()
        self._wake = Wakeup()
        # Held by whichever thread sends (a writing thread delivering its own invalidation, or
        # the sender thread): one send at a time keeps frames in sequence order.
        self._send_lock = threading.Lock()
        # Held by whichever thread takes frames off the socket and applies them (a reading
        # thread draining before its read, or the receiver thread); `_draining` says so without
        # taking it, so a read that finds it held waits for frames already taken to be applied.
        self._drain_lock = threading.Lock()
        self._draining = False
        self._recv_poll: select.poll | None = None
        self._stop = threading.Event()
        self._stamp = 0  # the last control frame's stamp (see _next_stamp)
        self._started = False
        # Leaving (stop): invalidations are no longer held back after this clock reading, and
        # the goodbye is acknowledged by the peers it was sent to.
        self._leave_by = math.inf
        self._leaving = False
        self._bye_sent = threading.Event()
        self._bye_recipients: set[bytes] | None = None
        self._bye_acks: set[bytes] = set()
        self._bye_acked = threading.Event()
        self._seq = 0
        self._table = PeerTable(clock, liveness=LIVENESS_HEARTBEATS * config.heartbeat)
        self._links = Links(self._lock, self._table, self._log.once)
        self._maintain = Wakeup()
        self._expected: set[str] | None = None  # addresses we know of; None: not known yet
        self._ready_deadline = 0.0
        # Why the last discovery sync failed (None: it worked), and how many failed in a row.
        self.discovery_error: str | None = None
        self.discovery_failures = 0
        self._sync_now = False
        self._heartbeat_now = threading.Event()
        self._outbox: list[tuple[Kind, Any]] = []
        self._stats_waiters: dict[int, Callable[[bytes, dict[str, Any]], None]] = {}
        self._threads: list[threading.Thread] = []
        # Tags of frames accepted lately: (origin, hash of the bytes, when), to know a copy.
        self._recent_tags: OrderedDict[bytes, tuple[bytes, int, float]] = OrderedDict()
        # Frames rejected per connection (pipe id), and the connections hung up on for it.
        self._strikes: dict[int, int] = {}
        self._dropped: dict[int, None] = {}
        self._echo_from = 0  # where the next heartbeat's echo starts, when not all fit
        self._echoed: set[bytes] = set()  # peers echoed once at least (their RTT can be known)
        # When a heartbeat is due to confirm the invalidations sent since the last one (inf:
        # none sent), and the period the last heartbeat promised.
        self._confirm_by = math.inf
        self.period = config.heartbeat
        # What carries the frames: the nng mesh (its socket, which the node also dials, listens
        # and binds pipes with), or a broker (``broker``; no socket, no pipes).
        self._broker = broker
        self._transport: Transport | None = None
        self._socket: Any = None
        self._broker_lost = False  # the broker link went and has not come back yet
        self._reply_address = ""  # an observer's: where stats replies come to
        self._hub: RelayHub | None = None  # children forked after the socket opened
        self._replies: ReplySender | None = None  # stats replies, to the asker only
        self._inbox: ReplyInbox | None = None  # an observer's: where replies come to
        self._tls: TLSTransport | None = None  # WARPMESH['TLS']: tls+tcp:// endpoints

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def hex_id(self) -> str:
        return self.node_id.hex()

    def start(self) -> None:
        config = self.config
        if self._broker is not None:
            self._start_broker(self._broker)
        else:
            self._start_mesh()
        assert self._transport is not None
        if config.drain_on_read and hasattr(select, "poll"):
            self._recv_poll = select.poll()
            self._recv_poll.register(self._transport.recv_fd, select.POLLIN)
        self._ready_deadline = self._clock() + config.effective_startup_wait
        initial = self.registry.initial()
        if initial is not None:
            self.set_peer_addresses(initial)
        self._threads = [
            threading.Thread(target=self._run_sender, name="warpmesh-sender", daemon=True),
            threading.Thread(target=self._run_receiver, name="warpmesh-receiver", daemon=True),
            threading.Thread(target=self._run_maintenance, name="warpmesh-discovery", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self._started = True
        if not self.observer:
            logger.info(
                "mesh: enabled — peer id %s at %s (%s)",
                self.hex_id,
                self.address or self._transport.describe()["url"],
                self.registry.description,
            )

    def _start_broker(self, broker: BrokerTransport) -> None:
        if self.config.max_frame_bytes > broker.max_frame_bytes:
            raise TransportError(
                f"WARPMESH['MAX_FRAME_BYTES'] is {self.config.max_frame_bytes}, more than the "
                f"{broker.name} transport carries ({broker.max_frame_bytes})"
            )
        self._transport = broker
        if self.observer:
            self._reply_address = broker.open_reply_inbox(self._on_reply_bytes)
        broker.start(self)

    def _start_mesh(self) -> None:
        config = self.config
        if config.tls is not None:
            self._tls = TLSTransport(config.tls)  # reads the PEM files; raises before any socket
        mesh = NngTransport(config)
        self._transport, self._socket = mesh, mesh.socket
        self._links.open(self._socket, self._tls)
        self._replies = ReplySender(self._tls)
        if self.observer:
            self._inbox = ReplyInbox(
                config.bind,
                ports=range(config.port, config.port + config.port_range) if config.port else (),
                advertise=lambda port: _reply_address(config, port),
                tls=self._tls,
                max_bytes=self._reply_codec.max_frame_bytes,
                on_reply=self._on_reply_bytes,
            )
            self._reply_address = self._inbox.address
        self._socket.add_post_pipe_connect_cb(self._on_pipe_connect)
        self._socket.add_post_pipe_remove_cb(self._on_pipe_remove)
        if not self.observer:
            try:
                port = self._listen()
            except (OSError, pynng.NNGException) as exc:
                # Dialling out still works: this process reaches its peers, which accept its
                # connections, so its writes are delivered and theirs reach it. Only being
                # dialled (and listed in the peer table) is lost.
                self.listen_error = str(exc)
                logger.error(
                    "mesh: cannot listen (%s); this process dials its peers but cannot be "
                    "dialled, and is not listed in the peer table",
                    exc,
                )
            else:
                self.address = mesh.address = _advertised_address(config, port)

    def _listen(self) -> int:
        config = self.config
        scheme = self._links.scheme
        ports = [0] if config.port == 0 else range(config.port, config.port + config.port_range)
        last_error: Exception | None = None
        for port in ports:
            url = f"{scheme}://{format_address(config.bind, port)}"
            try:
                listener = (
                    self._socket.listen(url)
                    if self._tls is None
                    else self._tls.listen(self._socket, url)
                )
            except pynng.AddressInUse as exc:
                last_error = exc
                continue
            return int(str(listener.local_address).rsplit(":", 1)[1])
        raise OSError(
            f"no free mesh port in {config.port}..{config.port + config.port_range - 1} "
            f"on {config.bind} ({last_error}); raise WARPMESH['PORT_RANGE'] or set PORT to 0"
        )

    def stop(self, timeout: float | None = None) -> None:
        """Deliver what is queued, say goodbye, stop the threads, close the socket.

        Idempotent and bounded: it waits at most ``timeout`` seconds (default ``max(2 s, 2 x
        HEARTBEAT)``) for the known peers to be connected, for the queued invalidations and
        the goodbye to go out, and for the peers to acknowledge the goodbye (which they
        receive after everything sent before it). A short-lived process (a management command,
        a cron job) that wrote must not exit before its invalidations have left.
        """
        if self._leaving:
            return
        self._leaving = True
        linger = max(2.0, 2 * self.config.heartbeat) if timeout is None else timeout
        deadline = time.monotonic() + linger
        if self._started and not self.observer:
            # Held invalidations go out at half the linger at the latest (peers that have not
            # answered by then will flush when they do): the rest is for the acknowledgements.
            self._leave_by = self._clock() + linger / 2
            with self._lock:
                self._outbox.append((Kind.BYE, None))
            self._wake.set()
            if self._bye_sent.wait(max(0.0, deadline - time.monotonic())):
                self._bye_acked.wait(max(0.0, deadline - time.monotonic()))
        self._stop.set()
        self._wake.set()
        self._maintain.set()
        current = threading.current_thread()
        sender, receiver, maintenance = self._threads or (None, None, None)
        # The maintenance thread deletes our row on its way out, on its own connection: never
        # on the caller's, which may be a request's, inside its transaction.
        if maintenance is not None and maintenance is not current:
            maintenance.join(max(0.0, deadline - time.monotonic()))
        # nng aborts the process if its socket is closed during a send: the sender must be
        # done first, and so must a writing thread sending, or a reading thread draining (their
        # locks). None of them blocks (sends and receives are non-blocking), so this is short.
        self._recv_poll = None  # reads no longer drain
        if sender is not None and sender is not current:
            sender.join(max(0.0, deadline - time.monotonic()) + SENDER_GRACE)
        grace = max(0.0, deadline - time.monotonic()) + SENDER_GRACE
        if self._broker is not None and self._started:
            self._broker.close(grace)
        if self._socket is not None and not (sender is not None and sender.is_alive()):
            # In the order a draining thread takes them (it may answer a stats request).
            with (
                _held(self._drain_lock, grace) as draining,
                _held(self._send_lock, grace) as sending,
            ):
                if sending and draining:
                    with contextlib.suppress(Exception):
                        self._socket.close()
        if receiver is not None and receiver is not current:
            receiver.join(max(0.0, deadline - time.monotonic()))
        if self._hub is not None:
            self._hub.close()
        if self._inbox is not None:
            self._inbox.close()

    # -- forked children (see relay.py) -------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._started and not self._leaving

    def adopt_child(self, sock: socket.socket) -> None:
        """The parent's end of a pair made at a fork: relay that child's mesh."""
        if self._hub is None:
            self._hub = RelayHub(self._relay_publish)
        self._hub.adopt(sock)
        self._state_changed()

    def relayed_sockets(self) -> list[socket.socket]:
        return self._hub.sockets() if self._hub is not None else []

    def _relay_publish(self, alias: str, code: OpCode, arg: Any, source: Any) -> None:
        # As a peer's invalidation for this process and its other children, then ours to send.
        op = wire_op(alias, code, arg)
        store = self._stores.get(alias)
        if store is not None:
            store.apply([op])
        if self._hub is not None:
            self._hub.forward_ops([op], exclude=source)
        self.publish(alias, code, arg)
        self.deliver()

    def _state_changed(self) -> None:
        if self._hub is not None:
            self._hub.forward_state(self.ready, self.max_timeout)

    # -- the API caches use ---------------------------------------------------------------------

    def register_store(self, name: str, store: Store) -> None:
        with self._lock:
            self._stores[name] = store

    def store_names(self) -> list[str]:
        with self._lock:
            return list(self._stores)

    def publish(self, alias: str, code: OpCode, arg: Any) -> None:
        """Queue one invalidation. Never blocks on the network, never raises.

        Caches call it holding their store's lock, so that ops are queued in the order the store
        applied them. Hence the lock order: a store's lock, then this node's lock; nothing may
        take a store's lock while holding the node's (the receiver applies and flushes without
        it).
        """
        with self._lock:
            queue = self._queue
            if len(queue) >= self.config.queue_size:
                self._overflowed.add(alias)
                self.counters.queue_overflows += 1
                return
            queue.append((alias, code, arg))

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
                # Another thread is sending: it looks at the queue again once it is done.
                return
            try:
                self._send_queued()
            except Exception:
                logger.exception("mesh: send error (continuing)")
            finally:
                self._send_lock.release()
            # Ops queued meanwhile by threads that found the lock taken: ours to send.
        if self._queue:
            self._wake.set()

    # -- peers ------------------------------------------------------------------------------

    def set_peer_addresses(self, addresses: Iterable[str]) -> None:
        """Dial addresses we are not dialling yet; hang up on those no longer listed."""
        wanted = {address for address in addresses if address != self.address}
        with self._lock:
            first = self._expected is None
            self._expected = wanted
        if self._broker is None:
            self._links.set_addresses(wanted)
        if first:
            # The start-up window now lasts until those peers answer or the wait runs out.
            self._ready_deadline = self._clock() + self.config.effective_startup_wait
        self._check_ready()

    def _on_pipe_connect(self, pipe: Any) -> None:
        # Runs on an nng thread holding nng's lock: touch only our own state.
        self._links.connected(pipe.id, pipe, self._clock())
        self._heartbeat_now.set()
        self._wake.set()

    def _on_pipe_remove(self, pipe: Any) -> None:
        if self._links.removed(pipe.id, self._clock()):
            self._maintain.set()  # a parked link went: the maintenance thread dials again

    def _check_ready(self) -> None:
        if self.ready:
            return
        with self._lock:
            expected = self._expected
            heard = self._table.alive_addresses()
        timed_out = self._clock() >= self._ready_deadline
        if self._broker is not None and not self._broker.connected:
            # Subscribed, every frame published from then on reaches us: until then, nothing.
            if timed_out:
                self._become_ready(f"the {self._broker.name} server is not reachable yet")
            return
        if expected is None:
            if timed_out:
                self._become_ready("peer list not known yet after the start-up wait")
            return
        missing = expected - heard
        if not missing:
            self._become_ready("")
        elif timed_out:
            self._become_ready(f"{len(missing)} known peer(s) did not answer")

    def _become_ready(self, why: str) -> None:
        self.ready = True
        self._wake.set()  # the invalidations held back until now go out
        self._state_changed()
        if why:
            logger.info("mesh: caching enabled after the start-up wait (%s)", why)

    # -- sender -------------------------------------------------------------------------------

    def _run_sender(self) -> None:
        next_heartbeat = 0.0
        while True:
            now = self._clock()
            # A leaving node's held invalidations must go at _leave_by, woken or not; a frame
            # sent since the last heartbeat is confirmed by one within HEARTBEAT (see
            # _send_invalidate), however long the idle period has grown.
            due = min(next_heartbeat, self._confirm_by)
            timeout = max(0.0, min(due, self._leave_by) - now)
            self._wake.wait(timeout)
            stopping = self._stop.is_set()
            try:
                self._send_pending()
                now = self._clock()
                # Nothing after the goodbye: a heartbeat would make the peers count us alive
                # again, then lost, and flush.
                beat = now >= min(next_heartbeat, self._confirm_by) or self._heartbeat_now.is_set()
                if beat and not stopping and not self._bye_sent.is_set():
                    self._heartbeat_now.clear()
                    with self._send_lock:
                        period = self._send_heartbeat()
                    next_heartbeat = now + period
            except Exception:
                # Never let the sender die: a dead sender would leave every peer stale.
                logger.exception("mesh: sender error (continuing)")
            if stopping:
                return

    def _take_pending(self) -> tuple[list[tuple[str, OpCode, Any]], set[str], list[Any]]:
        with self._lock:
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
        return not self.ready and self._clock() < self._leave_by

    def _send_pending(self) -> None:
        with self._send_lock:
            queue, overflowed, outbox = self._take_pending()
            self._send_invalidations(queue, overflowed)
            self._send_outbox(outbox)

    def _send_queued(self) -> None:
        """The invalidations queued now (the caller holds the send lock)."""
        with self._lock:
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
                for alias in dict.fromkeys([*overflowed, *(entry[0] for entry in queue)]):
                    try:
                        ops = coalesce([e for e in queue if e[0] == alias], overflowed & {alias})
                    except Exception:
                        self._log.once("coalesce", "mesh: cannot coalesce invalidations; clearing")
                        ops = [Op(alias, OpCode.CLEAR, None)]
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
        with self._lock:
            self._bye_recipients = self._table.alive_members()
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
            self._confirm_by = self._clock() + self.config.heartbeat
            self._wake.set()
        frame = Frame(Kind.INVALIDATE, self.node_id, self.epoch, self._seq, protocol.ops_body(ops))
        try:
            data = self.codec.encode(frame)
        except Exception as exc:
            # One key larger than a frame (a ProtocolError), or something msgpack cannot
            # encode: tell peers to drop that whole cache instead.
            if not isinstance(exc, protocol.ProtocolError):
                self.counters.send_errors += 1
                self._log.once(
                    "encode",
                    "mesh: cannot encode an invalidation (%r); peers clear that cache instead",
                    exc,
                )
            aliases = dict.fromkeys(op.alias for op in ops)
            clear = [Op(alias, OpCode.CLEAR, None) for alias in aliases]
            try:
                data = self.codec.encode(frame._replace(body=protocol.ops_body(clear)))
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
        frame = Frame(kind, self.node_id, self.epoch, self._seq, body)
        try:
            data = self.codec.encode(frame)
        except Exception as exc:
            # Larger than a frame (a stats reply of a huge mesh), say: this one is lost, not
            # the frames after it (the goodbye among them).
            self.counters.send_errors += 1
            self._log.once(
                f"encode:{kind.name}", "mesh: cannot send a %s frame (%r)", kind.name, exc
            )
            return
        self._send_bytes(data)

    def _next_stamp(self) -> int:
        """Strictly increasing over this node's control frames: their replay protection."""
        self._stamp = max(self._stamp + 1, time.monotonic_ns())
        return self._stamp

    def _send_bytes(self, data: bytes) -> bool:
        assert self._transport is not None
        try:
            if not self._transport.send(data):
                if self._broker is not None:
                    # Refused: the link is down (peers see the gap) or its buffer is full.
                    self.counters.send_errors += 1
                return False
        except TransportError as exc:
            self.counters.send_errors += 1
            self._log.limited("send", "mesh: send failed (%s); peers will see a gap and flush", exc)
            return False
        self.counters.frames_sent += 1
        return True

    def _send_heartbeat(self) -> float:
        """Send a heartbeat (the caller holds the send lock); returns the period it promised."""
        now_ns = self._next_stamp()
        with self._lock:
            echo = self._table.echo(now_ns)
            members = self._table.members_alive()
        period = self.config.heartbeat if self.observer else self.heartbeat_period(members)
        # Echo a few peers per heartbeat, new ones first, the rest in turn: every peer still
        # gets its round trip measured, and a heartbeat costs its receivers the same whatever
        # the mesh's size (and fits MAX_FRAME_BYTES, as every frame must).
        room = self.config.max_frame_bytes - protocol.FRAME_OVERHEAD - HEARTBEAT_FIXED
        fits = max(1, min(HEARTBEAT_FANIN, (room - len(self.address.encode())) // ECHO_ENTRY_MAX))
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
            self.address, now_ns, tuple(echo), self.observer, round(period * 1000)
        )
        self._send(Kind.HEARTBEAT, protocol.heartbeat_body(heartbeat))
        self._confirm_by = math.inf
        self.period = period
        return period

    def heartbeat_period(self, members: int) -> float:
        return heartbeat_period(self.config.heartbeat, members)

    # -- receiver -----------------------------------------------------------------------------

    def _run_receiver(self) -> None:
        # Wait on nng's "message ready" descriptor, then take what is queued without blocking:
        # a blocking nng receive costs an extra thread hand-off inside nng per message, and each
        # of its timeouts wakes nng's own timer threads too.
        assert self._transport is not None
        try:
            ready = _Readable(self._transport.recv_fd)
        except TransportClosed:
            return
        last_tick = 0.0
        while not self._stop.is_set():
            until_tick = self._tick_every_ms() - (self._clock() - last_tick) * 1000
            try:
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
                now = self._clock()
                if not self.ready or now - last_tick >= self._tick_every_ms() / 1000:
                    last_tick = now
                    with self._drain_lock:
                        self._tick()
            except (pynng.Closed, TransportClosed):
                return
            except Exception:
                logger.exception("mesh: error handling received frames (continuing)")

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
        try:
            with self._drain_lock:
                self._draining = True
                try:
                    self._drain_socket()
                finally:
                    self._draining = False
        except (pynng.Closed, TransportClosed):
            pass
        except Exception:
            logger.exception("mesh: error applying received frames on a read (continuing)")

    def _drain_socket(self) -> None:
        """Take every frame queued on the socket and apply it (the caller holds the drain lock).

        Each receive is one call into nng that releases the GIL: frames are taken until the
        queue says it is empty, with no readiness check between them, or until as many as it
        can hold (BUFFER_SIZE) were taken: everything queued when the drain started is applied
        by then, and a queue that never empties (a flood) must not keep the receiver from its
        tick (gaps, liveness, idle connections), nor a reading thread from its read.
        """
        transport = self._transport
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
        if not self.ready or self._table.any_missing():
            return TICK_FAST_MS
        return TICK_IDLE_MS

    def _handle_batch(self, batch: list[Received]) -> None:
        if self._dropped:
            batch = self._without_dropped(batch)
        now = self._clock()
        by_alias: dict[str, list[Op]] = defaultdict(list)
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
                self.counters.duplicates += 1
                # Binding the pipe it came on tells which pair's link to park; only a copy of
                # its sender's latest frame, close behind the original, may: an older frame
                # replayed must not own a pipe.
                sender = self._table.peers.get(seen[0])
                if (
                    sender is not None
                    and message.source is not None
                    and sender.latest_tag == tag
                    and now - seen[2] <= DUPLICATE_BIND_WINDOW
                ):
                    self._links.bind(message.source, seen[0], self.node_id)
                continue
            try:
                frame = self.codec.decode(data)
            except protocol.ProtocolError as exc:
                self._reject(exc.reason)
                if message.source is not None:
                    self._strike(message.source)
                continue
            fresh, flushing = self._accept(frame, message.source, now, by_alias)
            flush |= flushing
            if fresh:
                sender = self._table.peers.get(frame.origin)
                if sender is not None:
                    sender.latest_tag = tag
                recent[tag] = (frame.origin, hash(data), now)
                if len(recent) > RECENT_TAGS:
                    recent.popitem(last=False)
        if flush:
            self._flush_all()
        for alias, ops in by_alias.items():
            store = self._stores.get(alias)
            if store is not None:
                store.apply(ops)
        if self._hub is not None and by_alias:
            self._hub.forward_ops([op for ops in by_alias.values() for op in ops])
        if self._links.closing:
            self._links.close_parked_dialers()

    def _reject(self, reason: str) -> None:
        self.counters.frames_rejected += 1
        self.counters.rejected_by_reason[reason] += 1
        self._log.limited(f"reject:{reason}", "mesh: rejected a frame (%s)", reason)

    # -- connections that cost memory and bring nothing -----------------------------------------

    def _strike(self, pipe: Any) -> None:
        """A frame on ``pipe`` failed verification: after PIPE_STRIKES, hang up on it.

        nng queues what a connection sends before a single frame of it is verified (up to
        BUFFER_SIZE frames of MAX_FRAME_BYTES); a stranger's connection is closed as soon as it
        is seen to send junk, and what it had queued is then dropped unread.
        """
        pipe_id = pipe.id
        if pipe_id in self._dropped:
            return  # hung up on already: this frame was in the same batch
        strikes = self._strikes.get(pipe_id, 0) + 1
        # A peer's first frame on a new connection is its heartbeat, and verifies: one that
        # starts with junk is hung up on at once.
        if strikes < PIPE_STRIKES and pipe_id in self._links.pipe_owner:
            self._strikes[pipe_id] = strikes
            return
        self._strikes.pop(pipe_id, None)
        self._drop_pipe(pipe, f"{PIPE_STRIKES} frames that failed verification")

    def _drop_pipe(self, pipe: Any, why: str) -> None:
        """Hang up on ``pipe`` (on the thread that drains or ticks: never in an nng callback,
        which runs holding nng's locks) and drop unread what it still has queued."""
        dropped = self._dropped
        if pipe.id in dropped:
            return  # hung up on already; nng has not reported it gone yet
        dropped[pipe.id] = None
        if len(dropped) > DROPPED_PIPES_KEPT:
            del dropped[next(iter(dropped))]
        self.counters.pipes_dropped += 1
        address = "address unknown"
        with contextlib.suppress(Exception):
            address = str(pipe.remote_address)
        self._log.limited("drop_pipe", "mesh: hung up on a connection from %s: %s", address, why)
        with contextlib.suppress(Exception):  # already gone
            pipe.close()

    def _without_dropped(self, batch: list[Received]) -> list[Received]:
        """The frames of ``batch`` but those from a connection hung up on: dropped unread."""
        dropped = self._dropped
        kept = [message for message in batch if message.source.id not in dropped]
        skipped = len(batch) - len(kept)
        if skipped:
            self.counters.frames_received += skipped
            self.counters.frames_rejected += skipped
            self.counters.rejected_by_reason["dropped_connection"] += skipped
        return kept

    def _close_idle_pipes(self, now: float) -> None:
        """Hang up on connections that sent nothing verifiable for a liveness window after
        connecting.

        Each connection holds up to BUFFER_SIZE of our frames queued while it does not read: a
        stranger that connects and never reads (nor says who it is) would hold them, and get
        every frame we send, for as long as it stays connected. A peer says who it is at once
        (a heartbeat on every new connection, and every HEARTBEAT after).
        """
        links = self._links
        window = self._table.liveness
        with self._lock:
            idle = [
                pipe
                for pipe_id, pipe in links.pipes.items()
                if pipe_id not in links.pipe_owner
                and pipe_id not in links.self_pipes
                and now - links.connected_at.get(pipe_id, now) > window
            ]
            live = links.live_pipes
            for pipe_id in [p for p in self._strikes if p not in live]:
                del self._strikes[pipe_id]
        for pipe in idle:
            self._drop_pipe(pipe, f"nothing verifiable within {window:g} s of connecting")
        self._forget_gone_pipes()

    def _forget_gone_pipes(self) -> None:
        """pynng keeps a Pipe per id it sees; a frame taken after its connection went (one we
        hung up on, with frames still queued) adds the id back, never to be removed: drop
        those, or every junk connection leaves one behind."""
        sock = self._socket
        pipes = getattr(sock, "_pipes", None)
        notify = getattr(sock, "_pipe_notify_lock", None)
        if not isinstance(pipes, dict) or notify is None or len(pipes) <= len(self._links.pipes):
            return
        # pynng's lock first, then ours: the order its callbacks (ours among them) take them.
        with notify, self._lock:
            live = self._links.live_pipes
            for pipe_id in [p for p in pipes if p not in live]:
                # One between nng's "adding" and "added" events is made again at "added".
                del pipes[pipe_id]

    def _accept(
        self, frame: Frame, pipe: Any, now: float, by_alias: dict[str, list[Op]]
    ) -> tuple[bool, bool]:
        """Check one verified frame; queue its ops. Returns whether it was fresh (not a copy
        or a replay) and whether caches must be flushed."""
        origin = frame.origin
        if origin == self.node_id:
            if pipe is not None:
                self._links.from_self(pipe)
            return False, False
        table = self._table
        with self._lock:
            owner = self._links.pipe_owner.get(pipe.id) if pipe is not None else None
            if owner is not None and owner != origin:
                # An authenticated peer speaking for another node on its own pipe.
                self._reject("foreign_origin")
                return False, False
            peer = table.peers.get(origin)
            if peer is None:
                peer = table.add(origin)
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
            with self._lock:
                # Only now, from a frame that is neither forged nor replayed: whose pipe it is.
                self._links.bind_locked(pipe, origin, self.node_id)
        if kind is not Kind.INVALIDATE:
            table.saw_control(peer, frame.body.sent_ns)
        if kind is Kind.STATS_REQUEST and not peer.alive:
            # Observers (mesh_status) ask before their first heartbeat may have arrived; answer,
            # but don't count a node that has not introduced itself as a live peer.
            self._on_stats_request(peer, frame.body.value)
            return True, flush
        was_alive = table.heard(peer, now)
        if not was_alive:
            peer.announce, peer.announce_heartbeats, peer.latency_ms = True, 0, None
        if kind is Kind.INVALIDATE:
            flush |= self._track_invalidate(peer, frame.seq, now, by_alias, frame.body)
        else:
            verdict = table.track_seq(peer, frame.seq, self.ready, now)
            if verdict is not _NEXT:
                flush |= verdict is _MISSED or (verdict is _GAP and self._gap(peer))
            if kind is Kind.HEARTBEAT:
                self._on_heartbeat(peer, frame.body, was_alive)
            elif kind is Kind.BYE:
                self._on_bye(peer)
            elif kind is Kind.STATS_REQUEST:
                self._on_stats_request(peer, frame.body.value)
            elif kind is Kind.STATS_REPLY:
                self._on_stats_reply(peer, frame.body.value)
            elif kind is Kind.BYE_ACK:
                self._on_bye_ack(peer, frame.body.value)
        return True, flush

    def _track_invalidate(
        self,
        peer: Peer,
        seq: int,
        now: float,
        by_alias: dict[str, list[Op]],
        ops: list[Op],
    ) -> bool:
        verdict = self._table.track_invalidate(peer, seq, self.ready, now)
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
            by_alias[op.alias].append(op)
        return flush

    def _gap(self, peer: Peer) -> bool:
        self.counters.gaps_detected += 1
        peer.gaps_detected += 1
        self._log.limited(
            f"gap:{peer.hex_id}",
            "mesh: gap detected from %s (%s): frames were lost, flushing the mesh caches (%s)",
            peer.hex_id,
            peer.address or "address unknown",
            ", ".join(sorted(self._stores)) or "none",
        )
        return True

    def _flush_all(self) -> None:
        self.counters.flushes += 1
        for store in list(self._stores.values()):
            store.flush()
        if self._hub is not None:
            self._hub.forward_flush()

    def _on_heartbeat(self, peer: Peer, heartbeat: Heartbeat, was_alive: bool) -> None:
        peer.period = heartbeat.period_ms / 1000
        peer.heard_ns = heartbeat.sent_ns
        peer.heard_at_ns = time.monotonic_ns()
        peer.observer = heartbeat.observer
        if heartbeat.address:
            peer.address = heartbeat.address
        for node_id, sent_ns, held_ns in heartbeat.echo:
            if node_id == self.node_id and sent_ns:
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
            self._heartbeat_now.set()
            self._wake.set()
            self._check_ready()
            self._update_degraded()  # the last unreachable peer may just have answered

    def _on_bye(self, peer: Peer) -> None:
        if not peer.observer:
            logger.info("mesh: peer %s (%s) left", peer.hex_id, peer.address)
        self._table.left(peer)
        if not self.observer and not self._leaving:
            # Everything it sent before its goodbye has been received: it may exit now.
            with self._lock:
                self._outbox.append((Kind.BYE_ACK, peer.node_id))
            self._wake.set()

    def _on_bye_ack(self, peer: Peer, leaving: bytes) -> None:
        if leaving == self.node_id:
            self._bye_acks.add(peer.node_id)
            self._check_bye_acked()

    def _on_stats_request(self, peer: Peer, request: protocol.StatsRequest) -> None:
        """Answer the asker only, on a connection of its own (see replies.py)."""
        if self.observer or (self._replies is None and self._broker is None):
            return
        reply = protocol.StatsReply(request.request_id, peer.node_id, self.snapshot())
        with self._send_lock:
            stamp = self._next_stamp()
        frame = Frame(
            Kind.STATS_REPLY,
            self.node_id,
            self.epoch,
            self._seq,
            protocol.stamped(stamp, protocol.stats_reply_body(reply)),
        )
        try:
            data = self._reply_codec.encode(frame)
        except Exception as exc:
            self.counters.send_errors += 1
            self._log.once("encode:STATS_REPLY", "mesh: cannot send a stats reply (%r)", exc)
            return
        if self._broker is not None:
            sent = self._broker.send_reply(request.reply_to, data)
        else:
            assert self._replies is not None
            sent = self._replies.send(request.reply_to, data)
        if not sent:
            self.counters.send_errors += 1

    def _on_reply_bytes(self, data: bytes) -> None:
        """The observer's inbox: a reply to one of our requests, verified like any frame.

        Replay protection is the request: a reply counts only while its request is open.
        """
        try:
            frame = self._reply_codec.decode(data)
        except protocol.ProtocolError as exc:
            self._reject(exc.reason)
            return
        if frame.kind is not Kind.STATS_REPLY:
            self._reject("unexpected_kind")
            return
        reply = frame.body.value
        if reply.requester != self.node_id:
            return
        waiter = self._stats_waiters.get(reply.request_id)
        if waiter is not None:
            waiter(frame.origin, reply.stats)

    def _on_stats_reply(self, peer: Peer, reply: protocol.StatsReply) -> None:
        if reply.requester != self.node_id:
            return
        waiter = self._stats_waiters.get(reply.request_id)
        if waiter is not None:
            waiter(peer.node_id, reply.stats)

    def _tick(self) -> None:
        """Periodic checks, run by the receiver between batches: at least every 50 ms while a
        frame is missing or the start-up window is open, every 250 ms otherwise."""
        now = self._clock()
        with self._lock:
            gaps, lost = self._table.expire(now)
        self._close_idle_pipes(now)
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
        self._update_degraded()
        if flush:
            self._flush_all()
        self._log.flush(now)
        self._check_ready()

    def _update_degraded(self) -> None:
        """Cap new entries' lifetime while a peer we know of cannot be reached, or while
        discovery fails (a peer we do not know of may exist): see docs/consistency.md."""
        with self._lock:
            expected = self._expected or set()
            reachable = self._table.alive_addresses()
        self.degraded = (
            bool(expected - reachable)
            or self.discovery_failures >= DISCOVERY_FAILURES_DEGRADED
            or (self._broker is not None and not self._broker.connected)
        )
        self.max_timeout = self.config.degraded_timeout if self.degraded else None
        self._state_changed()

    # -- a broker's link (TRANSPORT other than nng), on the transport's thread -------------------

    def transport_connected(self) -> None:
        """The broker link is up and subscribed: every frame published from now on reaches us."""
        if self._broker_lost:
            self._broker_lost = False
            logger.info(
                "mesh: %s transport connected again; flushing the mesh caches", self._broker_name
            )
            # What peers published while it was down never reached us, and what was cached
            # meanwhile (capped) may be stale already: flushed. Our own frames sent meanwhile
            # show to the peers as a gap, on our heartbeat that follows.
            with self._drain_lock:
                self._flush_all()
        self._update_degraded()
        self._heartbeat_now.set()
        self._wake.set()
        self._check_ready()

    def transport_lost(self, reason: str) -> None:
        """The broker link went: frames published meanwhile may never reach us."""
        if self._broker_lost:
            return
        self._broker_lost = True
        self.counters.transport_losses += 1
        logger.warning(
            "mesh: %s transport lost (%s); flushing the mesh caches, capping new entries at "
            "DEGRADED_TIMEOUT until it is back",
            self._broker_name,
            reason,
        )
        # The cap first: an entry stored between the flush and the cap would outlive it.
        self._update_degraded()
        with self._drain_lock:
            self._flush_all()

    @property
    def _broker_name(self) -> str:
        return self._broker.name if self._broker is not None else "nng"

    # -- maintenance (discovery) ----------------------------------------------------------------

    def _run_maintenance(self) -> None:
        next_sync = 0.0
        while not self._stop.is_set():
            if self._sync_now:
                self._sync_now = False
                next_sync = 0.0
            try:
                if self._clock() >= next_sync:
                    next_sync = self._clock() + self._sync()
                self._links.dial_unparked()
            except Exception:
                logger.exception("mesh: maintenance error (continuing)")
            self._maintain.wait(max(0.0, next_sync - self._clock()))
        with contextlib.suppress(Exception):
            self.registry.leave(self)

    def sync_soon(self) -> None:
        """Run discovery now, not at the next interval (the peer table was just created)."""
        self._sync_now = True
        self._maintain.set()

    def _sync(self) -> float:
        """One discovery sync; returns the seconds until the next (backing off while failing)."""
        interval = self.config.discovery_interval
        try:
            addresses = self.registry.sync(self)
        except DiscoveryError as exc:
            return self._discovery_failed(str(exc), alone=exc.alone, quiet=exc.quiet)
        except Exception as exc:
            # A bug or an unexpected error: the same rules as a database outage, and its trace.
            if not self.discovery_failures:
                logger.exception("mesh: discovery error")
            return self._discovery_failed(f"{type(exc).__name__}: {exc}", quiet=True)
        if self.discovery_failures:
            logger.info(
                "mesh: peer discovery works again after %d failed attempt(s)",
                self.discovery_failures,
            )
            self.discovery_failures, self.discovery_error = 0, None
            self._update_degraded()
        if addresses is not None:
            self.set_peer_addresses(addresses)
        return interval

    def _discovery_failed(self, reason: str, *, alone: bool = False, quiet: bool = False) -> float:
        self.discovery_failures += 1
        self.discovery_error = reason
        if self.discovery_failures == 1 and not quiet:
            logger.warning(
                "mesh: peer discovery failed: %s; keeping the current peers, retrying with backoff",
                reason,
            )
        if self.discovery_failures == DISCOVERY_FAILURES_DEGRADED and not self.observer:
            logger.warning(
                "mesh: peer discovery failed %d times in a row (%s): capping new entries at "
                "DEGRADED_TIMEOUT until it works again",
                self.discovery_failures,
                reason,
            )
        with self._lock:
            unknown = self._expected is None
        if alone and unknown:
            # Nobody can have registered yet: no start-up window to wait out.
            self.set_peer_addresses([])
        self._update_degraded()
        backoff = self.config.discovery_interval * 2.0 ** (self.discovery_failures - 1)
        return min(backoff, DISCOVERY_MAX_BACKOFF)

    # -- observability --------------------------------------------------------------------------

    def request_stats(
        self, request_id: int, on_reply: Callable[[bytes, dict[str, Any]], None]
    ) -> None:
        """Ask every peer for its stats (mesh_status); replies arrive on the receiver thread."""
        self._stats_waiters[request_id] = on_reply
        reply_to = self._reply_address
        with self._lock:
            self._outbox.append((Kind.STATS_REQUEST, [request_id, reply_to]))
        self._wake.set()

    def cancel_stats_request(self, request_id: int) -> None:
        """Stop passing on replies to ``request_id`` (late ones are then ignored)."""
        self._stats_waiters.pop(request_id, None)

    def peers(self) -> list[Peer]:
        with self._lock:
            return self._table.members()

    @property
    def last_seq(self) -> int:
        """The sequence number of the last invalidation frame: how many this node numbered."""
        return self._seq

    @property
    def queued(self) -> int:
        """Invalidations queued and not taken by a send yet."""
        return len(self._queue)

    def snapshot(self) -> dict[str, Any]:
        counters = self.counters
        with self._lock:
            expected = set(self._expected or ())
            peers = self._table.members()
        return {
            "enabled": True,
            "reason": "",
            "node_id": self.hex_id,
            "peer_id": self.hex_id,
            "address": self.address,
            "pid": self.pid,
            "host": socket.gethostname(),
            "epoch": self.epoch,
            "started_at": self.started_at,
            "ready": self.ready,
            "degraded": self.degraded,
            "heartbeat_period": self.period,
            "transport": self._transport.describe() if self._transport is not None else None,
            "discovery": self.registry.description,
            "discovery_error": self.discovery_error,
            "discovery_failures": self.discovery_failures,
            "listen_error": self.listen_error,
            "relayed_pids": self._hub.children() if self._hub is not None else [],
            "peers": stats.peer_rows(peers, expected, self._clock),
            **stats.counter_values(counters),
        }


def _advertised_address(config: MeshSettings, port: int) -> str:
    if config.advertise:
        host, advertised_port = parse_address("ADVERTISE", config.advertise)
        # ADVERTISE without the real port (PORT 0 or a range) would point peers elsewhere.
        if config.port == 0 or config.port_range > 1:
            advertised_port = port
        return format_address(host, advertised_port)
    return format_address(_default_host(config.bind), port)


def _reply_address(config: MeshSettings, port: int) -> str:
    """Where an observer's stats replies come to: its host as a node would advertise it."""
    if config.advertise:
        host, _ = parse_address("ADVERTISE", config.advertise)
    else:
        host = _default_host(config.bind, warn=False)
    return format_address(host, port)


def _default_host(bind: str, *, warn: bool = True) -> str:
    if bind not in {"0.0.0.0", "::", ""}:
        return bind
    try:
        hostname = socket.gethostname()
        for family, *_, sockaddr in socket.getaddrinfo(hostname, None, socket.AF_INET):
            address = str(sockaddr[0])
            if family == socket.AF_INET and not address.startswith("127."):
                return address
    except OSError:
        pass
    if not warn:
        return "127.0.0.1"
    logger.warning(
        "mesh: no non-loopback address found for this host; advertising 127.0.0.1. "
        "Set WARPMESH['ADVERTISE'] (or WARPMESH_ADVERTISE) so other hosts can reach it."
    )
    return "127.0.0.1"
