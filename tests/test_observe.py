"""Where the observer of ``manage.py mesh_status`` finds its targets: where its node would.

No process and no socket: the registry of a node built as
:func:`django_warpmesh.node_factory.build_node` builds it, and the peer table of the test
database. tests/test_mesh_status.py runs the command.
"""

from __future__ import annotations

import datetime

import pytest

from django_warpmesh.conf import parse
from django_warpmesh.discovery import DatabaseRegistry
from django_warpmesh.node_factory import BrokerRegistry, StaticRegistry
from django_warpmesh.observe import find_targets
from harness import wait_for


def test_static_peers_are_the_targets_in_address_order() -> None:
    census = find_targets(StaticRegistry(["10.0.0.2:7934", "10.0.0.1:7934"]))
    assert census is not None
    assert census.discovery == "static PEERS (2)"
    assert [target.address for target in census.targets] == ["10.0.0.1:7934", "10.0.0.2:7934"]
    assert all(target.node_id is None for target in census.targets)


def test_with_a_broker_whoever_answers_is_the_mesh() -> None:
    assert find_targets(BrokerRegistry()) is None


@pytest.mark.django_db
def test_the_targets_are_the_rows_a_node_would_dial() -> None:
    from django.db.models.functions import Now

    from django_warpmesh.models import PeerRow

    for node_id, address, age in [
        ("newest", "10.0.0.1:7934", 1),
        ("older", "10.0.0.1:7934", 5),  # the same address: the nodes use the newest row
        ("any", "0.0.0.0:7934", 1),  # never dialled
        ("stale", "10.0.0.2:7934", 100),
        ("future", "10.0.0.3:7934", -3600),  # not written by a node: nodes ignore it
    ]:
        # The database's clock, as a node writes it (whatever USE_TZ and TIME_ZONE).
        last_seen = Now() - datetime.timedelta(seconds=age)
        PeerRow.objects.create(
            node_id=node_id, address=address, host="h", pid=7, version="0",
            started_at=last_seen, last_seen=last_seen,
        )  # fmt: skip
    registry = DatabaseRegistry(parse({"ENABLED": True, "STALE_AFTER": 30}))
    census = find_targets(registry)
    assert census is not None
    assert census.discovery == registry.description
    assert [(t.address, t.node_id, t.host, t.pid, t.stale) for t in census.targets] == [
        ("10.0.0.1:7934", "newest", "h", 7, False),
        ("10.0.0.2:7934", "stale", "h", 7, True),
    ]
    newest = census.targets[0]
    assert newest.last_seen is not None
    assert newest.started_at == newest.last_seen
    assert 0 <= (census.now - newest.last_seen).total_seconds() < 60  # the database's clock


# -- a stats reply's delivery ---------------------------------------------------------------------


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_reply_whose_delivery_fails_in_any_way_ends_its_thread_quietly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from django_warpmesh.node import replies

    class Broken:
        """pynng's socket as it once failed: recv raising RuntimeError, not NNGException."""

        def __init__(self, **options: object) -> None:
            pass

        def __enter__(self) -> Broken:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def dial(self, url: str, block: bool) -> None:
            pass

        def send(self, data: bytes) -> None:
            pass

        def recv(self) -> bytes:
            raise RuntimeError("cannot use unpack() on <cdata 'char *' NULL>")

    monkeypatch.setattr(replies.pynng, "Req0", Broken)
    sender = replies.ReplySender(None)
    for _ in range(replies.MAX_IN_FLIGHT * 3):  # each slot given back, or they run out
        wait_for(lambda: sender.send("127.0.0.1:9", b"stats"), 5, message="a free slot")
