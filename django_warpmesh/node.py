"""The mesh node: one per process, one nng ``Bus0`` socket, three threads.

* ``publish()`` (request threads) appends to a bounded in-memory queue; it never blocks.
* The **sender** thread drains the queue, coalesces, numbers and sends INVALIDATE frames, and
  sends heartbeats, goodbyes and stats replies. It is the only thread that sends on the socket.
* The **receiver** thread verifies frames, drops duplicates and replays, detects sequence gaps
  (flushing the caches they may have made stale), and applies invalidations in bulk.
* The **maintenance** thread runs peer discovery (database or static list) and dials a peer
  again when the pipe that peer opened to us goes; it may block on the database, which is why
  it is alone.

Nothing here knows Django's cache: caches register a :class:`Store` per cache name.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import math
import os
import select
import socket
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import pynng

from django_warpmesh import protocol
from django_warpmesh.conf import MeshSettings, format_address, parse_address
from django_warpmesh.protocol import Frame, Heartbeat, Kind, Op, OpCode
from django_warpmesh.relay import RelayedNode, RelayHub, wire_op
from django_warpmesh.tls import TLSTransport

logger = logging.getLogger("django_warpmesh")

# How long a sequence number may stay missing before we call it lost. Frames of one origin can
# arrive out of order when two pipes join the same pair of nodes (both dialled each other).
GAP_GRACE = 0.05
# A peer heard from within this many heartbeats counts as alive.
LIVENESS_HEARTBEATS = 3
# Receiver: how many frames to take off the socket before applying them in one go.
RECV_BATCH = 512
# Missing seqs tracked per peer before a gap is declared at once instead of waited on.
MAX_MISSING = 4096
# The receiver's tick (gap grace, liveness, readiness): how long it waits for a frame before
# checking anyway, while something is pending and while idle.
TICK_FAST_MS = 50
TICK_IDLE_MS = 250
# Tags of recently accepted frames remembered, to drop the copy from the second pipe cheaply.
RECENT_TAGS = 8192
# Peers (alive or remembered for their sequence numbers) kept at most.
MAX_PEERS = 4096
# Largest body of one frame the sender builds (less when MAX_FRAME_BYTES is smaller): small
# frames keep one slow peer's share of the socket buffer small.
FRAME_BODY_BUDGET = 256 * 1024
# Entry lifetime cap of a process whose mesh could not even be configured.
FALLBACK_TIMEOUT = 5.0
# Repeated events (rejected frames, gaps): at most one log line per kind per this many seconds.
LOG_EVERY = 60.0
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


class DiscoveryError(Exception):
    """A registry could not sync; the message says why, for logs, stats and ``mesh_status``.

    ``alone``: the failure itself shows that no peer can have registered (the peer table does
    not exist yet), so a starting node has nobody to wait for. ``quiet``: expected here (a
    migration command), not worth a warning.
    """

    def __init__(self, reason: str, *, alone: bool = False, quiet: bool = False) -> None:
        super().__init__(reason)
        self.alone = alone
        self.quiet = quiet


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


class Store(Protocol):
    """A cache's storage as the node sees it. Implemented by :mod:`django_warpmesh.cache`."""

    def apply(self, ops: Sequence[Op]) -> None: ...

    def flush(self) -> None: ...


class PeerRegistry(Protocol):
    """Where peer addresses come from: the database table, or the static ``PEERS`` list."""

    description: str

    def initial(self) -> list[str] | None:
        """Addresses known without waiting (a static list), or None."""

    def sync(self, node: MeshNode) -> Iterable[str] | None:
        """Announce ourselves and return the addresses to connect to (None: keep the current).

        Raises :class:`DiscoveryError` when it cannot; the node backs off and retries.
        """

    def leave(self, node: MeshNode) -> None: ...


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
    heard_at_ns: int = 0
    latency_ms: float | None = None
    alive: bool = False
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


@dataclasses.dataclass
class Counters:
    invalidations_sent: int = 0
    invalidations_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    keys_sent: int = 0
    keys_received: int = 0
    gaps_detected: int = 0
    flushes: int = 0
    peers_lost: int = 0
    duplicates: int = 0
    queue_overflows: int = 0
    send_errors: int = 0
    frames_rejected: int = 0
    rejected_by_reason: dict[str, int] = dataclasses.field(default_factory=lambda: defaultdict(int))


class NullNode:
    """The node of a process that caches alone: mesh disabled, unavailable, or unusable."""

    enabled = False
    ready = True
    max_timeout: float | None = None

    def __init__(self, reason: str, max_timeout: float | None = None) -> None:
        self.reason = reason
        self.max_timeout = max_timeout
        self.pid = os.getpid()

    def register_store(self, name: str, store: Store) -> None:
        pass

    def store_names(self) -> list[str]:
        return []

    def publish(self, alias: str, code: OpCode, arg: Any) -> None:
        pass

    def deliver(self) -> None:
        pass

    def snapshot(self) -> dict[str, Any]:
        return {
            "enabled": False,
            "reason": self.reason,
            "node_id": None,
            "peer_id": None,
            "address": None,
            "ready": True,
            "degraded": self.max_timeout is not None,
            "discovery_error": None,
            "discovery_failures": 0,
            "listen_error": None,
            "relayed_pids": [],
            "peers": [],
            **dict.fromkeys(_COUNTER_NAMES, 0),
            "rejected_by_reason": {},
        }

    def stop(self) -> None:
        pass


