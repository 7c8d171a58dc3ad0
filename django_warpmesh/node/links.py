"""The node's connections: its dialers, the pipes nng reports, and the peer each pipe speaks for.

Both nodes of a pair dial each other, so two pipes join each pair and every frame would cross
twice. Once both pipes are up, the node with the smaller id hangs up its own dialer ("parks" the
address); it dials again if the other side's pipe goes.

Everything here is guarded by the node's lock (passed in), and never held over a call into nng:
dialers to close are closed once it is released.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from django_warpmesh.node.config import format_address, parse_address
from django_warpmesh.node.peers import Peer, PeerTable
from django_warpmesh.node.tls import TLSTransport

logger = logging.getLogger("django_warpmesh")


class Links:
    def __init__(
        self,
        lock: threading.Lock,
        peers: PeerTable,
        log_once: Callable[..., None],
    ) -> None:
        self._lock = lock
        self._peers = peers
        self._log_once = log_once
        self.socket: Any = None  # set when the node opens its socket
        self.tls: TLSTransport | None = None  # WARPMESH['TLS']: tls+tcp:// endpoints
        self.dialers: dict[str, Any] = {}
        self.pipe_owner: dict[int, bytes] = {}
        self.pipe_dialed: dict[int, str] = {}  # our dialled pipes: id -> the address dialled
        self.parked: dict[str, bytes] = {}  # address -> the node whose pipe carries the link
        self.unpark: set[str] = set()
        self.closing: list[Any] = []  # dialers to close once the lock is released
        self.live_pipes: set[int] = set()
        self.self_pipes: set[int] = set()
        # The live pipes themselves and when each connected: the node hangs up on those that
        # bring nothing (see MeshNode._close_idle_pipes), from its own threads.
        self.pipes: dict[int, Any] = {}
        self.connected_at: dict[int, float] = {}

    def open(self, socket: Any, tls: TLSTransport | None) -> None:
        """The node's socket is open: dial on it (through ``tls`` if set)."""
        self.socket, self.tls = socket, tls

    @property
    def scheme(self) -> str:
        return "tcp" if self.tls is None else self.tls.scheme

    # -- dialling -------------------------------------------------------------------------------

    def set_addresses(self, wanted: set[str]) -> None:
        """Dial addresses we are not dialling yet; hang up on those no longer listed."""
        with self._lock:
            current = dict(self.dialers)
            for address in set(self.parked) - wanted:
                del self.parked[address]
            parked = set(self.parked)
        for address in wanted - current.keys() - parked:
            self.dial(address)
        for address in current.keys() - wanted:
            dialer = self.dialers.pop(address, None)
            if dialer is not None:
                with contextlib.suppress(Exception):
                    dialer.close()

    def dial(self, address: str) -> None:
        try:
            host, port = parse_address("PEERS", address)
            url = f"{self.scheme}://{format_address(host, port)}"
            self.dialers[address] = (
                self.socket.dial(url, block=False)
                if self.tls is None
                else self.tls.dial(self.socket, url, host)
            )
        except Exception as exc:
            self._log_once(f"dial:{address}", "mesh: cannot dial %s: %s", address, exc)

    def dialed_address(self, pipe: Any) -> str:
        """The address we dialled to open ``pipe`` ("" for a pipe a peer opened to us)."""
        try:
            dialer = pipe.dialer
        except Exception:
            return ""
        if dialer is None:
            return ""
        for address, candidate in list(self.dialers.items()):
            if candidate is dialer or getattr(candidate, "id", None) == getattr(dialer, "id", -1):
                return address
        return ""

    # -- pipes, as nng reports them (on its own threads) ----------------------------------------

    def connected(self, pipe_id: int, pipe: Any = None, at: float = 0.0) -> None:
        with self._lock:
            self.live_pipes.add(pipe_id)
            if pipe is not None:
                self.pipes[pipe_id] = pipe
                self.connected_at[pipe_id] = at

    def removed(self, pipe_id: int, at: float) -> bool:
        """A pipe went (at clock reading ``at``). True if it carried a parked link: that address
        must be dialled again."""
        with self._lock:
            self.live_pipes.discard(pipe_id)
            self.self_pipes.discard(pipe_id)
            self.pipes.pop(pipe_id, None)
            self.connected_at.pop(pipe_id, None)
            owner = self.pipe_owner.pop(pipe_id, None)
            self.pipe_dialed.pop(pipe_id, None)
            peer = self._peers.get(owner) if owner is not None else None
            if peer is None:
                return False
            peer.pipes.discard(pipe_id)
            if peer.pipes:
                return False
            peer.pipeless_since = at
            # The pipe that carried a parked link went: dial that peer ourselves again.
            unpark = {a for a, node_id in self.parked.items() if node_id == owner}
            self.unpark |= unpark
        return bool(unpark)

    # -- pipes, as frames show them ---------------------------------------------------------------

    def bind(self, pipe: Any, origin: bytes, own_id: bytes) -> None:
        with self._lock:
            self.bind_locked(pipe, origin, own_id)

    def bind_locked(self, pipe: Any, origin: bytes, own_id: bytes) -> bytes:
        """The node a pipe speaks for: the first authenticated origin seen on it."""
        pipe_id = pipe.id
        owner = self.pipe_owner.get(pipe_id)
        if owner is None:
            self.pipe_owner[pipe_id] = owner = origin
            peer = self._peers.get_or_add(origin)
            dialed_as = self.dialed_address(pipe)
            if dialed_as:
                peer.dialed_as = dialed_as
        # Counted among the peer's pipes once nng has reported it connected: its first frames
        # can arrive before that callback has run, and one already gone must not be counted.
        if owner == origin and pipe_id in self.live_pipes:
            peer = self._peers.get_or_add(origin)
            if pipe_id not in peer.pipes:
                peer.pipes.add(pipe_id)
                peer.pipeless_since = None
                dialed_as = self.dialed_address(pipe)
                if dialed_as:
                    self.pipe_dialed[pipe_id] = dialed_as
                self._park_duplicate_link(peer, own_id)
        return owner

    def _park_duplicate_link(self, peer: Peer, own_id: bytes) -> None:
        """Hang up our dialer to ``peer`` when its own pipe to us already joins the pair."""
        if own_id > peer.node_id:
            return  # the larger id keeps its dialer: exactly one side yields
        dialed = {self.pipe_dialed[p] for p in peer.pipes if p in self.pipe_dialed}
        if not dialed or len(dialed) == len(peer.pipes):
            return  # no pipe of its own to us (yet)
        for address in dialed:
            dialer = self.dialers.pop(address, None)
            if dialer is not None:
                self.parked[address] = peer.node_id
                self.closing.append(dialer)

    def close_parked_dialers(self) -> None:
        with self._lock:
            closing, self.closing = self.closing, []
        for dialer in closing:
            with contextlib.suppress(Exception):
                dialer.close()

    def dial_unparked(self) -> None:
        """Maintenance thread: dial again the addresses whose parked link went."""
        with self._lock:
            unpark, self.unpark = self.unpark, set()
            addresses = [a for a in unpark if self.parked.pop(a, None) is not None]
        for address in addresses:
            if address not in self.dialers:
                self.dial(address)

    def from_self(self, pipe: Any) -> str | None:
        """A frame of our own came back on ``pipe``: we dialled ourselves; stop doing so.

        Returns the address we dialled ourselves by (None if not found: already handled)."""
        self.self_pipes.add(pipe.id)
        with contextlib.suppress(Exception):
            dialer = pipe.dialer
            for address, candidate in list(self.dialers.items()):
                if candidate is dialer:
                    del self.dialers[address]
                    logger.info("mesh: %s is this process itself; not dialling it", address)
                    dialer.close()
                    return address
        return None
