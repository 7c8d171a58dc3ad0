"""The report of ``manage.py mesh_status``, built from canned replies: no process, no socket.

tests/test_mesh_status.py runs the command against real peers; this pins what the report and its
table say for a given census, to the character.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from django_warpmesh.status_report import (
    EXIT_CODES,
    Census,
    Reply,
    Target,
    Unavailable,
    _duration,
    build_report,
    render_table,
    unavailable_report,
)

NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
A, B, C = "10.0.0.1:7934", "10.0.0.2:7934", "10.0.0.3:7934"
IDS = {A: "aa" * 8, B: "bb" * 8, C: "cc" * 8}
PIDS = {A: 101, B: 102, C: 103}
NNG = {"name": "nng", "url": None, "connected": True, "last_error": None}
HEADING = (
    "PEER              ADDRESS        SOURCE  HOST/PID  AGE    CONNECTED  LINK  LATENCY   "
    "INV SENT  INV RECV  GAPS  REJECTED  LAST SEEN"
)


def stats(at: str, reaches: list[str], **extra: Any) -> dict[str, Any]:
    """The stats reply of the peer at ``at``, connected to the peers at ``reaches``."""
    return {
        "node_id": IDS[at],
        "address": at,
        "host": "web1",
        "pid": PIDS[at],
        "ready": True,
        "degraded": False,
        "discovery_error": None,
        "relayed_pids": [],
        "transport": {"name": "nng", "url": "", "connected": True},
        "peers": [{"id": IDS[other], "address": other, "connected": True} for other in reaches],
        "invalidations_sent": 12,
        "invalidations_received": 3,
        "gaps_detected": 0,
        "frames_rejected": 0,
        "started_at": (NOW - timedelta(hours=2, minutes=5)).timestamp(),
        **extra,
    }


def static_census(replies: dict[str, dict[str, Any]]) -> Census:
    """Three peers from PEERS; ``replies``: the stats of those that answered, by address."""
    return Census(
        "static PEERS (3)",
        [Target(address, source="PEERS") for address in (A, B, C)],
        {IDS[address]: Reply(answer, 0.002, NOW) for address, answer in replies.items()},
        NOW,
        NNG,
    )


def test_a_healthy_mesh_and_its_table() -> None:
    census = static_census({A: stats(A, [B, C]), B: stats(B, [A, C]), C: stats(C, [A, B])})
    report = build_report(census, 2.0)
    assert (report["status"], report["exit_code"], report["problems"]) == ("healthy", 0, [])
    assert report["verdict"] == "healthy: 3 peer(s), all answering, all connected to each other"
    assert report["checked_at"] == "2025-03-04T05:06:07+00:00"
    assert (report["discovery"], report["transport"], report["timeout_s"]) == (
        "static PEERS (3)",
        NNG,
        2.0,
    )
    peer = report["peers"][0]
    assert (peer["id"], peer["pid"], peer["connected"], peer["expected"]) == (IDS[A], 101, 2, 2)
    assert (peer["latency_ms"], peer["age_s"], peer["cannot_reach"]) == (1.0, 7500.0, [])
    assert render_table(report) == [
        "Mesh: 3 peer(s), static PEERS (3), checked 2025-03-04 05:06:07 UTC",
        "Transport: nng, connected",
        "",
        HEADING,
        "aaaaaaaaaaaaaaaa  10.0.0.1:7934  PEERS   web1/101  2h05m  2 of 2     up    1.000 ms"
        "        12         3     0         0  0.0s ago",
        "bbbbbbbbbbbbbbbb  10.0.0.2:7934  PEERS   web1/102  2h05m  2 of 2     up    1.000 ms"
        "        12         3     0         0  0.0s ago",
        "cccccccccccccccc  10.0.0.3:7934  PEERS   web1/103  2h05m  2 of 2     up    1.000 ms"
        "        12         3     0         0  0.0s ago",
        "",
    ]


def test_a_silent_peer_the_others_cannot_reach_and_a_relaying_one() -> None:
    census = static_census({A: stats(A, [B]), B: stats(B, [A], relayed_pids=[7, 8])})
    report = build_report(census, 2.0)
    assert (report["status"], report["exit_code"]) == ("degraded", 1)
    assert report["problems"] == [
        {"kind": "not_answering", "peer": C, "id": None},
        {"kind": "cannot_reach", "peer": A, "id": IDS[A], "unreachable": [C]},
        {"kind": "cannot_reach", "peer": B, "id": IDS[B], "unreachable": [C]},
    ]
    assert report["verdict"] == (
        f"degraded: {C} not answering; {A} (aaaaaaaa) cannot reach {C}; "
        f"{B} (bbbbbbbb) cannot reach {C}"
    )
    silent = report["peers"][2]
    assert (silent["answering"], silent["latency_ms"], silent["stats"]) == (False, None, None)
    lines = render_table(report)
    assert lines[3] == HEADING.replace("CONNECTED  ", "CONNECTED      ")
    assert lines[6] == (
        "-                 10.0.0.3:7934  PEERS   -         -      not answering  -            -"
        "         -         -     -         -  never"
    )
    assert lines[7:] == [
        "",
        f"{B} (bbbbbbbb) relays for forked process(es) 7, 8: forked after it had used the cache "
        "(see docs/deployment.md)",
        "",
    ]


def test_a_reply_is_matched_by_the_address_it_was_dialled_by() -> None:
    # Each peer advertises another address than the one PEERS names (behind a NAT, say), and
    # names its own peers by the addresses it dialled them by.
    def behind_nat(address: str) -> dict[str, Any]:
        dialled = [
            {"id": None, "address": "", "dialed_as": other, "connected": True}
            for other in (A, B, C)
            if other != address
        ]
        return stats(address, [], address=f"nat-{address}", peers=dialled)

    replies = {address: behind_nat(address) for address in (A, B, C)}
    unknown = build_report(static_census(replies), 2.0)
    assert [peer["answering"] for peer in unknown["peers"]] == [False, False, False]
    census = static_census(replies)
    for address, reply in zip((A, B, C), census.replies.values(), strict=True):
        reply.dialed_as = address
    report = build_report(census, 2.0)
    assert report["status"] == "healthy", report["verdict"]
    assert [(peer["connected"], peer["expected"]) for peer in report["peers"]] == [(2, 2)] * 3


def test_nobody_there() -> None:
    empty_table = build_report(Census("database discovery (default)", [], now=NOW), 1.0)
    assert empty_table["problems"] == [{"kind": "no_peers"}]
    assert empty_table["verdict"] == (
        "degraded: no peers (the peer table is empty; a node joins on its first cache write)"
    )
    no_peers = build_report(Census("static PEERS (0)", [], now=NOW, transport=NNG), 1.0)
    assert no_peers["verdict"] == "degraded: no peers"
    assert render_table(no_peers) == [
        "Mesh: 0 peer(s), static PEERS (0), checked 2025-03-04 05:06:07 UTC",
        "Transport: nng, connected",
    ]
    link = {"name": "nats", "url": "nats://broker:4222", "connected": False, "last_error": "EOF"}
    broker = build_report(Census("no discovery", [], now=NOW, transport=link), 1.0)
    assert (broker["exit_code"], broker["problems"]) == (1, [{"kind": "no_answer"}])
    assert broker["verdict"] == (
        "degraded: no node answered through nats://broker:4222 (not connected to it: EOF)"
    )
    assert render_table(broker)[1] == "Transport: nats at nats://broker:4222, NOT connected (EOF)"


@pytest.mark.parametrize("status", ["disabled", "misconfigured"])
def test_unavailable_is_a_report_without_peers_or_table(status: str) -> None:
    report = unavailable_report(Unavailable(status, f"{status}: because"), 3.0)
    assert (report["status"], report["exit_code"], report["verdict"]) == (
        status,
        EXIT_CODES[status],
        f"{status}: because",
    )
    assert report["exit_code"] == 2
    assert (report["discovery"], report["peers"], report["problems"]) == (None, [], [])
    assert render_table(report) == []


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (None, "-"),
        (0.04, "0.0s"),
        (9.96, "10.0s"),
        (42.7, "42s"),
        (61, "1m01s"),
        (3 * 3600 + 5 * 60, "3h05m"),
        (2 * 86400 + 3600, "2d01h"),
    ],
)
def test_durations(seconds: float | None, shown: str) -> None:
    assert _duration(seconds) == shown
