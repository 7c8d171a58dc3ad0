"""What the layer above gives a node: the stores it applies invalidations to, and the registry
it finds its peers with (whose failures it reports as :class:`DiscoveryError`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from django_warpmesh.protocol import Op

if TYPE_CHECKING:
    from django_warpmesh.node.core import MeshNode


class DiscoveryError(Exception):
    """A registry could not sync; the message says why, for logs, stats and ``mesh_status``.

    ``alone``: the failure itself shows that no peer can have registered (the peer table does
    not exist yet), so a starting node has nobody to wait for. ``quiet``: expected here (a
    migration command), not worth a warning. ``addresses``: what could still be found (the
    other lines of a peers file, the last good set of a name whose lookup failed), used while
    the failure is counted; None: keep the current peers.
    """

    def __init__(
        self,
        reason: str,
        *,
        alone: bool = False,
        quiet: bool = False,
        addresses: Discovered | None = None,
    ) -> None:
        super().__init__(reason)
        self.alone = alone
        self.quiet = quiet
        self.addresses = addresses


# Peers as a registry finds them: each address, and where it came from ("database", "PEERS",
# "PEERS_FILE", "dns:<name>", "mdns"), which mesh_status and the dashboard show.
Discovered = Mapping[str, str]


class Store(Protocol):
    """A cache's storage as the node sees it. Implemented by :mod:`django_warpmesh.store`."""

    def apply(self, ops: Sequence[Op]) -> None: ...

    def flush(self) -> None: ...


class PeerRegistry(Protocol):
    """Where peer addresses come from: the peer table, a static list or file, mDNS."""

    description: str

    @property
    def rejected(self) -> int:
        """Entries found but not used, each counted once: peer rows with a bad address, bad
        lines of a peers file, announcements of another mesh or malformed ones
        (``discovery_rejected`` in the stats)."""

    def initial(self) -> Discovered | None:
        """Addresses known without waiting or any I/O (a list of IPs), or None.

        Called where the node starts, which may be a request's thread.
        """

    def sync(self, node: MeshNode) -> Discovered | None:
        """Announce ourselves and return the addresses to connect to (None: not known yet, or
        keep the current). Runs on the node's maintenance thread only.

        Raises :class:`DiscoveryError` when it cannot; the node backs off and retries.
        """

    def leave(self, node: MeshNode) -> None: ...


class NodePart:
    """A part of a node (sending, receiving, membership, ...): the node, and what every part
    reads of it, under short names."""

    def __init__(self, node: MeshNode) -> None:
        self._node = node
        self.config, self.counters, self.clock = node.config, node.counters, node.clock
        self.log, self.lock, self.table = node.log, node.lock, node.table
