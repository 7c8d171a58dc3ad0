"""The stats endpoint and the dashboard: who may see them, what they show, and no secrets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.cache import caches
from django.http import HttpRequest
from django.test import Client

import django_warpmesh
from harness import free_ports, wait_for
from tests.cluster import Cluster, cluster, node_in_this_process

pytestmark = pytest.mark.django_db

DASHBOARD = "/warpmesh/"
STATS = "/warpmesh/api/stats"
# GL Mesh's /api/stats keys, then ours.
GL_KEYS = {"enabled", "peer_id", "peers", "invalidations_sent", "invalidations_received"}
OUR_KEYS = {
    "health",
    "node_id",
    "address",
    "ready",
    "degraded",
    "reason",
    "peers_connected",
    "peers_known",
    "gaps_detected",
    "flushes",
    "frames_rejected",
    "rejected_by_reason",
    "queue_overflows",
    "send_errors",
    "transport",
    "transport_losses",
    "heartbeat_period",
    "warpmesh_version",
}


def only_with_header(request: HttpRequest) -> bool:
    """A custom permission, named by its dotted path in the tests."""
    return request.headers.get("X-Mesh-Operator") == "yes"


@pytest.fixture
def staff(django_user_model: type[User]) -> User:
    return django_user_model.objects.create_user("staff", password="pw", is_staff=True)


@pytest.fixture
def member(django_user_model: type[User]) -> User:
    return django_user_model.objects.create_user("member", password="pw")


def logged_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_anonymous_is_sent_to_the_login_page_and_refused_the_json(client: Client) -> None:
    page = client.get(DASHBOARD)
    assert page.status_code == 302
    assert page["Location"] == f"/admin/login/?next={DASHBOARD}"
    stats = client.get(STATS)
    assert stats.status_code == 403
    assert stats.json() == {"error": "forbidden"}


def test_a_user_who_is_not_staff_is_refused(member: User) -> None:
    client = logged_in(member)
    assert client.get(DASHBOARD).status_code == 403
    assert client.get(STATS).status_code == 403


def test_staff_sees_the_stats_in_gl_meshs_shape(staff: User) -> None:
    response = logged_in(staff).get(STATS)
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert "no-cache" in response["Cache-Control"]
    stats = response.json()
    assert set(stats) >= GL_KEYS | OUR_KEYS
    # This test process has not started a node: it says so instead of failing.
    assert stats["enabled"] is False
    assert stats["health"] == "disabled"
    assert stats["peers"] == []
    assert (stats["transport"], stats["heartbeat_period"]) == (None, None)
    assert stats["warpmesh_version"] == django_warpmesh.__version__


def test_staff_sees_the_dashboard(staff: User) -> None:
    response = logged_in(staff).get(DASHBOARD + "?refresh=5")
    assert response.status_code == 200
    html = response.content.decode()
    assert "<h1>Warp Mesh</h1>" in html
    assert f'data-stats-url="{STATS}"' in html
    assert 'data-refresh="5"' in html
    assert '<script src="/warpmesh/assets/dashboard.js" defer></script>' in html
    assert 'href="/warpmesh/assets/dashboard.css"' in html
    assert "No peers known to this process." in html
    assert 'class="badge health-disabled"' in html
    # No node, so no transport and no heartbeat: dashes, no link state.
    assert '<code id="wm-transport-name">—</code>' in html
    assert '<span id="wm-transport-state" class="link">—</span>' in html
    assert '<span id="wm-heartbeat">—</span>' in html
    assert '<p id="wm-transport-error" class="reason" hidden>' in html


def test_refresh_is_clamped(staff: User) -> None:
    client = logged_in(staff)
    assert 'data-refresh="1"' in client.get(DASHBOARD + "?refresh=0").content.decode()
    assert 'data-refresh="3600"' in client.get(DASHBOARD + "?refresh=99999").content.decode()
    assert 'data-refresh="2"' in client.get(DASHBOARD + "?refresh=soon").content.decode()


@pytest.mark.parametrize(
    ("permission", "who", "allowed"),
    [
        ("public", None, True),
        ("authenticated", None, False),
        ("authenticated", "member", True),
        ("staff", "member", False),
        ("staff", "staff", True),
        ("superuser", "staff", False),
        ("superuser", "admin", True),
    ],
)
def test_the_permission_setting(
    settings: Any,
    permission: str,
    who: str | None,
    allowed: bool,
    django_user_model: type[User],
    admin_user: User,
) -> None:
    settings.WARPMESH_DASHBOARD_PERMISSION = permission
    users = {
        "member": lambda: django_user_model.objects.create_user("m", password="pw"),
        "staff": lambda: django_user_model.objects.create_user("s", password="pw", is_staff=True),
        "admin": lambda: admin_user,
    }
    client = logged_in(users[who]()) if who else Client()
    assert (client.get(STATS).status_code == 200) is allowed
    assert (client.get(DASHBOARD).status_code == 200) is allowed


def test_a_function_as_the_permission(settings: Any, staff: User) -> None:
    settings.WARPMESH_DASHBOARD_PERMISSION = "tests.test_views.only_with_header"
    client = Client()
    assert client.get(STATS, headers={"X-Mesh-Operator": "yes"}).status_code == 200
    assert client.get(STATS).status_code == 403
    # Staff is no longer enough: the function decides alone.
    assert logged_in(staff).get(STATS).status_code == 403
    settings.WARPMESH_DASHBOARD_PERMISSION = only_with_header  # the callable itself
    assert client.get(STATS, headers={"X-Mesh-Operator": "yes"}).status_code == 200


def test_the_urlconf_keyword_wins_over_the_setting(client: Client) -> None:
    # tests/urls.py includes the views a second time with {"permission": "public"}.
    page = client.get("/warpmesh-public/")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'data-stats-url="/warpmesh-public/api/stats"' in html
    assert "/warpmesh-public/assets/dashboard.js" in html
    assert client.get("/warpmesh-public/api/stats").status_code == 200
    assert client.get(STATS).status_code == 403  # the default include is still staff only


def test_assets(client: Client) -> None:
    script = client.get("/warpmesh/assets/dashboard.js")
    assert script.status_code == 200
    assert script["Content-Type"].startswith("text/javascript")
    assert b"fetch(statsUrl" in script.content
    style = client.get("/warpmesh/assets/dashboard.css")
    assert style["Content-Type"].startswith("text/css")
    assert client.get("/warpmesh/assets/settings.py").status_code == 404
    assert client.get("/warpmesh/assets/..%2F..%2Fviews.py").status_code == 404


def test_only_get(staff: User) -> None:
    client = logged_in(staff)
    assert client.post(STATS).status_code == 405
    assert client.post(DASHBOARD).status_code == 405


# -- with a real mesh: this process's node and two peer processes ---------------------------

SECRET = "mesh-secret-that-must-never-be-shown"


@pytest.fixture
def web_node(settings: Any) -> Iterator[tuple[str, Cluster]]:
    """This process as a mesh node (as a web worker would be), with two peer processes."""
    settings.SECRET_KEY = "django-key-that-must-never-be-shown-either-0123456789"
    (port,) = free_ports(1)
    own = f"127.0.0.1:{port}"
    with (
        cluster(2, extra_peers=[own], SECRET=SECRET) as mesh,
        node_in_this_process(port, mesh.addresses, SECRET=SECRET),
    ):
        wait_for(
            lambda: (
                django_warpmesh.mesh_stats()["ready"]
                and sum(peer["connected"] for peer in django_warpmesh.mesh_stats()["peers"]) == 2
            ),
            10,
            message="this process to connect to both peers",
        )
        mesh.wait_connected()
        yield own, mesh


@pytest.mark.mesh
def test_stats_and_dashboard_show_the_peers(web_node: tuple[str, Cluster], staff: User) -> None:
    own, mesh = web_node
    client = logged_in(staff)
    writer = mesh.procs[0]
    before = django_warpmesh.mesh_stats()["invalidations_received"]
    writer.cache("delete", "from-a-peer")
    wait_for(
        lambda: client.get(STATS).json()["invalidations_received"] > before,
        5,
        message="the peer's invalidation to be counted here",
    )
    caches["default"].set("from-here", 1)
    wait_for(
        lambda: client.get(STATS).json()["invalidations_sent"] >= 1,
        5,
        message="this process's invalidation to be counted",
    )
    stats = client.get(STATS).json()
    assert stats["enabled"] is True
    assert stats["health"] == "healthy", json.dumps(stats)
    assert stats["peer_id"] == stats["node_id"]
    assert stats["address"] == own
    assert (stats["peers_connected"], stats["peers_known"]) == (2, 2)
    # The default transport, nng: peer to peer, its URL this node's own address, always up.
    transport = stats["transport"]
    assert (transport["name"], transport["url"], transport["connected"]) == ("nng", own, True)
    assert stats["heartbeat_period"] == 0.2  # HEARTBEAT, in a mesh of 3
    assert stats["transport_losses"] == 0
    assert all(peer["heartbeat_period"] == 0.2 for peer in stats["peers"])
    assert {peer["address"] for peer in stats["peers"]} == set(mesh.addresses)
    for peer in stats["peers"]:
        assert peer["connected"] is True
        assert isinstance(peer["id"], str)
        wait_for(
            lambda address=peer["address"]: all(
                row["latency_ms"] is not None
                for row in client.get(STATS).json()["peers"]
                if row["address"] == address
            ),
            5,
            message="a latency for each peer",
        )
    writer_row = next(
        p for p in client.get(STATS).json()["peers"] if p["address"] == writer.address
    )
    assert writer_row["invalidations_received"] >= 1

    html = client.get(DASHBOARD).content.decode()
    for address in mesh.addresses:
        assert f'<tr data-address="{address}" class="ok">' in html
    assert 'class="badge health-healthy"' in html
    assert stats["peer_id"] in html
    assert '<code id="wm-transport-name">nng</code>' in html
    assert f'<code id="wm-transport-url">{own}</code>' in html
    assert '<span id="wm-transport-state" class="link link-up">connected</span>' in html
    assert '<span id="wm-heartbeat">0.20 s</span>' in html
    assert '<p id="wm-transport-error" class="reason" hidden>' in html

    # No secret anywhere: not the mesh SECRET, not SECRET_KEY, not the derived frame key.
    from django_warpmesh.conf import get_settings
    from django_warpmesh.node_factory import frame_key

    key = frame_key(get_settings())
    for body in (client.get(STATS).content, client.get(DASHBOARD).content):
        text = body.decode()
        assert SECRET not in text
        assert "django-key-that-must-never-be-shown" not in text
        assert key.hex() not in text
        assert "secret" not in json.dumps(stats).lower()


@pytest.mark.mesh
def test_an_unreachable_peer_is_shown_as_such(web_node: tuple[str, Cluster], staff: User) -> None:
    _own, mesh = web_node
    client = logged_in(staff)
    gone = mesh.procs[1]
    gone.kill()

    def seen_unreachable() -> bool:
        # The peer is found dead, then the cap set, one after the other in the node's tick.
        stats = client.get(STATS).json()
        return bool(stats["peers_connected"] == 1 and stats["degraded"])

    wait_for(seen_unreachable, 10, message="the killed peer to be seen as unreachable")
    stats = client.get(STATS).json()
    assert stats["health"] == "degraded"
    assert stats["degraded"] is True
    html = client.get(DASHBOARD).content.decode()
    assert f'<tr data-address="{gone.address}" class="down">' in html
    assert "unreachable" in html
    assert 'class="badge health-degraded"' in html


def test_failing_discovery_shows_as_degraded_with_its_reason(
    staff: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    stats = django_warpmesh.mesh_stats()
    failing = {
        **stats,
        "enabled": True,
        "ready": True,
        "degraded": True,
        "discovery_error": "cannot reach the peer table on database 'default' (refused)",
        "discovery_failures": 4,
    }
    monkeypatch.setattr(django_warpmesh, "mesh_stats", lambda: failing)
    client = logged_in(staff)
    payload = client.get(STATS).json()
    assert payload["health"] == "degraded"
    assert payload["discovery_error"] == failing["discovery_error"]
    page = client.get(DASHBOARD).content.decode()
    assert (
        "Peer discovery is failing (4 attempt(s) in a row): cannot reach the peer table on "
        "database &#x27;default&#x27; (refused)"
    ) in page


def test_a_broker_link_down_is_shown_with_its_reason(
    staff: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    stats = django_warpmesh.mesh_stats()
    lost = {
        **stats,
        "enabled": True,
        "ready": True,
        "degraded": True,
        "heartbeat_period": 1.0,
        "transport": {
            "name": "nats",
            "url": "nats://broker:4222",
            "connected": False,
            "last_error": "connection refused",
        },
        "transport_losses": 1,
    }
    monkeypatch.setattr(django_warpmesh, "mesh_stats", lambda: lost)
    client = logged_in(staff)
    payload = client.get(STATS).json()
    assert payload["health"] == "degraded"
    assert payload["transport"] == lost["transport"]
    page = client.get(DASHBOARD).content.decode()
    assert '<code id="wm-transport-url">nats://broker:4222</code>' in page
    assert '<span id="wm-transport-state" class="link link-down">not connected</span>' in page
    assert '<span id="wm-heartbeat">1.00 s</span>' in page
    assert (
        '<p id="wm-transport-error" class="reason">The nats link is down, new entries are capped '
        "meanwhile: connection refused</p>"
    ) in page
