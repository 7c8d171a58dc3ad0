"""The report of ``manage.py mesh_status``: what an observer found, judged, and its text table.

:class:`Census` is what one round of the observer (:mod:`django_warpmesh.observe`) found: the
peers named (:class:`Target`) and their answers (:class:`Reply`). :func:`build_report` turns it
into the report, a dict whose keys (``--json``) are documented in docs/operations.md and kept
stable (``SCHEMA``): each peer's entry, the problems, a verdict and the exit status.
:func:`render_table` is the report as the command prints it without ``--json``. No process,
no socket, no database here: a report can be built from canned replies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

SCHEMA = 1
HEALTHY, DEGRADED, DISABLED = 0, 1, 2
EXIT_CODES = {"healthy": HEALTHY, "degraded": DEGRADED, "disabled": DISABLED}
EXIT_CODES["misconfigured"] = DISABLED


class Unavailable(Exception):
    """The mesh cannot be observed: disabled or misconfigured. Reported, not raised."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Target:
    """A peer of the mesh, as the peer table (or PEERS) names it."""

    address: str  # "" with a broker transport (a node listens nowhere)
    node_id: str | None = None
    host: str | None = None
    pid: int | None = None
    started_at: datetime | None = None
    last_seen: datetime | None = None
    stale: bool = False
    # Where discovery found it: "database", "PEERS", "PEERS_FILE", "dns:<name>", "mdns";
    # None with a broker transport (it answered).
    source: str | None = None

    @property
    def key(self) -> str:
        return self.address or self.node_id or ""


@dataclass
class Reply:
    stats: dict[str, Any]
    rtt: float
    at: datetime
    dialed_as: str = ""  # the address the observer dialled it by (PEERS, the table)

    @property
    def addresses(self) -> set[str]:
        return {str(self.stats.get("address") or ""), self.dialed_as} - {""}


@dataclass
class Census:
    """What one round found: the peers named, the replies, and when."""

    discovery: str
    targets: list[Target]
    replies: dict[str, Reply] = field(default_factory=dict)  # by node id (hex)
    now: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    transport: dict[str, Any] | None = None  # the observer's: name, url, connected, last_error

    @property
    def broker(self) -> bool:
        return self.transport is not None and self.transport["name"] != "nng"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _seconds(delta: timedelta | None) -> float | None:
    return round(max(delta.total_seconds(), 0.0), 3) if delta is not None else None


def unavailable_report(exc: Unavailable, timeout: float) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "status": exc.status,
        "exit_code": EXIT_CODES[exc.status],
        "verdict": exc.message,
        "checked_at": _iso(datetime.now(timezone.utc)),
        "discovery": None,
        "transport": None,
        "timeout_s": timeout,
        "problems": [],
        "peers": [],
    }


def build_report(census: Census, timeout: float) -> dict[str, Any]:
    matched = _match_replies(census)
    names = _names(census.targets, matched)
    peers = [
        _peer_entry(
            target,
            matched.get(target.key),
            {key: aliases for key, aliases in names.items() if key != target.key},
            census.now,
        )
        for target in census.targets
    ]
    problems = _problems(census, peers)
    status = "degraded" if problems else "healthy"
    return {
        "schema": SCHEMA,
        "status": status,
        "exit_code": EXIT_CODES[status],
        "verdict": _verdict(census, problems),
        "checked_at": _iso(census.now),
        "discovery": census.discovery,
        "transport": census.transport,
        "timeout_s": timeout,
        "problems": problems,
        "peers": peers,
    }


def _match_replies(census: Census) -> dict[str, Reply]:
    """Each target's reply, by the target's key (its address, else its id)."""
    by_id = {target.node_id: target for target in census.targets if target.node_id}
    by_address = {target.address: target for target in census.targets if target.address}
    matched: dict[str, Reply] = {}
    for node_id, answer in census.replies.items():
        target = by_id.get(node_id) or next(
            (by_address[a] for a in sorted(answer.addresses) if a in by_address), None
        )
        if target is not None and target.key not in matched:
            matched[target.key] = answer
    return matched


def _names(targets: list[Target], matched: dict[str, Reply]) -> dict[str, set[str | None]]:
    """Each peer by every name it may appear under in another's view: id, address, dialled as."""
    return {
        target.key: {target.address, target.node_id}
        | (
            {str(matched[target.key].stats.get("node_id"))} | matched[target.key].addresses
            if target.key in matched
            else set()
        )
        for target in targets
    }