_COUNTER_NAMES = tuple(
    field.name for field in dataclasses.fields(Counters) if field.name != "rejected_by_reason"
)


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
    ) -> None:
        self.config = config
        self.registry = registry
        self.observer = observer
        self.node_id = os.urandom(protocol.NODE_ID_SIZE)
        self.epoch = time.time_ns() // 1_000_000
        self.pid = os.getpid()
        self.started_at = time.time()
        self.codec = protocol.Codec(key, max_frame_bytes=config.max_frame_bytes)
        self.counters = Counters()
        self.address = ""
        self.listen_error: str | None = None
        self.max_timeout: float | None = None
        self.degraded = False
        self.ready = False
        self._clock = clock
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
        self._peers: dict[bytes, Peer] = {}
        self._pipe_owner: dict[int, bytes] = {}
        self._pipe_dialed: dict[int, str] = {}  # our dialled pipes: id -> the address dialled
        # Both sides dial, so two pipes join each pair and every frame would cross twice. Once
        # both pipes are up, the node with the smaller id hangs up its own dialer ("parks" the
        # address); it dials again if the other side's pipe goes.
        self._parked: dict[str, bytes] = {}  # address -> the node whose pipe carries the link
        self._unpark: set[str] = set()
        self._closing: list[Any] = []  # dialers to close once the lock is released
        self._maintain = Wakeup()
        self._live_pipes: set[int] = set()
        self._self_pipes: set[int] = set()
        self._dialers: dict[str, Any] = {}
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
        self._logged_once: set[str] = set()
        self._recent_tags: OrderedDict[bytes, bytes] = OrderedDict()
        self._log_limits: dict[str, _Limited] = {}
        self._socket: Any = None
        self._hub: RelayHub | None = None  # children forked after the socket opened
        self._tls: TLSTransport | None = None  # WARPMESH['TLS']: tls+tcp:// endpoints

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def hex_id(self) -> str:
        return self.node_id.hex()

    def start(self) -> None:
        config = self.config
        if config.tls is not None:
            self._tls = TLSTransport(config.tls)  # reads the PEM files; raises before any socket
        self._socket = pynng.Bus0(
            recv_buffer_size=config.buffer_size,
            send_buffer_size=config.buffer_size,
            recv_max_size=config.max_frame_bytes,
            reconnect_time_min=50,
            reconnect_time_max=1000,
        )
        if config.drain_on_read and hasattr(select, "poll"):
            self._recv_poll = select.poll()
            self._recv_poll.register(self._socket.recv_fd, select.POLLIN)
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
                self.address = _advertised_address(config, port)
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
                self.address,
                self.registry.description,
            )

    def _listen(self) -> int:
        config = self.config
        scheme = "tcp" if self._tls is None else self._tls.scheme
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
        if self._socket is not None and not (sender is not None and sender.is_alive()):
            with (
                _held(self._send_lock, grace) as sending,
                _held(self._drain_lock, grace) as draining,
            ):
                if sending and draining:
                    with contextlib.suppress(Exception):
                        self._socket.close()
        if receiver is not None and receiver is not current:
            receiver.join(max(0.0, deadline - time.monotonic()))
        if self._hub is not None:
            self._hub.close()

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
            current = dict(self._dialers)
            for address in set(self._parked) - wanted:
                del self._parked[address]
            parked = set(self._parked)
        for address in wanted - current.keys() - parked:
            self._dial(address)
        for address in current.keys() - wanted:
            dialer = self._dialers.pop(address, None)
            if dialer is not None:
                with contextlib.suppress(Exception):
                    dialer.close()
        if first:
            # The start-up window now lasts until those peers answer or the wait runs out.
            self._ready_deadline = self._clock() + self.config.effective_startup_wait
        self._check_ready()

    def _dial(self, address: str) -> None:
        scheme = "tcp" if self._tls is None else self._tls.scheme
        try:
            host, port = parse_address("PEERS", address)
            url = f"{scheme}://{format_address(host, port)}"
            self._dialers[address] = (
                self._socket.dial(url, block=False)
                if self._tls is None
                else self._tls.dial(self._socket, url, host)
            )
        except Exception as exc:
            self._log_once(f"dial:{address}", "mesh: cannot dial %s: %s", address, exc)

    def _dialed_address(self, pipe: Any) -> str:
        """The address we dialled to open ``pipe`` ("" for a pipe a peer opened to us)."""
        try:
            dialer = pipe.dialer
        except Exception:
            return ""
        if dialer is None:
            return ""
        for address, candidate in list(self._dialers.items()):
            if candidate is dialer or getattr(candidate, "id", None) == getattr(dialer, "id", -1):
                return address
        return ""

    def _on_pipe_connect(self, pipe: Any) -> None:
        # Runs on an nng thread holding nng's lock: touch only our own state.
        with self._lock:
            self._live_pipes.add(pipe.id)
        self._heartbeat_now.set()
        self._wake.set()

    def _on_pipe_remove(self, pipe: Any) -> None:
        with self._lock:
            self._live_pipes.discard(pipe.id)
            self._self_pipes.discard(pipe.id)
            owner = self._pipe_owner.pop(pipe.id, None)
            self._pipe_dialed.pop(pipe.id, None)
            peer = self._peers.get(owner) if owner is not None else None
            if peer is None:
                return
            peer.pipes.discard(pipe.id)
            if peer.pipes:
                return
            # The pipe that carried a parked link went: dial that peer ourselves again.
            unpark = {a for a, node_id in self._parked.items() if node_id == owner}
            self._unpark |= unpark
        if unpark:
            self._maintain.set()

    def _check_ready(self) -> None:
        if self.ready:
            return
        with self._lock:
            expected = self._expected
            heard = {a for p in self._peers.values() if p.alive for a in (p.address, p.dialed_as)}
        timed_out = self._clock() >= self._ready_deadline
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
            # A leaving node's held invalidations must go at _leave_by, woken or not.
            timeout = max(0.0, min(next_heartbeat, self._leave_by) - now)
            self._wake.wait(timeout)
            stopping = self._stop.is_set()
            try:
                self._send_pending()
                now = self._clock()
                # Nothing after the goodbye: a heartbeat would make the peers count us alive
                # again, then lost, and flush.
                beat = now >= next_heartbeat or self._heartbeat_now.is_set()
                if beat and not stopping and not self._bye_sent.is_set():
                    self._heartbeat_now.clear()
                    with self._send_lock:
                        self._send_heartbeat()
                    next_heartbeat = now + self.config.heartbeat
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
            op = _single_op(*queue[0])
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
                        self._log_once("coalesce", "mesh: cannot coalesce invalidations; clearing")
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
            self._bye_recipients = {
                peer.node_id for peer in self._peers.values() if peer.alive and not peer.observer
            }
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
        frame = Frame(Kind.INVALIDATE, self.node_id, self.epoch, self._seq, protocol.ops_body(ops))
        try:
            data = self.codec.encode(frame)
        except Exception as exc:
            # One key larger than a frame (a ProtocolError), or something msgpack cannot
            # encode: tell peers to drop that whole cache instead.
            if not isinstance(exc, protocol.ProtocolError):
                self.counters.send_errors += 1
                self._log_once(
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
        frame = Frame(kind, self.node_id, self.epoch, self._seq, body)
        self._send_bytes(self.codec.encode(frame))

    def _send_bytes(self, data: bytes) -> bool:
        try:
            self._socket.send(data)
        except pynng.Closed:
            return False
        except pynng.NNGException as exc:
            self.counters.send_errors += 1
            self._log_once("send", "mesh: send failed (%s); peers will see a gap and flush", exc)
            return False
        self.counters.frames_sent += 1
        return True

    def _send_heartbeat(self) -> None:
        now_ns = time.monotonic_ns()
        with self._lock:
            echo = tuple(
                (peer.node_id, peer.heard_ns, now_ns - peer.heard_at_ns)
                for peer in self._peers.values()
                if peer.alive and peer.heard_ns
            )
        heartbeat = Heartbeat(self.address, now_ns, echo, self.observer)
        self._send(Kind.HEARTBEAT, protocol.heartbeat_body(heartbeat))

    # -- receiver -----------------------------------------------------------------------------

    def _run_receiver(self) -> None:
        # Wait on nng's "message ready" descriptor, then take what is queued without blocking:
        # a blocking nng receive costs an extra thread hand-off inside nng per message, and each
        # of its timeouts wakes nng's own timer threads too.
        ready = _Readable(self._socket.recv_fd)
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
            except pynng.Closed:
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
        except pynng.Closed:
            pass
        except Exception:
            logger.exception("mesh: error applying received frames on a read (continuing)")

    def _drain_socket(self) -> None:
        """Take every frame queued on the socket and apply it (the caller holds the drain lock).

        Each receive is one call into nng that releases the GIL: frames are taken until the
        queue says it is empty, with no readiness check between them.
        """
        sock = self._socket
        while True:
            batch: list[Any] = []
            try:
                while len(batch) < RECV_BATCH:
                    batch.append(sock.recv_msg(block=False))
            except pynng.TryAgain:
                pass
            if batch:
                self._handle_batch(batch)
            if len(batch) < RECV_BATCH:
                return

    def _tick_every_ms(self) -> int:
        # Often only while something is pending (a missing frame's grace period, the start-up
        # window): an idle mesh then wakes 4 times a second, not 20.
        if not self.ready or any(peer.missing for peer in list(self._peers.values())):
            return TICK_FAST_MS
        return TICK_IDLE_MS

    def _handle_batch(self, batch: list[Any]) -> None:
        now = self._clock()
        by_alias: dict[str, list[Op]] = defaultdict(list)
        flush = False
        recent = self._recent_tags
        for message in batch:
            self.counters.frames_received += 1
            data = message.bytes
            # While two pipes join a pair (both dialled; one is hung up soon) a frame arrives
            # twice: the second copy is known by its tag, without verifying or parsing it again.
            tag = data[-protocol.TAG_SIZE :]
            origin = recent.get(tag)
            if origin is not None:
                self.counters.duplicates += 1
                self._bind_pipe(message.pipe, origin)
                continue
            try:
                frame = self.codec.decode(data)
            except protocol.ProtocolError as exc:
                self._reject(exc.reason)
                continue
            recent[tag] = frame.origin
            if len(recent) > RECENT_TAGS:
                recent.popitem(last=False)
            flush |= self._accept(frame, message.pipe, now, by_alias)
        if flush:
            self._flush_all()
        for alias, ops in by_alias.items():
            store = self._stores.get(alias)
            if store is not None:
                store.apply(ops)
        if self._hub is not None and by_alias:
            self._hub.forward_ops([op for ops in by_alias.values() for op in ops])
        if self._closing:
            self._close_parked_dialers()

    def _reject(self, reason: str) -> None:
        self.counters.frames_rejected += 1
        self.counters.rejected_by_reason[reason] += 1
        self._log_limited(f"reject:{reason}", "mesh: rejected a frame (%s)", reason)

    def _accept(self, frame: Frame, pipe: Any, now: float, by_alias: dict[str, list[Op]]) -> bool:
        """Check one verified frame; queue its ops. Returns True if caches must be flushed."""
        origin = frame.origin
        if origin == self.node_id:
            self._self_pipes.add(pipe.id)
            self._close_self_dialer(pipe)
            return False
        with self._lock:
            owner = self._bind_pipe_locked(pipe, origin)
            if owner != origin:
                # An authenticated peer speaking for another node on its own pipe.
                self._reject("foreign_origin")
                return False
            peer = self._peers.get(origin)
            if peer is None:
                peer = self._new_peer(origin)
        if frame.epoch < peer.epoch:
            self._reject("replayed")
            return False
        flush = False
        if frame.epoch > peer.epoch:
            if peer.highest is not None:
                # Same id, new epoch: it restarted. What it sent before we cannot know.
                flush = True
            peer.epoch, peer.highest, peer.missing = frame.epoch, None, {}
            peer.heard_ns = 0
        kind = frame.kind
        if not self._is_fresh(peer, frame):
            # A copy of a frame already seen (another pipe, or a replay by someone who captured
            # it): it must not make a silent peer look alive.
            self.counters.duplicates += 1
            return flush
        if kind is Kind.STATS_REQUEST and not peer.alive:
            # Observers (mesh_status) ask before their first heartbeat may have arrived; answer,
            # but don't count a node that has not introduced itself as a live peer.
            self._on_stats_request(peer, frame.body)
            return flush
        was_alive = peer.alive
        if not was_alive:
            peer.announce, peer.announce_heartbeats, peer.latency_ms = True, 0, None
        peer.last_heard = now
        peer.alive = True
        if kind is Kind.INVALIDATE:
            flush |= self._track_invalidate(peer, frame.seq, now, by_alias, frame.body)
        else:
            flush |= self._track_seq(peer, frame.seq, now)
            if kind is Kind.HEARTBEAT:
                self._on_heartbeat(peer, frame.body, was_alive)
            elif kind is Kind.BYE:
                self._on_bye(peer)
            elif kind is Kind.STATS_REQUEST:
                self._on_stats_request(peer, frame.body)
            elif kind is Kind.STATS_REPLY:
                self._on_stats_reply(peer, frame.body)
            elif kind is Kind.BYE_ACK:
                self._on_bye_ack(peer, frame.body)
        return flush

    def _bind_pipe(self, pipe: Any, origin: bytes) -> None:
        with self._lock:
            self._bind_pipe_locked(pipe, origin)

    def _bind_pipe_locked(self, pipe: Any, origin: bytes) -> bytes:
        """The node a pipe speaks for: the first authenticated origin seen on it."""
        pipe_id = pipe.id
        owner = self._pipe_owner.get(pipe_id)
        if owner is None:
            self._pipe_owner[pipe_id] = owner = origin
            peer = self._peers.get(origin) or self._new_peer(origin)
            dialed_as = self._dialed_address(pipe)
            if dialed_as:
                peer.dialed_as = dialed_as
        # Counted among the peer's pipes once nng has reported it connected: its first frames
        # can arrive before that callback has run, and one already gone must not be counted.
        if owner == origin and pipe_id in self._live_pipes:
            peer = self._peers.get(origin) or self._new_peer(origin)
            if pipe_id not in peer.pipes:
                peer.pipes.add(pipe_id)
                dialed_as = self._dialed_address(pipe)
                if dialed_as:
                    self._pipe_dialed[pipe_id] = dialed_as
                self._park_duplicate_link(peer)
        return owner

    def _park_duplicate_link(self, peer: Peer) -> None:
        """Hang up our dialer to ``peer`` when its own pipe to us already joins the pair."""
        if self.node_id > peer.node_id:
            return  # the larger id keeps its dialer: exactly one side yields
        dialed = {self._pipe_dialed[p] for p in peer.pipes if p in self._pipe_dialed}
        if not dialed or len(dialed) == len(peer.pipes):
            return  # no pipe of its own to us (yet)
        for address in dialed:
            dialer = self._dialers.pop(address, None)
            if dialer is not None:
                self._parked[address] = peer.node_id
                self._closing.append(dialer)

    def _close_parked_dialers(self) -> None:
        with self._lock:
            closing, self._closing = self._closing, []
        for dialer in closing:
            with contextlib.suppress(Exception):
                dialer.close()

    def _dial_unparked(self) -> None:
        with self._lock:
            unpark, self._unpark = self._unpark, set()
            addresses = [a for a in unpark if self._parked.pop(a, None) is not None]
        for address in addresses:
            if address not in self._dialers:
                self._dial(address)

    @staticmethod
    def _is_fresh(peer: Peer, frame: Frame) -> bool:
        if frame.kind is Kind.INVALIDATE:
            highest = peer.highest
            return highest is None or frame.seq > highest or frame.seq in peer.missing
        if frame.kind is Kind.HEARTBEAT:
            # Stamped with the sender's monotonic clock: a replayed heartbeat is an old one.
            sent_ns = frame.body.sent_ns if isinstance(frame.body, Heartbeat) else 0
            return sent_ns > peer.heard_ns
        return True

    def _new_peer(self, origin: bytes) -> Peer:
        if len(self._peers) >= MAX_PEERS:
            stale = min(
                (p for p in self._peers.values() if not p.alive),
                key=lambda p: p.last_heard,
                default=None,
            )
            if stale is not None:
                del self._peers[stale.node_id]
        peer = self._peers[origin] = Peer(origin)
        return peer

    def _first_contact_needs_flush(self, seq: int) -> bool:
        # A node that is still in its start-up window holds nothing it could have missed.
        return seq > 0 and self.ready

    def _track_invalidate(
        self,
        peer: Peer,
        seq: int,
        now: float,
        by_alias: dict[str, list[Op]],
        ops: list[Op],
    ) -> bool:
        flush = False
        highest = peer.highest
        if highest is None:
            flush = self._first_contact_needs_flush(seq - 1)
            peer.highest = seq
        elif seq == highest + 1:
            peer.highest = seq
        elif seq > highest:
            flush = self._note_missing(peer, highest + 1, seq, now)
            peer.highest = seq
        elif peer.missing.pop(seq, None) is None:
            self.counters.duplicates += 1
            return False
        self.counters.invalidations_received += len(ops)
        peer.invalidations_received += len(ops)
        for op in ops:
            self.counters.keys_received += len(op.args) if isinstance(op.args, list) else 1
            by_alias[op.alias].append(op)
        return flush

    def _track_seq(self, peer: Peer, seq: int, now: float) -> bool:
        """Non-invalidate frames carry the sender's latest seq without consuming one."""
        highest = peer.highest
        if highest is None:
            peer.highest = seq
            return self._first_contact_needs_flush(seq)
        if seq > highest:
            peer.highest = seq
            return self._note_missing(peer, highest + 1, seq + 1, now)
        return False

    def _note_missing(self, peer: Peer, first: int, end: int, now: float) -> bool:
        if end - first + len(peer.missing) > MAX_MISSING:
            peer.missing.clear()
            return self._gap(peer)
        for seq in range(first, end):
            peer.missing[seq] = now
        return False

    def _gap(self, peer: Peer) -> bool:
        self.counters.gaps_detected += 1
        peer.gaps_detected += 1
        self._log_limited(
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
        peer.alive = False
        if not self.observer and not self._leaving:
            # Everything it sent before its goodbye has been received: it may exit now.
            with self._lock:
                self._outbox.append((Kind.BYE_ACK, peer.node_id))
            self._wake.set()

    def _on_bye_ack(self, peer: Peer, leaving: bytes) -> None:
        if leaving == self.node_id:
            self._bye_acks.add(peer.node_id)
            self._check_bye_acked()

    def _on_stats_request(self, peer: Peer, request_id: int) -> None:
        if self.observer:
            return
        reply = protocol.StatsReply(request_id, peer.node_id, self.snapshot())
        with self._lock:
            self._outbox.append((Kind.STATS_REPLY, protocol.stats_reply_body(reply)))
        self._wake.set()

    def _on_stats_reply(self, peer: Peer, reply: protocol.StatsReply) -> None:
        if reply.requester != self.node_id:
            return
        waiter = self._stats_waiters.get(reply.request_id)
        if waiter is not None:
            waiter(peer.node_id, reply.stats)

    def _close_self_dialer(self, pipe: Any) -> None:
        with contextlib.suppress(Exception):
            dialer = pipe.dialer
            for address, candidate in list(self._dialers.items()):
                if candidate is dialer:
                    del self._dialers[address]
                    logger.info("mesh: %s is this process itself; not dialling it", address)
                    dialer.close()

    def _tick(self) -> None:
        """Periodic checks, run by the receiver between batches: at least every 50 ms while a
        frame is missing or the start-up window is open, every 250 ms otherwise."""
        now = self._clock()
        flush = False
        lost: list[Peer] = []
        liveness = LIVENESS_HEARTBEATS * self.config.heartbeat
        with self._lock:
            for peer in self._peers.values():
                if peer.missing and now - min(peer.missing.values()) > GAP_GRACE:
                    peer.missing.clear()
                    flush |= self._gap(peer)
                if peer.alive and now - peer.last_heard > liveness:
                    peer.alive = False
                    lost.append(peer)
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
        self._flush_log_limits(now)
        self._check_ready()

    def _update_degraded(self) -> None:
        """Cap new entries' lifetime while a peer we know of cannot be reached, or while
        discovery fails (a peer we do not know of may exist): see docs/consistency.md."""
        with self._lock:
            expected = self._expected or set()
            reachable = {
                a for p in self._peers.values() if p.alive for a in (p.address, p.dialed_as)
            }
        self.degraded = bool(expected - reachable) or (
            self.discovery_failures >= DISCOVERY_FAILURES_DEGRADED
        )
        self.max_timeout = self.config.degraded_timeout if self.degraded else None
        self._state_changed()

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
                self._dial_unparked()
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
        with self._lock:
            self._outbox.append((Kind.STATS_REQUEST, request_id))
        self._wake.set()

    def peers(self) -> list[Peer]:
        with self._lock:
            return [peer for peer in self._peers.values() if not peer.observer]

    def snapshot(self) -> dict[str, Any]:
        counters = self.counters
        with self._lock:
            expected = set(self._expected or ())
            peers = [p for p in self._peers.values() if not p.observer]
        rows = []
        for peer in sorted(peers, key=lambda p: p.address):
            if not peer.alive and not {peer.address, peer.dialed_as} & expected:
                continue
            rows.append(
                {
                    "id": peer.hex_id,
                    "address": peer.address,
                    "connected": peer.alive,
                    "latency_ms": peer.latency_ms,
                    "invalidations_received": peer.invalidations_received,
                    "gaps_detected": peer.gaps_detected,
                    "last_heard_s": round(self._clock() - peer.last_heard, 3),
                }
            )
        known = {row["address"] for row in rows} | {peer.dialed_as for peer in peers}
        for address in sorted(expected - known):
            rows.append(
                {
                    "id": None,
                    "address": address,
                    "connected": False,
                    "latency_ms": None,
                    "invalidations_received": 0,
                    "gaps_detected": 0,
                    "last_heard_s": None,
                }
            )
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
            "discovery": self.registry.description,
            "discovery_error": self.discovery_error,
            "discovery_failures": self.discovery_failures,
            "listen_error": self.listen_error,
            "relayed_pids": self._hub.children() if self._hub is not None else [],
            "peers": rows,
            **{name: getattr(counters, name) for name in _COUNTER_NAMES},
            "rejected_by_reason": dict(counters.rejected_by_reason),
        }

    def _log_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._logged_once:
            self._logged_once.add(key)
            logger.warning(message, *args)

    def _log_limited(self, key: str, message: str, *args: object) -> None:
        """A warning at most once per ``LOG_EVERY`` seconds per key; repeats are summed up."""
        now = self._clock()
        limit = self._log_limits.get(key)
        if limit is not None and (limit.repeats or now - limit.logged_at < LOG_EVERY):
            limit.repeats += 1
            limit.message, limit.args = message, args
            self._flush_log_limits(now)  # the summed-up line, if its minute is over
            return
        self._log_limits[key] = _Limited(now)
        logger.warning(message, *args)

    def _flush_log_limits(self, now: float) -> None:
        """Receiver thread: log what a limited line held back, once its minute is up."""
        for key, limit in list(self._log_limits.items()):
            if now - limit.logged_at < LOG_EVERY:
                continue
            if limit.repeats:
                logger.warning(
                    limit.message + " (%d more time(s) in the last %d s)",
                    *limit.args,
                    limit.repeats,
                    round(now - limit.logged_at),
                )
                self._log_limits[key] = _Limited(now)
            else:
                del self._log_limits[key]


@dataclasses.dataclass
class _Limited:
    logged_at: float
    repeats: int = 0
    message: str = ""
    args: tuple[object, ...] = ()


# A single op sent as it is, unsplit, when it names at most this many keys or tags.
SINGLE_OP_MAX_ITEMS = 64


def _single_op(alias: str, code: OpCode, arg: Any) -> Op | None:
    """One queued op as ``coalesce`` would send it; None when it needs more (a large list)."""
    if code is OpCode.DELETE_UNLESS:
        key, stored = arg
        return Op(alias, code, [[key, protocol.digest(stored)]])
    if code is OpCode.DELETE or code is OpCode.TAGS:
        items = list(dict.fromkeys(arg))
        return Op(alias, code, items) if len(items) <= SINGLE_OP_MAX_ITEMS else None
    return Op(alias, code, arg)  # CLEAR, PATTERN


def coalesce(queue: Sequence[tuple[str, OpCode, Any]], overflowed: set[str]) -> list[Op]:
    """Merge queued invalidations: a key once (its last op wins), a clear swallows its alias."""
    # The sender's per-key loop: a write loop's throughput is bounded by it, hence the locals.
    clear, delete, delete_unless, tags_code = (
        OpCode.CLEAR,
        OpCode.DELETE,
        OpCode.DELETE_UNLESS,
        OpCode.TAGS,
    )
    cleared: set[str] = set(overflowed)
    keys: dict[str, dict[str, bytes | None]] = {}
    tags: dict[str, dict[str, None]] = {}
    patterns: dict[str, dict[str, None]] = {}
    for alias, code, arg in queue:
        if code is delete_unless and alias not in cleared:
            alias_keys = keys.get(alias)
            if alias_keys is None:
                alias_keys = keys[alias] = {}
            key, stored = arg
            alias_keys[key] = stored
        elif code is clear:
            cleared.add(alias)
            keys.pop(alias, None)
            tags.pop(alias, None)
            patterns.pop(alias, None)
        elif alias in cleared:
            # Later ops after a clear still matter only for values stored after it; a clear
            # drops every copy on the peers, so it already covers them.
            continue
        elif code is delete:
            keys.setdefault(alias, {}).update(dict.fromkeys(arg))
        elif code is tags_code:
            tags.setdefault(alias, {}).update(dict.fromkeys(arg))
        else:  # OpCode.PATTERN
            patterns.setdefault(alias, {})[arg] = None
    ops = [Op(alias, clear, None) for alias in cleared]
    digest = protocol.digest
    for alias, entries in keys.items():
        deletes = [key for key, stored in entries.items() if stored is None]
        unless = [[key, digest(stored)] for key, stored in entries.items() if stored is not None]
        if deletes:
            ops.append(Op(alias, delete, deletes))
        if unless:
            ops.append(Op(alias, delete_unless, unless))
    ops.extend(Op(alias, tags_code, list(names)) for alias, names in tags.items())
    for alias, names in patterns.items():
        ops.extend(Op(alias, OpCode.PATTERN, pattern) for pattern in names)
    return ops


def _advertised_address(config: MeshSettings, port: int) -> str:
    if config.advertise:
        host, advertised_port = parse_address("ADVERTISE", config.advertise)
        # ADVERTISE without the real port (PORT 0 or a range) would point peers elsewhere.
        if config.port == 0 or config.port_range > 1:
            advertised_port = port
        return format_address(host, advertised_port)
    return format_address(_default_host(config.bind), port)


def _default_host(bind: str) -> str:
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
    logger.warning(
        "mesh: no non-loopback address found for this host; advertising 127.0.0.1. "
        "Set WARPMESH['ADVERTISE'] (or WARPMESH_ADVERTISE) so other hosts can reach it."
    )
    return "127.0.0.1"


# -- the process's node ---------------------------------------------------------------------

AnyNode = MeshNode | NullNode | RelayedNode

_current: AnyNode | None = None
_current_lock = threading.Lock()
# The pid of the process that opened an nng socket. nng cannot be used again in a process
# forked from it (it aborts), so a forked child must not even try.
_nng_opened_in: int | None = None
_node_factory: Callable[[], MeshNode | NullNode] | None = None
_existing_stores: Callable[[], Mapping[str, Store]] = dict
# Made before a fork of a process whose node runs: the parent's end and the child's end.
_relay_pair: tuple[socket.socket, socket.socket] | None = None
# In a child forked after the socket opened: its end of that pair, its parent's pid, and the
# parent's state at the fork (ready, degraded cap), which the child starts from.
_relay_channel: tuple[socket.socket, int, bool, float | None] | None = None


def set_node_factory(
    factory: Callable[[], MeshNode | NullNode], stores: Callable[[], Mapping[str, Store]]
) -> None:
    """Installed by the cache layer, which knows the Django settings the node is built from,
    and the stores that exist already (each node, whatever its kind, is given them)."""
    global _node_factory, _existing_stores
    _node_factory = factory
    _existing_stores = stores


def current_node() -> AnyNode | None:
    """This process's node if one was started (or refused), without starting one."""
    return _current


def get_node() -> AnyNode:
    node = _current
    if node is not None:
        return node
    return _start_node()


def _no_drain() -> None:
    pass


# Called by every cache read: the running node's drain() (see MeshNode.drain), or nothing.
drain_before_read: Callable[[], None] = _no_drain


def _start_node() -> AnyNode:
    global _current, drain_before_read
    with _current_lock:
        if _current is None:
            if _node_factory is None:
                # No MeshCache has been imported yet, so there is nothing to keep coherent; do
                # not remember this answer, or the first real cache use would never start it.
                return NullNode("no MeshCache configured in this process yet")
            _current = _make_node(_node_factory)
            if isinstance(_current, MeshNode) and _current.config.drain_on_read:
                drain_before_read = _current.drain
        return _current


def _make_node(factory: Callable[[], MeshNode | NullNode]) -> AnyNode:
    """This process's node, given the stores that exist, started (under ``_current_lock``)."""
    global _nng_opened_in, _relay_channel
    node: AnyNode
    if _nng_opened_in is not None and _nng_opened_in != os.getpid():
        from django_warpmesh.conf import get_settings

        cap = get_settings().degraded_timeout
        if _relay_channel is not None:
            sock, parent_pid, ready, max_timeout = _relay_channel
            _relay_channel = None
            logger.warning(
                "mesh: this process was forked from pid %s after that process had opened the "
                "mesh socket (nng cannot be used after fork): its invalidations are relayed "
                "through that process's node. Use the cache only after the fork (gunicorn "
                "without --preload, uWSGI lazy-apps) to give it a node of its own.",
                parent_pid,
            )
            node = RelayedNode(
                sock, parent_pid, cap or FALLBACK_TIMEOUT, ready=ready, max_timeout=max_timeout
            )
        else:
            logger.error(
                "mesh: this process was forked from one (pid %s) that had already opened the "
                "mesh socket, and nng cannot be used after fork; caching locally only, with "
                "entries capped at DEGRADED_TIMEOUT, and writes here reach no other instance. "
                "Do not use the cache before the fork (e.g. in gunicorn --preload at import "
                "time).",
                _nng_opened_in,
            )
            node = NullNode("forked after the mesh socket was opened", cap)
        _register_existing_stores(node)
        return node
    try:
        node = factory()
    except Exception as exc:
        # Invalid settings (the settings check names the key) must not fail requests; but
        # without a mesh, peers' writes cannot reach us: cap what we cache.
        logger.error(
            "mesh: cannot build the mesh node (%s); caching locally only, entries capped at %s s",
            exc,
            FALLBACK_TIMEOUT,
        )
        node = NullNode(f"cannot build the mesh node: {exc}", FALLBACK_TIMEOUT)
    _register_existing_stores(node)
    if isinstance(node, MeshNode):
        _nng_opened_in = os.getpid()
        try:
            node.start()
        except Exception as exc:
            cap = node.config.degraded_timeout
            logger.error(
                "mesh: could not start (%s); caching locally only, entries capped at %s s",
                exc,
                cap,
            )
            with contextlib.suppress(Exception):
                node.stop(timeout=0)
            node = NullNode(f"could not start: {exc}", cap)
    return node


def _register_existing_stores(node: AnyNode) -> None:
    for name, store in _existing_stores().items():
        node.register_store(name, store)


def stop_node() -> None:
    """Stop this process's node (atexit, tests). The next cache use starts a new one."""
    global _current, drain_before_read
    with _current_lock:
        node, _current = _current, None
        drain_before_read = _no_drain
    if node is not None and node.pid == os.getpid():
        node.stop()


def _before_fork() -> None:
    global _relay_pair
    node = _current
    if isinstance(node, MeshNode) and node.pid == os.getpid() and node.running:
        try:
            _relay_pair = socket.socketpair()
        except OSError:
            _relay_pair = None  # out of descriptors: the child caches alone, as it says


def _after_fork_in_parent() -> None:
    global _relay_pair
    pair, _relay_pair = _relay_pair, None
    if pair is None:
        return
    parent_end, child_end = pair
    child_end.close()
    node = _current
    if isinstance(node, MeshNode):
        node.adopt_child(parent_end)
    else:
        parent_end.close()


def _after_fork_in_child() -> None:
    global _current, _current_lock, _relay_pair, _relay_channel, drain_before_read
    drain_before_read = _no_drain
    if _nng_opened_in is not None:
        # pynng's atexit handler shuts nng down; in a child of a process that used nng it
        # waits forever for threads that were not forked, and the child never exits.
        with contextlib.suppress(AttributeError):
            atexit.unregister(pynng.nng._pynng_atexit)
    # Descriptors of the parent's relays are not ours: a copy held here would keep a sibling
    # (or our own parent) from seeing the other end close.
    inherited = _current.relayed_sockets() if isinstance(_current, MeshNode) else []
    if isinstance(_current, RelayedNode):
        inherited.append(_current.socket)
    if _relay_channel is not None:
        inherited.append(_relay_channel[0])
    for sock in inherited:
        with contextlib.suppress(OSError):
            sock.close()
    pair, _relay_pair = _relay_pair, None
    _relay_channel = None
    if pair is not None and isinstance(_current, MeshNode):
        parent_end, child_end = pair
        parent_end.close()
        _relay_channel = (child_end, _current.pid, _current.ready, _current.max_timeout)
    # The parent's node, threads and lock are not ours: forget them without touching them.
    _current = None
    _current_lock = threading.Lock()
    for callback in _fork_callbacks:
        callback()


_fork_callbacks: list[Callable[[], None]] = []


def on_fork_in_child(callback: Callable[[], None]) -> None:
    _fork_callbacks.append(callback)


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)
atexit.register(stop_node)
