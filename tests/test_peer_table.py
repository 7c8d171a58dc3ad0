"""The peer table in one process: admin, database routing, the registry against a real database."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client, override_settings
from django.utils import timezone

from django_warpmesh.conf import parse
from django_warpmesh.discovery import DatabaseRegistry, database_alias
from django_warpmesh.models import PeerRow

pytestmark = pytest.mark.database


def make_peer(node_id: str, address: str, *, seen_ago: float = 0.0) -> PeerRow:
    now = timezone.now()
    return PeerRow.objects.create(
        node_id=node_id,
        address=address,
        host="web-1",
        pid=4242,
        caches=["default"],
        version="0.1.0",
        started_at=now - timedelta(hours=1),
        last_seen=now - timedelta(seconds=seen_ago),
    )


@pytest.fixture
def staff_client(db: None) -> Client:
    user = User.objects.create_superuser("admin", "admin@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


def test_admin_lists_peers_read_only(staff_client: Client) -> None:
    make_peer("a" * 16, "10.0.0.1:7934")
    make_peer("b" * 16, "10.0.0.2:7934", seen_ago=3600)
    response = staff_client.get("/admin/django_warpmesh/peerrow/")
    assert response.status_code == 200
    page = response.content.decode()
    assert "10.0.0.1:7934" in page
    assert "10.0.0.2:7934" in page
    assert page.count('alt="True"') == 1  # only the row unseen for an hour is stale
    assert "1:00:00" in page  # age
    assert staff_client.get("/admin/django_warpmesh/peerrow/add/").status_code == 403
    peer = PeerRow.objects.get(address="10.0.0.1:7934")
    change = staff_client.post(f"/admin/django_warpmesh/peerrow/{peer.pk}/change/", {"pid": 1})
    assert change.status_code == 403
    delete = staff_client.post(f"/admin/django_warpmesh/peerrow/{peer.pk}/delete/", {"post": "yes"})
    assert delete.status_code == 403
    assert PeerRow.objects.count() == 2


class PeersElsewhere:
    def db_for_write(self, model: type[Any], **hints: Any) -> str | None:
        return "mesh" if model is PeerRow else None


def test_database_alias_honours_routers_and_the_setting() -> None:
    assert database_alias(parse({})) == "default"
    with override_settings(DATABASE_ROUTERS=[PeersElsewhere()]):
        assert database_alias(parse({})) == "mesh"
        assert database_alias(parse({"DATABASE": "other"})) == "other"


class FakeNode:
    observer = False
    hex_id = "f" * 16
    address = "127.0.0.1:7934"
    started_at = 0.0

    def store_locations(self) -> list[str]:
        return ["default"]


@pytest.mark.django_db(transaction=True)
def test_registry_registers_removes_stale_and_skips_garbage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    make_peer("live", "127.0.0.2:7934")
    make_peer("stale", "127.0.0.3:7934", seen_ago=120)
    make_peer("bad", "no port here")
    make_peer("impostor", FakeNode.address)
    registry = DatabaseRegistry(parse({"STALE_AFTER": 60}))
    for _ in range(3):
        addresses = registry.sync(FakeNode())  # type: ignore[arg-type]
        assert addresses == {"127.0.0.2:7934": "database"}
    assert registry.rejected == 1  # the bad address, counted once
    own = PeerRow.objects.get(node_id=FakeNode.hex_id)
    assert own.address == FakeNode.address
    assert own.caches == ["default"]
    assert not PeerRow.objects.filter(node_id="stale").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum("skipping peer row bad" in message for message in warnings) == 1
    assert sum("skipping peer row impostor" in message for message in warnings) == 1
    registry.leave(FakeNode())  # type: ignore[arg-type]
    assert not PeerRow.objects.filter(node_id=FakeNode.hex_id).exists()
