"""Static discovery: ``WARPMESH['PEERS']`` and the file ``WARPMESH['PEERS_FILE']`` names.

The file is read again at every sync (every ``DISCOVERY_INTERVAL``, on the maintenance thread), so
a ConfigMap mounted as a file updates a running fleet; a host name, in either list, is resolved
again and again by a :class:`~.resolver.NameResolver`, and each of its addresses is a peer. A
peer no longer listed is hung up on, as one whose peer-table row went.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING

from django_warpmesh.node.addresses import AddressError, format_address, parse_address
from django_warpmesh.node.interfaces import Discovered, DiscoveryError
from django_warpmesh.node.resolver import Lookup, Name, NameResolver, Resolution

if TYPE_CHECKING:
    from django_warpmesh.node.core import MeshNode

logger = logging.getLogger("django_warpmesh")

# A peers file larger than this is refused (a wrong path, a log file): the last good list stays.
MAX_FILE_BYTES = 1 << 20
# Addresses taken from a peers file at most, as from the peer table.
MAX_FILE_ENTRIES = 1024


def parse_peers_file(text: str) -> tuple[list[Name], list[tuple[int, str]]]:
    """A peers file's addresses, in order and without repeats, and its bad lines as (line
    number, why). One ``host:port`` per line; ``#`` starts a comment."""
    names: dict[Name, None] = {}
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        content = line.partition("#")[0].strip()
        if not content:
            continue
        try:
            name = parse_address("PEERS_FILE", content)
            _check_dialable(name[0])
        except AddressError as exc:
            problems.append((number, _without_option(str(exc))))
            continue
        names[name] = None
    return list(names), problems


def _check_dialable(host: str) -> None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return
    if ip.is_unspecified or ip.is_multicast:
        raise AddressError(f"{host!r} is not an address a peer listens on")


def _without_option(message: str) -> str:
    return message.removeprefix("WARPMESH['PEERS_FILE']: ").removeprefix("WARPMESH['PEERS_FILE'] ")


