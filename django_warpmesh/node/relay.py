"""A forked child's mesh, relayed through its parent's node.

nng cannot be used at all in a process forked from one that had opened an nng socket: the child
aborts ("nng is not fork-reentrant safe", ``tests/test_fork.py`` shows it). Yet ``gunicorn
--preload`` and uWSGI without ``lazy-apps`` fork their workers from a master that may have used
the cache while loading the application. So at every fork of a process whose node runs, a
``socketpair`` is made; the child's node is a :class:`RelayedNode` on its end:

* the child's invalidations go up to the parent, which applies them to its own caches, passes
  them on to its other children and publishes them to its peers as its own;
* what the parent receives from its peers goes down to every child, and so do its flushes and
  its state (ready, degraded cap).

Messages are msgpack, each behind a 4-byte length. Up: ``[location, code, arg]`` (a
``publish()``), and ``[HELLO, pid]`` first. Down: ``[OPS, [[location, code, args], ...]]``,
``[FLUSH]``, ``[STATE, ready, max_timeout]``. The pair is private to the two processes: nothing
else can write to it, so it needs no authentication.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgpack

from django_warpmesh import protocol
from django_warpmesh.node import stats
from django_warpmesh.protocol import Op, OpCode

if TYPE_CHECKING:
    from django_warpmesh.node.interfaces import Store

logger = logging.getLogger("django_warpmesh")

HELLO, OPS, FLUSH, STATE = 0, 1, 2, 3
_LENGTH = struct.Struct(">I")
# What a parent keeps for a child that does not read (it has not used its cache yet, or it is
# stuck) before it gives up on the ops and owes that child a flush instead.
MAX_BACKLOG = 8 * 1024 * 1024
_READ_SIZE = 256 * 1024


def encode(message: Sequence[Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return _LENGTH.pack(len(body)) + body


def wire_op(location: str, code: OpCode, arg: Any) -> Op:
    """What ``publish(location, code, arg)`` means to a store that receives it."""
    if code is OpCode.DELETE_UNLESS:
        key, stored = arg
        return Op(location, code, [[key, protocol.digest(stored)]])
    return Op(location, code, arg)


class _Reader:
    """Cuts a byte stream into messages."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        buffer = self._buffer
        buffer += data
        messages = []
        start = 0
        while len(buffer) - start >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer, start)
            end = start + _LENGTH.size + length
            if len(buffer) < end:
                break
            messages.append(msgpack.unpackb(buffer[start + _LENGTH.size : end], raw=False))
            start = end
        del buffer[:start]
        return messages