def _problems(census: Census, peers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The report's problems: by kind, then in the peers' order; or why there are no peers."""
    problems: list[dict[str, Any]] = [
        {"kind": "not_answering", "peer": entry["address"], "id": entry["id"]}
        for entry in peers
        if not entry["answering"]
    ]
    problems += [
        {
            "kind": "discovery_failing",
            "peer": entry["address"],
            "id": entry["id"],
            "reason": entry["discovery_error"],
        }
        for entry in peers
        if entry["discovery_error"]
    ]
    problems += [
        {
            "kind": "cannot_reach",
            "peer": entry["address"],
            "id": entry["id"],
            "unreachable": entry["cannot_reach"],
        }
        for entry in peers
        if entry["answering"] and entry["cannot_reach"]
    ]
    for entry in peers:
        link = (entry["stats"] or {}).get("transport") or {}
        if entry["transport_connected"] is False and link.get("name") != "nng":
            problems.append(
                {
                    "kind": "transport_disconnected",
                    "peer": entry["address"],
                    "id": entry["id"],
                    "transport": link.get("name"),
                }
            )
    if not census.targets:
        problems.append({"kind": "no_answer" if census.broker else "no_peers"})
    return problems


def _verdict(census: Census, problems: list[dict[str, Any]]) -> str:
    transport = census.transport or {}
    through = transport.get("url") or transport.get("name")
    if not census.targets and census.broker:
        return f"degraded: no node answered through {through}" + (
            ""
            if transport.get("connected")
            else f" (not connected to it: {transport.get('last_error') or 'connecting'})"
        )
    if not census.targets:
        where = "the peer table is empty" if census.discovery.startswith("database") else ""
        return "degraded: no peers" + (
            f" ({where}; a node joins on its first cache write)" if where else ""
        )
    if problems:
        return "degraded: " + "; ".join(_describe(problem) for problem in problems)
    return (
        f"healthy: {len(census.targets)} peer(s)"
        + (f" answered through {through}" if census.broker else ", all answering")
        + (", all connected to each other" if len(census.targets) > 1 else "")
    )


def _describe(problem: dict[str, Any]) -> str:
    label = _label(problem["peer"], problem.get("id"))
    if problem["kind"] == "not_answering":
        return f"{label} not answering"
    if problem["kind"] == "discovery_failing":
        return f"{label} cannot use peer discovery: {problem['reason']}"
    if problem["kind"] == "transport_disconnected":
        return f"{label} has lost its {problem['transport']} link"
    return f"{label} cannot reach {', '.join(problem['unreachable'])}"


def _label(address: str, node_id: str | None) -> str:
    if not address:
        return f"node {node_id[:8]}" if node_id else "a node"
    return f"{address} ({node_id[:8]})" if node_id else address


def _peer_entry(
    target: Target, reply: Reply | None, others: dict[str, set[str | None]], now: datetime
) -> dict[str, Any]:
    """One peer's line; ``others``: every other peer's address, with the names it goes by."""
    stats = reply.stats if reply is not None else None
    started_at = target.started_at
    if started_at is None and stats is not None and isinstance(stats.get("started_at"), float):
        started_at = datetime.fromtimestamp(stats["started_at"], tz=timezone.utc)
    last_seen = target.last_seen or (reply.at if reply is not None else None)
    entry: dict[str, Any] = {
        "id": target.node_id or (stats.get("node_id") if stats else None),
        "address": target.address,
        "source": target.source,
        "host": target.host or (stats.get("host") if stats else None),
        "pid": target.pid or (stats.get("pid") if stats else None),
        "started_at": _iso(started_at),
        "age_s": _seconds(now - started_at) if started_at is not None else None,
        "last_seen": _iso(last_seen),
        "last_seen_s": _seconds(now - last_seen) if last_seen is not None else None,
        "stale": target.stale,
        "answering": stats is not None,
        "ready": None,
        "degraded": None,
        "discovery_error": None,
        "relayed_pids": None,
        "transport_connected": None,
        "connected": None,
        "expected": len(others),
        "cannot_reach": None,
        "latency_ms": None,
        "invalidations_sent": None,
        "invalidations_received": None,
        "gaps_detected": None,
        "frames_rejected": None,
        "stats": stats,
    }
    if reply is not None:
        entry.update(_answer(reply, others))
    return entry


def _answer(reply: Reply, others: dict[str, set[str | None]]) -> dict[str, Any]:
    """What a peer's answer fills in of its entry."""
    stats = reply.stats
    connected = {
        row.get(key)
        for row in stats.get("peers") or []
        if isinstance(row, dict) and row.get("connected")
        for key in ("id", "address", "dialed_as")
    } - {None, ""}
    reached = [address for address, aliases in others.items() if aliases & connected]
    return {
        "ready": stats.get("ready"),
        "degraded": stats.get("degraded"),
        "discovery_error": stats.get("discovery_error"),
        "relayed_pids": stats.get("relayed_pids") or [],
        "transport_connected": (stats.get("transport") or {}).get("connected"),
        "connected": len(reached),
        "cannot_reach": [address for address in others if address not in reached],
        "latency_ms": round(reply.rtt / 2 * 1000, 3),
        "invalidations_sent": stats.get("invalidations_sent"),
        "invalidations_received": stats.get("invalidations_received"),
        "gaps_detected": stats.get("gaps_detected"),
        "frames_rejected": stats.get("frames_rejected"),
    }


# -- the table ---------------------------------------------------------------------------------

COLUMNS = (
    "PEER",
    "ADDRESS",
    "SOURCE",
    "HOST/PID",
    "AGE",
    "CONNECTED",
    "LINK",
    "LATENCY",
    "INV SENT",
    "INV RECV",
    "GAPS",
    "REJECTED",
    "LAST SEEN",
)
NUMERIC = {7, 8, 9, 10, 11}  # right-aligned below their (left-aligned) heading


def render_table(report: dict[str, Any]) -> list[str]:
    """The report as lines of text, without the verdict (the command prints it, in colour)."""
    if report["discovery"] is None:
        return []
    header = _header(report)
    peers = report["peers"]
    if not peers:
        return header
    lines = [*header, "", *_aligned([COLUMNS, *map(_row, peers)]), ""]
    relays = [
        f"{_label(peer['address'], peer['id'])} relays for forked process(es) "
        f"{', '.join(map(str, peer['relayed_pids']))}: forked after it had used the "
        "cache (see docs/deployment.md)"
        for peer in peers
        if peer["relayed_pids"]
    ]
    return [*lines, *relays, ""] if relays else lines


def _header(report: dict[str, Any]) -> list[str]:
    checked = str(report["checked_at"])[:19].replace("T", " ")
    header = [f"Mesh: {len(report['peers'])} peer(s), {report['discovery']}, checked {checked} UTC"]
    transport = report["transport"]
    if transport is not None:
        url = f" at {transport['url']}" if transport["url"] else ""
        state = "connected" if transport["connected"] else "NOT connected"
        why = "" if transport["connected"] else f" ({transport['last_error'] or 'connecting'})"
        header.append(f"Transport: {transport['name']}{url}, {state}{why}")
    return header


def _row(peer: dict[str, Any]) -> tuple[str, ...]:
    host_pid = f"{peer['host'] or '?'}/{peer['pid'] or '?'}" if peer["host"] or peer["pid"] else "-"
    link = {True: "up", False: "down"}.get(peer["transport_connected"], "-")
    if peer["answering"]:
        connected = f"{peer['connected']} of {peer['expected']}"
        numbers = [
            f"{peer['latency_ms']:.3f} ms",
            str(peer["invalidations_sent"]),
            str(peer["invalidations_received"]),
            str(peer["gaps_detected"]),
            str(peer["frames_rejected"]),
        ]
    else:
        connected = "not answering"
        numbers = ["-"] * 5
    last_seen = (
        f"{_duration(peer['last_seen_s'])} ago{' (stale)' if peer['stale'] else ''}"
        if peer["last_seen_s"] is not None
        else "never"
    )
    return (
        (peer["id"] or "-")[:16],
        peer["address"] or "-",
        peer["source"] or "-",
        host_pid,
        _duration(peer["age_s"]),
        connected,
        link,
        *numbers,
        last_seen,
    )


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """The rows in columns; the first is the heading."""
    widths = [max(len(row[index]) for row in rows) for index in range(len(COLUMNS))]
    return [
        "  ".join(
            value.rjust(widths[index]) if index in NUMERIC and line else value.ljust(widths[index])
            for index, value in enumerate(row)
        ).rstrip()
        for line, row in enumerate(rows)
    ]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
