"""Host names of peers, resolved again and again on a thread of their own.

A name in ``PEERS`` (or a peers file) is looked up every ``DISCOVERY_INTERVAL``, and every A and
AAAA record it has is a peer: a Kubernetes headless Service resolves to all its pods. A lookup
can take as long as the system's resolver lets it (seconds, when a DNS server does not answer),
so it never runs on a request's thread nor on the maintenance thread: the registry asks for
names and reads the last results, and a change wakes the node's discovery at once.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

from django_warpmesh.node.addresses import format_address

logger = logging.getLogger("django_warpmesh")

# Addresses kept per name: a record set larger than any mesh could be is cut, not dialled.
MAX_ADDRESSES_PER_NAME = 1024

Name = tuple[str, int]  # (host, port)
_RECORDS = {int(socket.AF_INET): "A", int(socket.AF_INET6): "AAAA"}
Lookup = Callable[..., list[tuple[Any, ...]]]  # socket.getaddrinfo's signature


@dataclasses.dataclass(frozen=True)
class Resolution:
    """What is known of one name: its last good addresses (None: never resolved), and why its
    last lookup failed (None: it worked)."""

    addresses: tuple[str, ...] | None = None
    error: str | None = None


class NameNotResolved(Exception):
    """A name has no address we can dial (the resolver's own error, or no A/AAAA record)."""


def lookup(
    name: Name, getaddrinfo: Lookup = socket.getaddrinfo, family: int = socket.AF_UNSPEC
) -> tuple[str, ...]:
    """Every address of ``name`` (of ``family``: A records, AAAA records, or both) as
    ``host:port``, sorted; blocks on the resolver.

    IPv6 link-local addresses are left out: they need an interface to be dialled by.
    Raises :class:`NameNotResolved`.
    """
    host, port = name
    try:
        infos = getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise NameNotResolved(_reason(exc)) from None
    addresses = set()
    for found, _, _, _, sockaddr in infos:
        if found == socket.AF_INET6 and sockaddr[3]:
            continue
        if found in (socket.AF_INET, socket.AF_INET6):
            addresses.add(format_address(str(sockaddr[0]), port))
    if not addresses:
        raise NameNotResolved(f"no {_RECORDS.get(family, 'A or AAAA')} record")
    return tuple(sorted(addresses)[:MAX_ADDRESSES_PER_NAME])


def listening_family(bind: str) -> int:
    """The addresses of a name worth dialling for a fleet whose nodes listen on ``bind``: A
    records for IPv4 (the default ``0.0.0.0`` listens on IPv4 only), AAAA for IPv6; both for a
    host name. A dual-stack Service has both for each pod: dialling both would wait for a
    listener that is not there, or join each pair twice."""
    try:
        version = ipaddress.ip_address(bind).version
    except ValueError:
        return socket.AF_UNSPEC
    return socket.AF_INET if version == 4 else socket.AF_INET6


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class NameResolver:
    """Resolves the names it is given every ``interval`` seconds, on a daemon thread; only
    their addresses of ``family`` (see :func:`listening_family`).

    ``on_change`` runs on that thread when a name's addresses or its failure changed.
    """

    def __init__(
        self,
        interval: float,
        on_change: Callable[[], None],
        getaddrinfo: Lookup = socket.getaddrinfo,
        family: int = socket.AF_UNSPEC,
    ) -> None:
        self.interval = interval
        self.family = family
        self._on_change = on_change
        self._getaddrinfo = getaddrinfo
        self._lock = threading.Lock()
        self._names: set[Name] = set()
        self._results: dict[Name, Resolution] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.lookups = 0  # lookups done (for tests and stats)

    def want(self, names: Iterable[Name]) -> None:
        """Resolve these names from now on (a new one at once); forget the others."""
        names = set(names)
        with self._lock:
            new = names - self._names
            self._names = names
            for gone in set(self._results) - names:
                del self._results[gone]
            start = self._thread is None and bool(names)
            if start:
                self._thread = threading.Thread(
                    target=self._run, name="warpmesh-resolver", daemon=True
                )
        if start:
            assert self._thread is not None
            self._thread.start()
        if new:
            self._wake.set()

    def results(self) -> dict[Name, Resolution]:
        with self._lock:
            return dict(self._results)

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def resolve_now(self, names: Iterable[Name]) -> dict[Name, Resolution]:
        """Resolve ``names`` once on the caller's thread (``manage.py mesh_status``)."""
        return {name: self._resolve(name, Resolution()) for name in names}

    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                names = sorted(self._names)
            changed = False
            for name in names:
                if self._stopping.is_set():
                    return
                with self._lock:
                    before = self._results.get(name, Resolution())
                after = self._resolve(name, before)
                with self._lock:
                    if name not in self._names:
                        continue
                    self._results[name] = after
                if after != before:
                    changed = True
                    _log_change(name, before, after)
            if changed:
                try:
                    self._on_change()
                except Exception:
                    logger.exception("mesh: error handing a DNS change to discovery")
            self._wake.wait(self.interval)
            self._wake.clear()

    def _resolve(self, name: Name, before: Resolution) -> Resolution:
        self.lookups += 1
        try:
            return Resolution(lookup(name, self._getaddrinfo, self.family))
        except NameNotResolved as exc:
            # The last good set stays: one failed lookup must not drop every peer of a name.
            return Resolution(before.addresses, str(exc))
        except Exception as exc:  # a resolver bug must not end the thread
            return Resolution(before.addresses, f"{type(exc).__name__}: {exc}")


def _log_change(name: Name, before: Resolution, after: Resolution) -> None:
    shown = format_address(*name)
    if after.error is not None:
        if before.error is None:
            kept = len(after.addresses) if after.addresses is not None else 0
            logger.warning(
                "mesh: cannot resolve peer name %s (%s); keeping its last %d address(es)",
                shown,
                after.error,
                kept,
            )
        return
    old = set(before.addresses or ())
    new = set(after.addresses or ())
    if before.error is not None and before.addresses is not None and old == new:
        logger.info("mesh: peer name %s resolves again", shown)
        return
    added, removed = sorted(new - old), sorted(old - new)
    parts = []
    if added:
        parts.append("added " + ", ".join(added))
    if removed:
        parts.append("removed " + ", ".join(removed))
    if parts:
        logger.info(
            "mesh: peer name %s resolves to %d address(es) (%s)", shown, len(new), "; ".join(parts)
        )