def is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class PeersFile:
    """The peers file: its last good addresses, and the bad lines of its last read."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.names: list[Name] | None = None  # the last good read; None: never read
        self.problems: list[tuple[int, str]] = []  # (line number, why)
        self._text: str | None = None

    def read(self) -> list[Name]:
        """The file's addresses, read again; :class:`OSError` or :class:`ValueError` when it
        cannot be read (:attr:`names` stays the last good read)."""
        with open(self.path, "rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise ValueError(f"it is larger than {MAX_FILE_BYTES} bytes")
        text = data.decode("utf-8")  # UnicodeDecodeError is a ValueError
        if text != self._text or self.names is None:
            names, self.problems = parse_peers_file(text)
            if len(names) > MAX_FILE_ENTRIES:
                self.problems.append(
                    (0, f"{len(names)} addresses; only the first {MAX_FILE_ENTRIES} are used")
                )
            self._text, self.names = text, names[:MAX_FILE_ENTRIES]
        return self.names


class StaticRegistry:
    """Peers from ``PEERS`` and ``PEERS_FILE``; host names resolved on a thread of their own."""

    def __init__(
        self,
        peers: Iterable[str],
        peers_file: str | None = None,
        *,
        interval: float = 5.0,
        family: int = socket.AF_UNSPEC,
        getaddrinfo: Lookup = socket.getaddrinfo,
    ) -> None:
        """``peers``: ``host:port`` strings as ``PEERS`` holds them; ``interval``: how often
        host names are resolved again (``DISCOVERY_INTERVAL``); ``family``: which of their
        addresses are peers (:func:`~.resolver.listening_family`)."""
        self.listed = [parse_address("PEERS", address) for address in peers]
        self.file = PeersFile(peers_file) if peers_file else None
        self.resolver = NameResolver(interval, self._names_changed, getaddrinfo, family)
        self._node: MeshNode | None = None
        self._answered = False  # a full set was returned once
        self._announced: set[str] = set()
        self._warned: set[tuple[int, str]] = set()
        self.rejected = 0  # bad lines of the file (each once)
        parts = [f"PEERS ({len(self.listed)})"] if self.listed else []
        if self.file is not None:
            parts.append(f"PEERS_FILE {self.file.path}")
        self.description = "static " + ", ".join(parts or ["PEERS (0)"])

    def initial(self) -> Discovered | None:
        """The listed IP addresses, when that is all there is: no file to read, no name to
        resolve (both wait for the maintenance thread)."""
        if self.file is not None or not all(is_literal(host) for host, _ in self.listed):
            return None
        return {format_address(*name): "PEERS" for name in self.listed}

    def sync(self, node: MeshNode) -> Discovered | None:
        self._node = node
        entries, problems = self._entries()
        names = {name: source for name, source in entries.items() if not is_literal(name[0])}
        self.resolver.want(names)
        results = self.resolver.results()
        if not self._answered and any(name not in results for name in names):
            return None  # the first lookups are under way: they call sync_soon when done
        discovered, unresolved = self._discovered(entries, results)
        problems += unresolved
        self._announce(discovered, node)
        self._answered = True
        if problems:
            never_read = self.file is not None and self.file.names is None
            raise DiscoveryError(
                "; ".join(problems),
                addresses=None if never_read and not discovered else discovered,
            )
        return discovered

    def lookup_now(self, timeout: float) -> Discovered:
        """Every peer now, resolving on this thread (``manage.py mesh_status``'s observer)."""
        entries, problems = self._entries()
        results = self.resolver.resolve_now(name for name in entries if not is_literal(name[0]))
        discovered, unresolved = self._discovered(entries, results)
        if not discovered and problems + unresolved:
            raise DiscoveryError("; ".join(problems + unresolved))
        return discovered

    def leave(self, node: MeshNode) -> None:
        self.resolver.stop()

    def _entries(self) -> tuple[dict[Name, str], list[str]]:
        """Each listed address and where it is listed; why the file could not be read."""
        entries = dict.fromkeys(self.listed, "PEERS")
        problems = []
        if self.file is not None:
            try:
                names: Iterable[Name] = self.file.read()
            except (OSError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                kept = len(self.file.names or ())
                problems.append(
                    f"cannot read PEERS_FILE {self.file.path} ({reason}); keeping its last "
                    f"{kept} address(es)"
                )
                names = self.file.names or ()
            for name in names:
                entries.setdefault(name, "PEERS_FILE")
            self._warn_bad_lines(self.file)
        return entries, problems

    def _warn_bad_lines(self, file: PeersFile) -> None:
        for number, why in file.problems:
            if (number, why) not in self._warned:
                self._warned.add((number, why))
                self.rejected += 1
                where = f"line {number}" if number else "it has"
                logger.warning("mesh: PEERS_FILE %s %s: %s; skipped", file.path, where, why)

    def _discovered(
        self, entries: dict[Name, str], results: dict[Name, Resolution]
    ) -> tuple[dict[str, str], list[str]]:
        """Each peer's address and where it was found; the names that failed to resolve."""
        discovered: dict[str, str] = {}
        problems = []
        for name, source in entries.items():
            if is_literal(name[0]):
                discovered.setdefault(format_address(*name), source)
                continue
            result = results.get(name)
            if result is None:
                continue  # a name just added: its first lookup is under way
            for address in result.addresses or ():
                discovered.setdefault(address, f"dns:{name[0]}")
            if result.error is not None:
                problems.append(
                    f"cannot resolve {format_address(*name)} ({result.error}); keeping its "
                    f"last {len(result.addresses or ())} address(es)"
                )
        return discovered, problems

    def _announce(self, discovered: dict[str, str], node: MeshNode) -> None:
        current = {a for a, source in discovered.items() if source != "PEERS"}
        added, removed = current - self._announced, self._announced - current
        self._announced = current
        if node.observer:
            return
        if added:
            logger.info(
                "mesh: discovered %d new peer(s) via %s: %s",
                len(added),
                _sources(discovered, added),
                ", ".join(sorted(added)),
            )
        if removed:
            logger.info(
                "mesh: %d peer(s) no longer listed, hanging up: %s",
                len(removed),
                ", ".join(sorted(removed)),
            )

    def _names_changed(self) -> None:
        node = self._node
        if node is not None:
            node.sync_soon()


def _sources(discovered: dict[str, str], addresses: set[str]) -> str:
    return ", ".join(sorted({discovered[address] for address in addresses}))
