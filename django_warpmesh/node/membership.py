"""Who the node expects, whether it may cache yet (ready), whether it must cap (degraded).

The maintenance thread runs peer discovery (the peer table or a static list) and dials a peer
again when the pipe that peer opened to us goes; it may block on the database, which is why it
is alone. A broker transport's connected/lost events land here too.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from django_warpmesh.node.interfaces import DiscoveryError, NodePart
from django_warpmesh.node.waiting import Wakeup

if TYPE_CHECKING:
    from django_warpmesh.node.core import MeshNode

logger = logging.getLogger("django_warpmesh")

# Failed discovery syncs in a row after which the node counts as degraded (entries capped): a
# peer that joined meanwhile cannot be found, and one failure may be a blip.
DISCOVERY_FAILURES_DEGRADED = 2
# Longest wait between two discovery attempts while they fail (they back off from the interval).
DISCOVERY_MAX_BACKOFF = 60.0


class Membership(NodePart):
    def __init__(self, node: MeshNode) -> None:
        super().__init__(node)
        self._maintain = Wakeup()
        self._expected: set[str] | None = None  # addresses we know of; None: not known yet
        # Where each address came from, as the registry said (see interfaces.Discovered).
        self.sources: dict[str, str] = {}
        # Addresses found to lead to this node itself (a name of a Service it is behind, a host
        # name for its own IP): never dialled, never expected.
        self._own: set[str] = set()
        self._ready_deadline = 0.0
        # Why the last discovery sync failed (None: it worked), and how many failed in a row.
        self.discovery_error: str | None = None
        self.discovery_failures = 0
        self._sync_now = False
        self._broker_lost = False  # the broker link went and has not come back yet

    def set_peer_addresses(self, addresses: Iterable[str]) -> None:
        """Dial addresses we are not dialling yet; hang up on those no longer listed.

        ``addresses`` may be a mapping of each address to where it came from.
        """
        with self.lock:
            wanted = {
                address
                for address in addresses
                if address != self._node.address and address not in self._own
            }
            first = self._expected is None
            self._expected = wanted
            if isinstance(addresses, Mapping):
                self.sources = {address: str(addresses[address]) for address in wanted}
        if self._node.broker is None:
            self._node.links.set_addresses(wanted)
        if first:
            # The start-up window now lasts until those peers answer or the wait runs out.
            self._ready_deadline = self.clock() + self.config.effective_startup_wait
        self._check_ready()

    def found_self(self, address: str) -> None:
        """A dialled address turned out to be this node: not a peer to wait for."""
        with self.lock:
            self._own.add(address)
            if self._expected is not None:
                self._expected.discard(address)
            self.sources.pop(address, None)
        self._update_degraded()
        self._check_ready()

    def _check_ready(self) -> None:
        if self._node.ready:
            return
        with self.lock:
            expected = self._expected
            heard = self.table.alive_addresses()
        timed_out = self.clock() >= self._ready_deadline
        if self._node.broker is not None and not self._node.broker.connected:
            # Subscribed, every frame published from then on reaches us: until then, nothing.
            if timed_out:
                self._become_ready(f"the {self._node.broker.name} server is not reachable yet")
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
        self._node.ready = True
        self._node.sender._wake.set()  # the invalidations held back until now go out
        self._node._state_changed()
        if why:
            logger.info("mesh: caching enabled after the start-up wait (%s)", why)

    def _update_degraded(self) -> None:
        """Cap new entries' lifetime while a peer we know of cannot be reached, or while
        discovery fails (a peer we do not know of may exist): see docs/consistency.md."""
        with self.lock:
            expected = self._expected or set()
            # A peer that said goodbye is not missed while discovery catches up with its
            # departure (its row deleted, its DNS record or mDNS announcement gone).
            reachable = self.table.alive_addresses() | self.table.departed_addresses(
                self.clock() - self.config.stale_after
            )
        self._node.degraded = (
            bool(expected - reachable)
            or self.discovery_failures >= DISCOVERY_FAILURES_DEGRADED
            or (self._node.broker is not None and not self._node.broker.connected)
        )
        self._node.max_timeout = self.config.degraded_timeout if self._node.degraded else None
        self._node._state_changed()

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
            with self._node.receiver._drain_lock:
                self._node.receiver._flush_all()
        self._update_degraded()
        self._node.sender._heartbeat_now.set()
        self._node.sender._wake.set()
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
        with self._node.receiver._drain_lock:
            self._node.receiver._flush_all()

    @property
    def _broker_name(self) -> str:
        return self._node.broker.name if self._node.broker is not None else "nng"

    def run(self) -> None:
        next_sync = 0.0
        while not self._node.stopping.is_set():
            if self._sync_now:
                self._sync_now = False
                next_sync = 0.0
            with self.log.surviving("in the maintenance thread"):
                if self.clock() >= next_sync:
                    next_sync = self.clock() + self._sync()
                self._node.links.dial_unparked()
            self._maintain.wait(max(0.0, next_sync - self.clock()))
        with contextlib.suppress(Exception):
            self._node.registry.leave(self._node)

    def sync_soon(self) -> None:
        """Run discovery now, not at the next interval (the peer table was just created)."""
        self._sync_now = True
        self._maintain.set()

    def _sync(self) -> float:
        """One discovery sync; returns the seconds until the next (backing off while failing)."""
        interval = self.config.discovery_interval
        try:
            addresses = self._node.registry.sync(self._node)
        except DiscoveryError as exc:
            if exc.addresses is not None:
                self.set_peer_addresses(exc.addresses)
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
        if self.discovery_failures == DISCOVERY_FAILURES_DEGRADED and not self._node.observer:
            logger.warning(
                "mesh: peer discovery failed %d times in a row (%s): capping new entries at "
                "DEGRADED_TIMEOUT until it works again",
                self.discovery_failures,
                reason,
            )
        with self.lock:
            unknown = self._expected is None
        if alone and unknown:
            # Nobody can have registered yet: no start-up window to wait out.
            self.set_peer_addresses([])
        self._update_degraded()
        backoff = self.config.discovery_interval * 2.0 ** (self.discovery_failures - 1)
        return min(backoff, DISCOVERY_MAX_BACKOFF)
