"""Peer discovery by multicast DNS on the LAN: ``WARPMESH['DISCOVERY'] = "mdns"``.

Each node registers a ``_warpmesh._tcp.local.`` service named by its node id, whose TXT record
carries its advertised address, cache locations, protocol version and a fingerprint of the
secret (:mod:`.mdns_records`), and browses for the others'. Only services whose fingerprint and
protocol version match ours are dialled.

Everything of ours runs on the node's maintenance thread (``sync``, ``leave``) or on
python-zeroconf's threads: its event loop (sockets, the cache, our refresh timer) and the
browser's thread, whose handler only records the change and asks for a sync. ``initial()``
does nothing, so nothing here ever runs on a request's thread. zeroconf is an optional extra,
imported on the maintenance thread (at the first sync).

How records live and die in python-zeroconf (0.154): a receiver raises a PTR record's TTL to
at least 1125 s, and neither side ever refreshes SRV and TXT records (the browser refreshes
PTRs only, and fires nothing when an SRV record expires). So a peer is alive while its SRV and
TXT records are in our cache: they carry a TTL of ``STALE_AFTER`` and each node announces its
own again every third of that. A peer that stops says goodbye (its records again, with a TTL
of 0), which removes them at once; one killed drops out a TTL after its last announcement.
tests/test_mdns_mesh.py runs on all of this.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from django_warpmesh import protocol
from django_warpmesh.node import mdns_records as records
from django_warpmesh.node.interfaces import Discovered, DiscoveryError

if TYPE_CHECKING:
    from zeroconf import ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

    from django_warpmesh.node.config import MeshSettings
    from django_warpmesh.node.core import MeshNode

logger = logging.getLogger("django_warpmesh")

SOURCE = "mdns"
# How long a starting node listens before it says who is there (peers answer a query within
# about 120 ms, 500 ms when they aggregate): without it, it would be ready before hearing any.
# Within the start-up wait, less what it takes to get the answer to the node (a wakeup of the
# maintenance thread): past it, the node caches whether it has heard anyone or not.
BROWSE_WINDOW = 1.0
BROWSE_MARGIN = 0.1
# How long a service whose records are not in the cache (expired, or never received) is asked
# for: peers answer a query for SRV and TXT records at once.
REQUEST_TIMEOUT = 0.5
# Peers dialled at most, and services tracked at most: anyone on the LAN can announce.
MAX_MDNS_PEERS = 1024
MAX_SERVICES = 4 * MAX_MDNS_PEERS


def require_zeroconf() -> None:
    """Raise :class:`DiscoveryError` if zeroconf is not installed, without importing it: that
    takes tens of milliseconds, and a registry is made where the node starts, which may be a
    request's thread. The maintenance thread imports it."""
    try:
        found = importlib.util.find_spec("zeroconf") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise DiscoveryError(
            "mDNS discovery needs python-zeroconf, which is not installed: "
            "pip install 'django-warpmesh[mdns]'"
        )


def open_zeroconf(names: tuple[str, ...]) -> Zeroconf:
    """A Zeroconf instance (its sockets, its own event loop thread) on ``MDNS_INTERFACES``.

    Raises :class:`DiscoveryError` saying why it cannot be had here.
    """
    from zeroconf import InterfaceChoice, Zeroconf

    chosen = records.interfaces(names, host_interfaces()) if names else None
    try:
        # Its own loop thread, even if the caller's thread runs an event loop.
        return Zeroconf(InterfaceChoice.All if chosen is None else chosen, use_asyncio=False)
    except (OSError, RuntimeError) as exc:
        where = ", ".join(names) or "every interface"
        raise DiscoveryError(f"mDNS cannot listen on UDP port 5353 ({where}): {exc}") from exc


def host_interfaces() -> dict[str, list[str]]:
    """Each network interface of this host and its addresses (ifaddr comes with zeroconf)."""
    import ifaddr

    return {
        adapter.nice_name: [ip.ip if isinstance(ip.ip, str) else ip.ip[0] for ip in adapter.ips]
        for adapter in ifaddr.get_adapters()
    }


