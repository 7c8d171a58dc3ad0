"""The mesh node: one per process, its frame pipeline and its three threads.

The node holds what its parts share (settings, the peer table, the transport, the stores) and
its life cycle; the parts, one module each:

* :mod:`.sending` (:class:`.Sender`): the queue, frames, heartbeats, the goodbye; a writing
  thread sends its own invalidation (``deliver``), the **sender** thread the rest.
* :mod:`.receiving` (:class:`.Receiver`): take, verify, apply (``drain``, on a reading thread
  before its read, or the **receiver** thread), and the periodic checks (gaps, liveness).
* :mod:`.membership` (:class:`.Membership`): who is expected, ready and degraded; the
  **maintenance** thread runs discovery. A broker transport's connected/lost events land here.
* :mod:`.pipeguard` (:class:`.PipeGuard`): connections that send junk, or nothing (nng only).
* :mod:`.inquiries` (:class:`.Inquiries`): stats requests and replies (``mesh_status``).

Nothing here knows Django or its cache: caches register a :class:`.Store` per cache name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pynng

from django_warpmesh import protocol
from django_warpmesh.node import stats
from django_warpmesh.node.config import (
    MeshSettings,
    advertised_address,
    format_address,
    reply_address,
)
from django_warpmesh.node.inquiries import Inquiries
from django_warpmesh.node.interfaces import PeerRegistry, Store
from django_warpmesh.node.links import Links
from django_warpmesh.node.membership import (
    DISCOVERY_FAILURES_DEGRADED,
    DISCOVERY_MAX_BACKOFF,
    Membership,
)
from django_warpmesh.node.peers import LIVENESS_HEARTBEATS, Peer, PeerTable
from django_warpmesh.node.pipeguard import DROPPED_PIPES_KEPT, PIPE_STRIKES, PipeGuard
from django_warpmesh.node.receiving import (
    DUPLICATE_BIND_WINDOW,
    RECENT_TAGS,
    RECV_BATCH,
    TICK_FAST_MS,
    TICK_IDLE_MS,
    Receiver,
)
from django_warpmesh.node.relay import RelayHub, wire_op
from django_warpmesh.node.replies import ReplyInbox, ReplySender
from django_warpmesh.node.sending import (
    DELIVER_ROUNDS,
    ECHO_ENTRY_MAX,
    FRAME_BODY_BUDGET,
    HEARTBEAT_FIXED,
    Sender,
)
from django_warpmesh.node.tls import TLSTransport
from django_warpmesh.node.transports.base import BrokerTransport, Transport, TransportError
from django_warpmesh.node.transports.nng import NngTransport
from django_warpmesh.node.waiting import Wakeup, held
from django_warpmesh.protocol import Kind, OpCode

__all__ = [
    "DELIVER_ROUNDS",
    "DISCOVERY_FAILURES_DEGRADED",
    "DISCOVERY_MAX_BACKOFF",
    "DROPPED_PIPES_KEPT",
    "DUPLICATE_BIND_WINDOW",
    "ECHO_ENTRY_MAX",
    "FRAME_BODY_BUDGET",
    "HEARTBEAT_FIXED",
    "PIPE_STRIKES",
    "RECENT_TAGS",
    "RECV_BATCH",
    "REPLY_MAX_BYTES",
    "SENDER_GRACE",
    "TICK_FAST_MS",
    "TICK_IDLE_MS",
    "MeshNode",
    "Wakeup",
]

logger = logging.getLogger("django_warpmesh")

# Largest stats reply: a whole snapshot, a row per peer (4,096 at most: about 600 KB). Replies
# never ride the bus (see replies.py), so they do not count against MAX_FRAME_BYTES: only an
# observer (mesh_status) takes them in, one connection at a time, while it waits for them.
REPLY_MAX_BYTES = 1024 * 1024
# How much longer than its linger stop() waits for the sender to finish before closing the socket.
SENDER_GRACE = 1.0


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
        self.reply_codec = protocol.Codec(
            key, max_frame_bytes=max(config.max_frame_bytes, REPLY_MAX_BYTES)
        )
        self.counters = stats.Counters()
        self.address = ""
        self.listen_error: str | None = None
        self.max_timeout: float | None = None
        self.degraded = False
        self.ready = False
        self.clock = clock
        self.log = stats.EventLog(clock)
        self.stores: dict[str, Store] = {}
        self.lock = threading.Lock()  # guards the queue, peers and pipes; never held over nng
        self.stopping = threading.Event()
        self.started = False
        self.leaving = False
        self.threads: list[threading.Thread] = []
        self.table = PeerTable(clock, liveness=LIVENESS_HEARTBEATS * config.heartbeat)
        self.links = Links(self.lock, self.table, self.log.once)
        # What carries the frames: the nng mesh (its socket, which the node also dials, listens
        # and binds pipes with), or a broker (``broker``; no socket, no pipes).
        self.broker = broker
        self.transport: Transport | None = None
        self.socket: Any = None
        self.reply_address = ""  # an observer's: where stats replies come to
        self.hub: RelayHub | None = None  # children forked after the socket opened
        self.replies: ReplySender | None = None  # stats replies, to the asker only
        self.inbox: ReplyInbox | None = None  # an observer's: where replies come to
        self.tls: TLSTransport | None = None  # WARPMESH['TLS']: tls+tcp:// endpoints
        self.sender = Sender(self)
        self.membership = Membership(self)
        self.guard = PipeGuard(self)
        self.inquiries = Inquiries(self)
        self.receiver = Receiver(self)  # last: it dispatches to the others
        # The hot paths, bound once: a cache write and read call them without a hop.
        self.publish = self.sender.publish
        self.deliver = self.sender.deliver
        self.drain = self.receiver.drain
        self.set_peer_addresses = self.membership.set_peer_addresses
        self.sync_soon = self.membership.sync_soon
        self.request_stats = self.inquiries.request_stats
        self.cancel_stats_request = self.inquiries.cancel_stats_request

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def hex_id(self) -> str:
        return self.node_id.hex()

    def start(self) -> None:
        config = self.config
        if self.broker is not None:
            self._start_broker(self.broker)
        else:
            self._start_mesh()
        assert self.transport is not None
        if config.drain_on_read and hasattr(select, "poll"):
            self.receiver._recv_poll = select.poll()
            self.receiver._recv_poll.register(self.transport.recv_fd, select.POLLIN)
        self.membership._ready_deadline = self.clock() + config.effective_startup_wait
        initial = self.registry.initial()
        if initial is not None:
            self.membership.set_peer_addresses(initial)
        self.threads = [
            threading.Thread(target=self.sender.run, name="warpmesh-sender", daemon=True),
            threading.Thread(target=self.receiver.run, name="warpmesh-receiver", daemon=True),
            threading.Thread(target=self.membership.run, name="warpmesh-maintenance", daemon=True),
        ]
        for thread in self.threads:
            thread.start()
        self.started = True
        if not self.observer:
            logger.info(
                "mesh: enabled — peer id %s at %s (%s)",
                self.hex_id,
                self.address or self.transport.describe()["url"],
                self.registry.description,
            )

    def _start_broker(self, broker: BrokerTransport) -> None:
        if self.config.max_frame_bytes > broker.max_frame_bytes:
            raise TransportError(
                f"WARPMESH['MAX_FRAME_BYTES'] is {self.config.max_frame_bytes}, more than the "
                f"{broker.name} transport carries ({broker.max_frame_bytes})"
            )
        self.transport = broker
        if self.observer:
            self.reply_address = broker.open_reply_inbox(self.inquiries._on_reply_bytes)
        broker.start(self.membership)

    def _start_mesh(self) -> None:
        config = self.config
        if config.tls is not None:
            self.tls = TLSTransport(config.tls)  # reads the PEM files; raises before any socket
        mesh = NngTransport(config)
        self.transport, self.socket = mesh, mesh.socket
        self.links.open(self.socket, self.tls)
        self.replies = ReplySender(self.tls)
        if self.observer:
            self.inbox = ReplyInbox(
                config.bind,
                ports=range(config.port, config.port + config.port_range) if config.port else (),
                advertise=lambda port: reply_address(config, port),
                tls=self.tls,
                max_bytes=self.reply_codec.max_frame_bytes,
                on_reply=self.inquiries._on_reply_bytes,
            )
            self.reply_address = self.inbox.address
        self.socket.add_post_pipe_connect_cb(self._on_pipe_connect)
        self.socket.add_post_pipe_remove_cb(self._on_pipe_remove)
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
                self.address = mesh.address = advertised_address(config, port)

    def _listen(self) -> int:
        config = self.config
        scheme = self.links.scheme
        ports = [0] if config.port == 0 else range(config.port, config.port + config.port_range)
        last_error: Exception | None = None
        for port in ports:
            url = f"{scheme}://{format_address(config.bind, port)}"
            try:
                listener = (
                    self.socket.listen(url)
                    if self.tls is None
                    else self.tls.listen(self.socket, url)
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
        if self.leaving:
            return
        self.leaving = True
        linger = max(2.0, 2 * self.config.heartbeat) if timeout is None else timeout
        deadline = time.monotonic() + linger
        if self.started and not self.observer:
            # Held invalidations go out at half the linger at the latest (peers that have not
            # answered by then will flush when they do): the rest is for the acknowledgements.
            self.sender._leave_by = self.clock() + linger / 2
            self.sender.queue_control(Kind.BYE, None)
            if self.sender._bye_sent.wait(max(0.0, deadline - time.monotonic())):
                self.sender._bye_acked.wait(max(0.0, deadline - time.monotonic()))
        self.stopping.set()
        self.sender._wake.set()
        self.membership._maintain.set()
        current = threading.current_thread()
        sender, receiver, maintenance = self.threads or (None, None, None)
        # The maintenance thread deletes our row on its way out, on its own connection: never
        # on the caller's, which may be a request's, inside its transaction.
        if maintenance is not None and maintenance is not current:
            maintenance.join(max(0.0, deadline - time.monotonic()))
        # nng aborts the process if its socket is closed during a send: the sender must be
        # done first, and so must a writing thread sending, or a reading thread draining (their
        # locks). None of them blocks (sends and receives are non-blocking), so this is short.
        self.receiver._recv_poll = None  # reads no longer drain
        if sender is not None and sender is not current:
            sender.join(max(0.0, deadline - time.monotonic()) + SENDER_GRACE)
        grace = max(0.0, deadline - time.monotonic()) + SENDER_GRACE
        if self.broker is not None and self.started:
            self.broker.close(grace)
        if self.socket is not None and not (sender is not None and sender.is_alive()):
            # In the order a draining thread takes them (it may answer a stats request).
            with (
                held(self.receiver._drain_lock, grace) as draining,
                held(self.sender._send_lock, grace) as sending,
            ):
                if sending and draining:
                    with contextlib.suppress(Exception):
                        self.socket.close()
        if receiver is not None and receiver is not current:
            receiver.join(max(0.0, deadline - time.monotonic()))
        if self.hub is not None:
            self.hub.close()
        if self.inbox is not None:
            self.inbox.close()

    @property
    def running(self) -> bool:
        return self.started and not self.leaving

    def adopt_child(self, sock: socket.socket) -> None:
        """The parent's end of a pair made at a fork: relay that child's mesh."""
        if self.hub is None:
            self.hub = RelayHub(self._relay_publish)
        # The state first, so that adopt() hands the child this node's, not the hub's initial
        # "not ready": the child starts from the state at the fork and would stop caching until
        # the next message (tests/test_fork.py's child, on a busy host).
        self._state_changed()
        self.hub.adopt(sock)

    def relayed_sockets(self) -> list[socket.socket]:
        return self.hub.sockets() if self.hub is not None else []

    def _relay_publish(self, location: str, code: OpCode, arg: Any, source: Any) -> None:
        # As a peer's invalidation for this process and its other children, then ours to send.
        op = wire_op(location, code, arg)
        store = self.stores.get(location)
        if store is not None:
            store.apply([op])
        if self.hub is not None:
            self.hub.forward_ops([op], exclude=source)
        self.sender.publish(location, code, arg)
        self.sender.deliver()

    def _state_changed(self) -> None:
        if self.hub is not None:
            self.hub.forward_state(self.ready, self.max_timeout)

    def register_store(self, location: str, store: Store) -> None:
        with self.lock:
            self.stores[location] = store

    def store_locations(self) -> list[str]:
        with self.lock:
            return list(self.stores)

    def _on_pipe_connect(self, pipe: Any) -> None:
        # Runs on an nng thread holding nng's lock: touch only our own state.
        self.links.connected(pipe.id, pipe, self.clock())
        self.sender.beat_soon()

    def _on_pipe_remove(self, pipe: Any) -> None:
        if self.links.removed(pipe.id, self.clock()):
            # A parked link went: the maintenance thread dials again.
            self.membership._maintain.set()

    def peers(self) -> list[Peer]:
        with self.lock:
            return self.table.members()

    @property
    def last_seq(self) -> int:
        """The sequence number of the last invalidation frame: how many this node numbered."""
        return self.sender._seq

    @property
    def queued(self) -> int:
        """Invalidations queued and not taken by a send yet."""
        return len(self.sender._queue)

    def snapshot(self) -> dict[str, Any]:
        counters = self.counters
        with self.lock:
            expected = set(self.membership._expected or ())
            sources = dict(self.membership.sources)
            peers = self.table.members()
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
            "heartbeat_period": self.sender.period,
            "transport": self.transport.describe() if self.transport is not None else None,
            "discovery": self.registry.description,
            "discovery_error": self.membership.discovery_error,
            "discovery_failures": self.membership.discovery_failures,
            "discovery_rejected": self.registry.rejected,
            "listen_error": self.listen_error,
            "relayed_pids": self.hub.children() if self.hub is not None else [],
            "peers": stats.peer_rows(peers, expected, self.clock, sources),
            **stats.counter_values(counters),
        }

    @property
    def discovery_error(self) -> str | None:
        return self.membership.discovery_error

    @property
    def discovery_failures(self) -> int:
        return self.membership.discovery_failures