class _Link:
    """One end of a pair, non-blocking, with what could not be written yet."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.reader = _Reader()
        self.backlog = bytearray()
        self.lock = threading.Lock()
        self.owes_flush = False
        self.pid: int | None = None

    def write(self, data: bytes) -> None:
        """Write now what the socket takes; keep the rest (the owner flushes it when it can)."""
        with self.lock:
            if self.backlog:
                self.backlog += data
            else:
                try:
                    sent = self.sock.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    return  # the other end is gone: its owner finds out when it reads
                if sent < len(data):
                    self.backlog += data[sent:]

    def flush(self) -> None:
        with self.lock:
            if not self.backlog:
                return
            try:
                sent = self.sock.send(self.backlog)
            except BlockingIOError:
                return
            except OSError:
                self.backlog.clear()
                return
            del self.backlog[:sent]

    def read(self) -> list[Any] | None:
        """The messages waiting, or None at the end of the stream."""
        try:
            data = self.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            return None
        if not data:
            return None
        try:
            return self.reader.feed(data)
        except (ValueError, msgpack.UnpackException):
            return None  # not our protocol: treat as gone

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class RelayHub:
    """The parent's side: its forked children, read by a thread of its own.

    ``publish`` is called (on the hub's thread) with each child's ``publish()`` and the child's
    link, to apply it locally, pass it to the other children and send it to the peers.
    """

    def __init__(self, publish: Callable[[str, OpCode, Any, _Link], None]) -> None:
        self._publish = publish
        self._links: dict[int, _Link] = {}
        self._lock = threading.Lock()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._state: list[Any] = [STATE, False, None]

    def adopt(self, sock: socket.socket) -> None:
        link = _Link(sock)
        link.write(encode(self._state))
        with self._lock:
            self._links[sock.fileno()] = link
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="warpmesh-relay", daemon=True
                )
                self._thread.start()
        self._wake()

    def children(self) -> list[int]:
        with self._lock:
            return sorted(link.pid for link in self._links.values() if link.pid is not None)

    def sockets(self) -> list[socket.socket]:
        """Every socket of the hub (a forked child closes its copies)."""
        with self._lock:
            return [
                self._wake_read,
                self._wake_write,
                *(link.sock for link in self._links.values()),
            ]

    def forward_ops(self, ops: Sequence[Op], exclude: _Link | None = None) -> None:
        if not self._links or not ops:
            return
        data = encode([OPS, protocol.ops_body(ops)])
        for link in self._targets(exclude):
            if len(link.backlog) > MAX_BACKLOG:
                # It does not read: what it would get is worth less than a flush it cannot miss.
                with link.lock:
                    link.backlog.clear()
                    link.owes_flush = True
            if link.owes_flush:
                continue
            link.write(data)
        self._wake()

    def forward_flush(self) -> None:
        data = encode([FLUSH])
        for link in self._targets(None):
            with link.lock:
                link.backlog.clear()
                link.owes_flush = False
            link.write(data)
        self._wake()

    def forward_state(self, ready: bool, max_timeout: float | None) -> None:
        state = [STATE, ready, max_timeout]
        if state == self._state:
            return
        self._state = state
        data = encode(state)
        for link in self._targets(None):
            link.write(data)
        self._wake()

    def close(self) -> None:
        self._closed = True
        self._wake()
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()
        for sock in (self._wake_read, self._wake_write):
            sock.close()

    def _targets(self, exclude: _Link | None) -> list[_Link]:
        with self._lock:
            return [link for link in self._links.values() if link is not exclude]

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_write.send(b"x")

    def _run(self) -> None:
        while not self._closed:
            links = self._targets(None)
            readers = [self._wake_read, *(link.sock for link in links)]
            writers = [link.sock for link in links if link.backlog or link.owes_flush]
            try:
                readable, writable, _ = select.select(readers, writers, [], 1.0)
            except (OSError, ValueError):
                continue  # a link closed meanwhile: select again without it
            if self._wake_read in readable:
                with contextlib.suppress(OSError):
                    self._wake_read.recv(4096)
            by_sock = {link.sock: link for link in links}
            for sock in writable:
                link = by_sock[sock]
                if link.owes_flush and not link.backlog:
                    link.owes_flush = False
                    link.write(encode([FLUSH]))
                link.flush()
            for sock in readable:
                if sock is self._wake_read or sock not in by_sock:
                    continue
                self._read(by_sock[sock])

    def _read(self, link: _Link) -> None:
        messages = link.read()
        if messages is None:
            with self._lock:
                self._links.pop(link.sock.fileno(), None)
            link.close()
            return
        for message in messages:
            try:
                if message[0] == HELLO:
                    link.pid = int(message[1])
                    continue
                location, code, arg = message
                self._publish(str(location), OpCode(code), arg, link)
            except Exception:
                logger.exception("mesh: a forked child sent what cannot be relayed (dropped)")


class RelayedNode:
    """The node of a process forked after its parent had opened the mesh socket."""

    enabled = True

    def __init__(
        self,
        sock: socket.socket,
        parent_pid: int,
        fallback_timeout: float,
        *,
        ready: bool,
        max_timeout: float | None,
    ) -> None:
        self.pid = os.getpid()
        self.parent_pid = parent_pid
        # The parent's state at the fork: what it learns after is queued on the pair for us.
        self.ready = ready
        self.max_timeout = max_timeout
        self.reason = (
            f"forked from pid {parent_pid} after it had opened the mesh socket: relayed "
            "through its node"
        )
        self._fallback_timeout = fallback_timeout
        self._link = _Link(sock)
        self._stores: dict[str, Store] = {}
        self._lock = threading.Lock()
        self._gone = False
        self._stop = threading.Event()
        self.invalidations_sent = 0
        self.invalidations_received = 0
        self._link.write(encode([HELLO, self.pid]))
        self._thread = threading.Thread(target=self._run, name="warpmesh-relayed", daemon=True)
        self._thread.start()

    def register_store(self, location: str, store: Store) -> None:
        with self._lock:
            self._stores[location] = store

    def store_locations(self) -> list[str]:
        with self._lock:
            return list(self._stores)

    def publish(self, location: str, code: OpCode, arg: Any) -> None:
        """Hand one invalidation to the parent: a local socket write, never a wait."""
        if self._gone:
            return
        if code is OpCode.DELETE_UNLESS:
            arg = list(arg)
        self._link.write(encode([location, int(code), arg]))
        self.invalidations_sent += 1

    def deliver(self) -> None:
        pass  # publish() already wrote to the parent

    def snapshot(self) -> dict[str, Any]:
        snapshot = stats.alone_snapshot(self.reason, degraded=self.max_timeout is not None)
        snapshot.update(
            enabled=not self._gone,
            ready=self.ready,
            relayed_by=self.parent_pid,
            invalidations_sent=self.invalidations_sent,
            invalidations_received=self.invalidations_received,
        )
        return snapshot

    def stop(self, timeout: float = 2.0) -> None:
        """Hand what is still buffered to the parent (bounded), then close."""
        deadline = time.monotonic() + timeout
        link = self._link
        while link.backlog and not self._gone and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                select.select([], [link.sock], [], max(0.0, deadline - time.monotonic()))
            link.flush()
        self._stop.set()
        with contextlib.suppress(OSError):
            link.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        link.close()

    @property
    def socket(self) -> socket.socket:
        return self._link.sock

    def _stores_now(self) -> list[Store]:
        with self._lock:
            return list(self._stores.values())

    def _run(self) -> None:
        link = self._link
        while not self._stop.is_set():
            writers = [link.sock] if link.backlog else []
            try:
                readable, writable, _ = select.select([link.sock], writers, [], 1.0)
            except (OSError, ValueError):
                return
            if writable:
                link.flush()
            if not readable:
                continue
            messages = link.read()
            if messages is None:
                self._parent_gone()
                return
            for message in messages:
                self._handle(message)

    def _handle(self, message: list[Any]) -> None:
        kind = message[0]
        if kind == OPS:
            by_location: dict[str, list[Op]] = {}
            for location, code, args in message[1]:
                by_location.setdefault(location, []).append(Op(location, OpCode(code), args))
            with self._lock:
                stores = dict(self._stores)
            for location, ops in by_location.items():
                self.invalidations_received += len(ops)
                store = stores.get(location)
                if store is not None:
                    store.apply(ops)
        elif kind == FLUSH:
            for store in self._stores_now():
                store.flush()
        elif kind == STATE:
            self.max_timeout = message[2]
            self.ready = bool(message[1])

    def _parent_gone(self) -> None:
        if self._stop.is_set():
            return
        self._gone = True
        self.max_timeout = self._fallback_timeout
        self.reason = (
            f"forked from pid {self.parent_pid}, whose mesh node is gone: caching locally "
            "only, entries capped"
        )
        logger.error(
            "mesh: the parent process (pid %s) that relayed this process's invalidations has "
            "stopped its mesh node; caching locally only, entries capped at %s s, and writes "
            "here no longer reach the other instances",
            self.parent_pid,
            self._fallback_timeout,
        )
        # What it would have passed on since is unknown.
        for store in self._stores_now():
            store.flush()
