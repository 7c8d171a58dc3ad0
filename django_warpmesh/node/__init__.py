"""The mesh node: one per process, keeping its caches coherent with its peers' over nng.

Knows nothing of Django: the cache layer gives it its settings (:class:`MeshSettings`), its
stores and its peer registry, and builds it (:func:`set_node_factory`).

* :mod:`.config`: the settings a node is built from, ``host:port`` addresses.
* :mod:`.peers`: what is known of each peer (sequence numbers, liveness); pure.
* :mod:`.links`: dialers, pipes, and the duplicate link of a pair hung up.
* :mod:`.ops`: the queued invalidations coalesced into the ops a frame carries; pure.
* :mod:`.core`: :class:`MeshNode`, its frame pipeline (deliver, drain) and threads.
* :mod:`.stats`: counters, snapshots, rate-limited logs.
* :mod:`.process`: this process's node (start, fork, exit).
* :mod:`.relay`: a forked child's mesh, relayed through its parent's node.
* :mod:`.tls`: the mutual-TLS transport.

State that :mod:`.process` rebinds at runtime (the current node, ``drain_before_read``) is not
re-exported here: read it through that module.
"""

from __future__ import annotations

from django_warpmesh.node.config import (
    DEFAULT_PORT,
    AddressError,
    MeshSettings,
    TLSSettings,
    format_address,
    parse_address,
)
from django_warpmesh.node.core import (
    DELIVER_ROUNDS,
    FRAME_BODY_BUDGET,
    RECV_BATCH,
    TICK_FAST_MS,
    TICK_IDLE_MS,
    MeshNode,
    Wakeup,
)
from django_warpmesh.node.interfaces import Discovered, DiscoveryError, PeerRegistry, Store
from django_warpmesh.node.ops import SINGLE_OP_MAX_ITEMS, coalesce
from django_warpmesh.node.peers import (
    GAP_GRACE,
    LIVENESS_HEARTBEATS,
    MAX_MISSING,
    MAX_PEERS,
    Peer,
    PeerTable,
)
from django_warpmesh.node.process import (
    FALLBACK_TIMEOUT,
    AnyNode,
    NullNode,
    current_node,
    get_node,
    on_fork_in_child,
    set_node_factory,
    stop_node,
)
from django_warpmesh.node.relay import RelayedNode
from django_warpmesh.node.stats import LOG_EVERY, Counters

__all__ = [
    "DEFAULT_PORT",
    "DELIVER_ROUNDS",
    "FALLBACK_TIMEOUT",
    "FRAME_BODY_BUDGET",
    "GAP_GRACE",
    "LIVENESS_HEARTBEATS",
    "LOG_EVERY",
    "MAX_MISSING",
    "MAX_PEERS",
    "RECV_BATCH",
    "SINGLE_OP_MAX_ITEMS",
    "TICK_FAST_MS",
    "TICK_IDLE_MS",
    "AddressError",
    "AnyNode",
    "Counters",
    "Discovered",
    "DiscoveryError",
    "MeshNode",
    "MeshSettings",
    "NullNode",
    "Peer",
    "PeerRegistry",
    "PeerTable",
    "RelayedNode",
    "Store",
    "TLSSettings",
    "Wakeup",
    "coalesce",
    "current_node",
    "format_address",
    "get_node",
    "on_fork_in_child",
    "parse_address",
    "set_node_factory",
    "stop_node",
]