class ServiceWatch:
    """The services a browser has reported: its handler records them on the browser's thread,
    the maintenance thread reads them."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._lock = threading.Lock()
        self._names: set[str] = set()  # seen, and not seen leave
        self._goodbyes: set[str] = set()  # seen leave since the last take_goodbyes()
        self._requested: set[str] = set()  # asked for once since their records went
        self.browser: ServiceBrowser | None = None

    def start(self, zc: Zeroconf) -> None:
        from zeroconf import DNSQuestionType, ServiceBrowser

        # Multicast questions only: the processes of a host share port 5353, and a unicast
        # answer would reach only one of them.
        self.browser = ServiceBrowser(
            zc, records.SERVICE_TYPE, handlers=[self.changed], question_type=DNSQuestionType.QM
        )

    def stop(self) -> None:
        if self.browser is not None:
            self.browser.cancel()

    def changed(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        """The browser's handler: record, and ask for a sync (never any I/O here)."""
        try:
            with self._lock:
                if state_change.name == "Removed":
                    self._names.discard(name)
                    self._requested.discard(name)
                    self._goodbyes.add(name)
                elif len(self._names) < MAX_SERVICES:
                    self._names.add(name)
                    self._goodbyes.discard(name)
                    self._requested.discard(name)
            self._wake()
        except Exception:  # noqa: S110 (raising would end the browser's thread)
            pass

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._names)

    def take_goodbyes(self) -> set[str]:
        with self._lock:
            goodbyes, self._goodbyes = self._goodbyes, set()
        return goodbyes

    def to_request(self, names: list[str]) -> list[str]:
        """Those of ``names`` not asked for yet since their records went; now they have been."""
        with self._lock:
            fresh = [name for name in names if name not in self._requested]
            self._requested.update(fresh)
        return fresh

    def answered(self, name: str) -> None:
        with self._lock:
            self._requested.discard(name)


def cached_service(zc: Zeroconf, name: str) -> ServiceInfo | None:
    """``name``'s SRV and TXT records from zeroconf's cache (threadsafe), or None if either is
    missing or expired."""
    from zeroconf import ServiceInfo

    info = ServiceInfo(records.SERVICE_TYPE, name)
    info.load_from_cache(zc)
    return info if info.port is not None and info.text else None


def request_services(zc: Zeroconf, names: list[str]) -> None:
    """Ask for the SRV and TXT records of ``names`` (all at once, multicast questions) and wait
    at most ``REQUEST_TIMEOUT`` for them to reach the cache."""
    from zeroconf import DNSQuestionType, ServiceInfo

    if not names or zc.loop is None:
        return

    async def request_all() -> None:
        requests = [
            ServiceInfo(records.SERVICE_TYPE, name).async_request(
                zc, REQUEST_TIMEOUT * 1000, DNSQuestionType.QM
            )
            for name in names
        ]
        await asyncio.gather(*requests, return_exceptions=True)

    future = asyncio.run_coroutine_threadsafe(request_all(), zc.loop)
    try:
        future.result(timeout=REQUEST_TIMEOUT + 1.0)
    except Exception:
        # Timed out, or zeroconf closing: a service that did not answer counts as gone.
        future.cancel()


