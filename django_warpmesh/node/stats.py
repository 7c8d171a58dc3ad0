"""What a node counts and reports (``mesh_stats()``, stats replies), and how it logs repeats."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from django_warpmesh.node.peers import Peer

logger = logging.getLogger("django_warpmesh")

# Repeated events (rejected frames, gaps): at most one log line per kind per this many seconds.
LOG_EVERY = 60.0


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
    pipes_dropped: int = 0  # connections hung up on: junk, or nothing verifiable in time
    transport_losses: int = 0  # a broker transport's link lost (each a flush)
    rejected_by_reason: dict[str, int] = dataclasses.field(default_factory=lambda: defaultdict(int))


COUNTER_NAMES = tuple(
    field.name for field in dataclasses.fields(Counters) if field.name != "rejected_by_reason"
)


def counter_values(counters: Counters) -> dict[str, Any]:
    """The counters as a snapshot reports them."""
    return {
        **{name: getattr(counters, name) for name in COUNTER_NAMES},
        "rejected_by_reason": dict(counters.rejected_by_reason),
    }


def alone_snapshot(reason: str, *, degraded: bool) -> dict[str, Any]:
    """The snapshot of a process without a mesh node of its own: nothing connected, no counts."""
    return {
        "enabled": False,
        "reason": reason,
        "node_id": None,
        "peer_id": None,
        "address": None,
        "ready": True,
        "degraded": degraded,
        "discovery_error": None,
        "discovery_failures": 0,
        "discovery_rejected": 0,
        "listen_error": None,
        "relayed_pids": [],
        "heartbeat_period": None,
        "transport": None,
        "peers": [],
        **dict.fromkeys(COUNTER_NAMES, 0),
        "rejected_by_reason": {},
    }


def peer_rows(
    peers: Iterable[Peer],
    expected: set[str],
    clock: Callable[[], float],
    sources: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """A snapshot's ``peers``: those alive or expected, then the expected ones never heard.

    ``source``: where discovery found the peer's address (see ``interfaces.Discovered``);
    ``"inbound"``: it is not among them, it dialled us; ``"broker"``: heard through one.
    """
    peers = list(peers)
    sources = sources or {}
    rows = []
    for peer in sorted(peers, key=lambda p: (p.address, p.node_id)):  # no address: a broker
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
                "last_heard_s": round(clock() - peer.last_heard, 3),
                "heartbeat_period": peer.period or None,
                "source": _source(peer, sources),
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
                "heartbeat_period": None,
                "source": sources.get(address, ""),
            }
        )
    return rows


def _source(peer: Peer, sources: Mapping[str, str]) -> str:
    for address in (peer.dialed_as, peer.address):
        if address in sources:
            return sources[address]
    return "inbound" if peer.address else "broker"


@dataclasses.dataclass
class _Limited:
    logged_at: float
    repeats: int = 0
    message: str = ""
    args: tuple[object, ...] = ()


class EventLog:
    """Warnings said once per key, or at most once per ``LOG_EVERY`` seconds per key."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._logged_once: set[str] = set()
        self._limits: dict[str, _Limited] = {}

    def once(self, key: str, message: str, *args: object) -> None:
        if key not in self._logged_once:
            self._logged_once.add(key)
            logger.warning(message, *args)

    def limited(self, key: str, message: str, *args: object, exc_info: bool = False) -> None:
        """A warning at most once per ``LOG_EVERY`` seconds per key; repeats are summed up.
        ``exc_info``: with the trace of the exception being handled (the first one only)."""
        now = self._clock()
        limit = self._limits.get(key)
        if limit is not None and (limit.repeats or now - limit.logged_at < LOG_EVERY):
            limit.repeats += 1
            limit.message, limit.args = message, args
            self.flush(now)  # the summed-up line, if its minute is over
            return
        self._limits[key] = _Limited(now)
        logger.warning(message, *args, exc_info=exc_info)

    @contextlib.contextmanager
    def surviving(
        self, what: str, letting_through: tuple[type[Exception], ...] = ()
    ) -> Iterator[None]:
        """The node's one policy for an error nobody expected, on one of its threads or in a
        caller's ``deliver``/``drain``: logged with its trace (at most once a minute per
        ``what``, repeats summed up), and the thread goes on. A sender or receiver that died
        would leave every peer stale, silently."""
        try:
            yield
        except letting_through:
            raise
        except Exception:
            self.limited(f"error:{what}", "mesh: error %s (continuing)", what, exc_info=True)

    def flush(self, now: float) -> None:
        """Receiver thread: log what a limited line held back, once its minute is up."""
        for key, limit in list(self._limits.items()):
            if now - limit.logged_at < LOG_EVERY:
                continue
            if limit.repeats:
                logger.warning(
                    limit.message + " (%d more time(s) in the last %d s)",
                    *limit.args,
                    limit.repeats,
                    round(now - limit.logged_at),
                )
                self._limits[key] = _Limited(now)
            else:
                del self._limits[key]