class MdnsRegistry:
    """A :class:`~django_warpmesh.node.interfaces.PeerRegistry` over mDNS (DNS-SD)."""

    description = f"mDNS discovery ({records.SERVICE_TYPE})"

    def __init__(self, config: MeshSettings, key: bytes) -> None:
        require_zeroconf()
        self.config = config
        self.fingerprint = records.fingerprint(key)
        self.ttl = records.record_ttl(config.stale_after)
        self.syncs = 0
        # Services not dialled, each counted (and logged) once: another mesh's (a different
        # secret) or another protocol version's; and TXT records no node writes.
        self.ignored = 0
        self.malformed = 0
        # The peers of the last sync, by address: what their announcements said.
        self.announcements: dict[str, records.Announcement] = {}
        self._zc: Zeroconf | None = None
        self._watch: ServiceWatch | None = None
        self._info: ServiceInfo | None = None
        self._locations: tuple[str, ...] = ()
        self._refresh: asyncio.TimerHandle | None = None
        self._reported: set[tuple[str, str]] = set()
        self._browsing_until = 0.0

    @property
    def rejected(self) -> int:
        return self.ignored + self.malformed

    # -- the PeerRegistry protocol ---------------------------------------------------------

    def initial(self) -> Discovered | None:
        return None

    def sync(self, node: MeshNode) -> Discovered | None:
        """Start on the first call; None until the browse window has passed, then the peers
        whose announcements match ours."""
        if self._zc is None:
            self._start(node)
        if time.monotonic() < self._browsing_until:
            return None
        assert self._zc is not None
        assert self._watch is not None
        self.syncs += 1
        if node.address:
            self._announce_locations(node)
        peers = self._peers(self._zc, self._watch, node.hex_id, node.address)
        if not node.observer:
            self._log_changes(peers, self._watch.take_goodbyes())
        self.announcements = peers
        return dict.fromkeys(peers, SOURCE)

    def leave(self, node: MeshNode) -> None:
        """Goodbye packets for our service (peers drop us at once), then zeroconf closes."""
        zc, self._zc = self._zc, None
        if zc is None:
            return
        # No refresh after the goodbyes: peers would take us back for a TTL.
        self._info = None
        try:
            if self._refresh is not None and zc.loop is not None:
                zc.loop.call_soon_threadsafe(self._refresh.cancel)
            if self._watch is not None:
                self._watch.stop()
        finally:
            zc.close()  # unregisters what we registered: the goodbyes

    def lookup_now(self, timeout: float) -> Discovered:
        """Browse for ``timeout`` seconds without registering; the matching peers that answered
        (``mesh_status``'s observer). Raises :class:`DiscoveryError`."""
        zc = open_zeroconf(self.config.mdns_interfaces)
        try:
            watch = ServiceWatch(_nothing)
            watch.start(zc)
            time.sleep(timeout)
            watch.stop()
            return dict.fromkeys(self._peers(zc, watch, "", ""), SOURCE)
        finally:
            zc.close()

    # -- our service ------------------------------------------------------------------------

    def _start(self, node: MeshNode) -> None:
        zc = open_zeroconf(self.config.mdns_interfaces)
        watch = ServiceWatch(node.sync_soon)
        try:
            if node.address:  # not an observer, nor a node that could not listen
                self._register(zc, node)
            watch.start(zc)
        except BaseException:
            zc.close()
            raise
        self._zc, self._watch = zc, watch
        waited = time.time() - node.started_at
        left = self.config.effective_startup_wait - waited - BROWSE_MARGIN
        window = max(0.0, min(BROWSE_WINDOW, left))
        self._browsing_until = time.monotonic() + window
        assert zc.loop is not None
        zc.loop.call_soon_threadsafe(zc.loop.call_later, window, node.sync_soon)

    def _service(self, node: MeshNode) -> ServiceInfo:
        from zeroconf import ServiceInfo

        self._locations = tuple(sorted(node.store_locations()))
        announcement = records.Announcement(
            node.hex_id, node.address, protocol.VERSION, self.fingerprint, self._locations
        )
        return ServiceInfo(
            records.SERVICE_TYPE,
            records.instance_name(node.hex_id),
            port=int(node.address.rpartition(":")[2]),
            properties=records.properties(announcement),
            server=f"{node.hex_id}.local.",
            addresses=records.address_bytes(node.address),
            host_ttl=self.ttl,
            other_ttl=self.ttl,
        )

    def _register(self, zc: Zeroconf, node: MeshNode) -> None:
        from zeroconf import Error

        info = self._service(node)
        assert zc.loop is not None
        # No probing for a conflicting name: ours is our random node id.
        registering = zc.async_register_service(info, cooperating_responders=True)
        try:
            asyncio.run_coroutine_threadsafe(registering, zc.loop).result(timeout=10)
        except (Error, RuntimeError, concurrent.futures.TimeoutError) as exc:
            raise DiscoveryError(f"cannot register the mDNS service: {exc!r}") from exc
        self._info = info
        zc.loop.call_soon_threadsafe(self._schedule_refresh, zc)

    def _schedule_refresh(self, zc: Zeroconf) -> None:
        """On zeroconf's loop: our records again a third of a TTL from now, and so on."""
        assert zc.loop is not None
        if not zc.done:
            interval = records.refresh_interval(self.ttl)
            self._refresh = zc.loop.call_later(interval, self._announce, zc)

    def _announce(self, zc: Zeroconf) -> None:
        if self._info is not None and not zc.done:
            zc.async_send(zc.generate_service_broadcast(self._info, None))
        self._schedule_refresh(zc)

    def _announce_locations(self, node: MeshNode) -> None:
        """A store registered since we announced (another cache alias used): announced now."""
        zc = self._zc
        if zc is None or zc.loop is None or self._info is None:
            return
        if tuple(sorted(node.store_locations())) == self._locations:
            return
        self._info = self._service(node)
        asyncio.run_coroutine_threadsafe(zc.async_update_service(self._info), zc.loop)

    # -- the others -------------------------------------------------------------------------

    def _peers(
        self, zc: Zeroconf, watch: ServiceWatch, own_id: str, own_address: str
    ) -> dict[str, records.Announcement]:
        """The announcements in zeroconf's cache that we dial, by address."""
        names = watch.names()
        request_services(zc, watch.to_request([n for n in names if not cached_service(zc, n)]))
        found: dict[str, records.Announcement] = {}
        for name in names:
            info = cached_service(zc, name)
            if info is None:
                continue  # its records expired: killed, or cut off from us
            watch.answered(name)
            announcement = self._accepted(name, info.properties)
            if announcement is None or announcement.node_id == own_id:
                continue
            if announcement.address == own_address:
                continue
            if len(found) >= MAX_MDNS_PEERS:
                message = "mesh: more than %d mDNS peers; ignoring the others"
                self._report("", "too-many", logging.WARNING, message, MAX_MDNS_PEERS)
                break
            found[announcement.address] = announcement
        return found

    def _accepted(self, name: str, items: dict[bytes, bytes | None]) -> records.Announcement | None:
        try:
            announcement = records.parse(name, items)
        except records.Malformed as exc:
            message = "mesh: ignoring the mDNS service %s: malformed TXT record (%s)"
            what = f"malformed:{sorted(items.items())}"
            self.malformed += self._report(name, what, logging.WARNING, message, name, exc)
            return None
        node_id, address = announcement.node_id, announcement.address
        if announcement.fingerprint != self.fingerprint:
            message = (
                "mesh: not dialling the mDNS peer %s at %s: another mesh (a different "
                "WARPMESH['SECRET'])"
            )
            self.ignored += self._report(name, "secret", logging.INFO, message, node_id, address)
            return None
        if announcement.protocol != protocol.VERSION:
            message = "mesh: not dialling the mDNS peer %s at %s: it speaks protocol %d, we %d"
            self.ignored += self._report(
                name,
                f"protocol:{announcement.protocol}",
                logging.WARNING,
                message,
                node_id,
                address,
                announcement.protocol,
                protocol.VERSION,
            )
            return None
        return announcement

    def _report(self, name: str, what: str, level: int, message: str, *args: object) -> bool:
        """Log ``message`` once per service and ``what``; whether this was the first time."""
        key = (name, what)
        if key in self._reported:
            return False
        if len(self._reported) >= MAX_SERVICES:
            self._reported.clear()  # a LAN announcing without end: log again rather than grow
        self._reported.add(key)
        logger.log(level, message, *args)
        return True

    def _log_changes(self, peers: dict[str, records.Announcement], goodbyes: set[str]) -> None:
        for address in sorted(set(peers) - set(self.announcements)):
            logger.info("mesh: discovered peer %s at %s via mDNS", peers[address].node_id, address)
        for address in sorted(set(self.announcements) - set(peers)):
            gone = self.announcements[address]
            why = (
                "it said goodbye"
                if records.instance_name(gone.node_id) in goodbyes
                else f"its mDNS records expired ({self.ttl} s without an announcement)"
            )
            logger.info("mesh: mDNS peer %s at %s is gone: %s", gone.node_id, address, why)


def _nothing() -> None:
    pass
