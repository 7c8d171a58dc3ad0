"""Each system check triggered (and left silent when it should be), then the log lines."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import types
from typing import Any

import pynng
import pytest
from django.core.checks import CheckMessage, run_checks
from django.db import OperationalError, ProgrammingError, connection, connections
from django.db.models import QuerySet

from django_warpmesh import checks, protocol
from django_warpmesh.cache import MeshCache
from django_warpmesh.conf import parse
from django_warpmesh.node import LOG_EVERY, MeshNode, Peer
from django_warpmesh.node_factory import StaticRegistry
from django_warpmesh.protocol import Frame, Heartbeat, Kind
from harness import wait_for
from tests.cluster import cluster

# Listening on loopback only: the clear-text warning (W007) is tested on its own.
PEERS = {"ENABLED": True, "PEERS": ["10.0.0.1:7934", "10.0.0.2:7934"], "BIND": "127.0.0.1"}
PREFORK_VARIABLES = (
    "WEB_CONCURRENCY",
    "UWSGI_PROCESSES",
    "UWSGI_WORKERS",
    "GUNICORN_CMD_ARGS",
    "SERVER_SOFTWARE",
)
WITHOUT_APP = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "tests.testapp",
]


class CustomMeshCache(MeshCache):
    """A subclass still counts as a mesh cache."""


def ids(messages: list[CheckMessage]) -> list[str]:
    return sorted(str(message.id) for message in messages)


def deployment() -> list[CheckMessage]:
    return checks.check_deployment(None)


@pytest.fixture(autouse=True)
def _no_prefork_server(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PREFORK_VARIABLES:
        monkeypatch.delenv(name, raising=False)


# -- warpmesh.E001: invalid settings ---------------------------------------------------------


def test_e001_invalid_settings(settings: Any) -> None:
    settings.WARPMESH = {"PORT": "many"}
    (error,) = checks.check_settings(None)
    assert error.id == "warpmesh.E001"
    assert "WARPMESH['PORT'] must be an integer" in error.msg
    assert deployment() == []  # reported once, not again by the other checks


# -- warpmesh.E002 / W001: the peer table ---------------------------------------------------


@pytest.mark.database
@pytest.mark.django_db
def test_e002_migrations_not_applied(settings: Any) -> None:
    settings.WARPMESH = {"ENABLED": True}
    assert checks.check_settings(None) == []
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM django_migrations WHERE app = 'django_warpmesh'")
    (error,) = checks.check_settings(None)
    assert error.id == "warpmesh.E002"
    assert "not applied on database 'default': 0001_initial" in error.msg
    assert error.hint == "Run 'python manage.py migrate django_warpmesh --database default'."
    # `migrate` passes the databases it is about to touch: it must not be blocked.
    assert checks.check_settings(None, databases=["default"]) == []


@pytest.mark.django_db
def test_w001_peer_table_unreachable(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.WARPMESH = {"ENABLED": True}

    def refuse(*args: object) -> list[str]:
        raise OperationalError("connection refused")

    monkeypatch.setattr(connections["default"].introspection, "table_names", refuse)
    (warning,) = checks.check_settings(None)
    assert warning.id == "warpmesh.W001"
    assert "connection refused" in warning.msg


# -- warpmesh.E003: no way to find peers ----------------------------------------------------


def test_e003_no_peers_and_the_app_not_installed(settings: Any) -> None:
    settings.WARPMESH = {"ENABLED": True, "BIND": "127.0.0.1"}
    settings.INSTALLED_APPS = WITHOUT_APP
    (error,) = deployment()
    assert error.id == "warpmesh.E003"
    assert "no way to find peers" in error.msg
    assert "'default', 'other', 'bulk'" in error.msg
    # Disabled: a plain local cache, nothing to report.
    settings.WARPMESH = {"ENABLED": False}
    assert deployment() == []


def test_e003_peer_table_database_unknown(settings: Any) -> None:
    settings.WARPMESH = {"ENABLED": True, "DATABASE": "nowhere", "BIND": "127.0.0.1"}
    (error,) = deployment()
    assert error.id == "warpmesh.E003"
    assert "WARPMESH['DATABASE'] names the database 'nowhere', which is not in DATABASES" in (
        error.msg
    )
    assert checks.check_settings(None) == []  # no crash looking for the table there


def test_e003_peer_table_database_not_configured(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(connections.settings, "peers", {"ENGINE": "django.db.backends.dummy"})
    settings.WARPMESH = {"ENABLED": True, "DATABASE": "peers", "BIND": "127.0.0.1"}
    (error,) = deployment()
    assert error.id == "warpmesh.E003"
    assert "not configured" in error.msg


# -- warpmesh.W004 / W005: the app and the caches -------------------------------------------


def test_w004_mesh_cache_without_the_app(settings: Any) -> None:
    settings.WARPMESH = PEERS
    settings.INSTALLED_APPS = WITHOUT_APP
    (warning,) = deployment()
    assert warning.id == "warpmesh.W004"
    assert "is not in INSTALLED_APPS" in warning.msg


def test_w005_app_without_a_mesh_cache(settings: Any) -> None:
    settings.WARPMESH = PEERS
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    (warning,) = deployment()
    assert warning.id == "warpmesh.W005"
    settings.CACHES = {"default": {"BACKEND": "tests.test_checks.CustomMeshCache"}}
    assert deployment() == []
    assert checks.mesh_cache_aliases() == ["default"]


# -- warpmesh.W002: the insecure development key in production -------------------------------


@pytest.mark.parametrize(
    ("debug", "secret_key", "mesh_secret", "expected"),
    [
        (False, "django-insecure-0123456789", None, ["warpmesh.W002"]),
        (False, "django-insecure-0123456789", "a-long-random-mesh-secret-0123456789", []),
        (False, "a-production-key-" + "x" * 40, None, []),
        (True, "django-insecure-0123456789", None, []),
        (False, "a-production-key-" + "x" * 40, "django-insecure-copied", ["warpmesh.W002"]),
        (False, "", None, ["warpmesh.W002"]),
    ],
)
def test_w002_insecure_secret(
    settings: Any, debug: bool, secret_key: str, mesh_secret: str | None, expected: list[str]
) -> None:
    settings.DEBUG = debug
    settings.SECRET_KEY = secret_key
    settings.WARPMESH = {**PEERS, "SECRET": mesh_secret}
    messages = deployment()
    assert ids(messages) == expected
    for message in messages:
        assert "DEBUG is False" in message.msg
        assert secret_key not in message.msg or not secret_key  # never echoes the key
        if mesh_secret:
            assert mesh_secret not in message.msg


# -- warpmesh.W003: a fixed port under a pre-fork server ------------------------------------


@pytest.mark.parametrize(
    ("environ", "warpmesh", "warned"),
    [
        ({"WEB_CONCURRENCY": "4"}, {"PORT": 7934, "PORT_RANGE": 1}, True),
        ({"WEB_CONCURRENCY": "1"}, {"PORT": 7934, "PORT_RANGE": 1}, False),
        ({"WEB_CONCURRENCY": "4"}, {"PORT": 7934}, False),  # the default range: fine
        ({"WEB_CONCURRENCY": "4"}, {"PORT": 0, "PORT_RANGE": 1}, False),  # any free port
        ({"GUNICORN_CMD_ARGS": "--workers 3"}, {"PORT_RANGE": 1}, True),
        ({"GUNICORN_CMD_ARGS": "--bind :8000 -w 1"}, {"PORT_RANGE": 1}, False),
        ({"UWSGI_PROCESSES": "8"}, {"PORT_RANGE": 1}, True),
        ({"SERVER_SOFTWARE": "gunicorn/23.0.0"}, {"PORT_RANGE": 1}, True),
        ({}, {"PORT_RANGE": 1}, False),
    ],
)
def test_w003_fixed_port_with_several_workers(
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    environ: dict[str, str],
    warpmesh: dict[str, Any],
    warned: bool,
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    settings.WARPMESH = {**PEERS, **warpmesh}
    messages = deployment()
    assert ids(messages) == (["warpmesh.W003"] if warned else [])
    if warned:
        (name,) = environ
        assert name in messages[0].msg


def test_prefork_server_detection() -> None:
    assert checks.prefork_server({}) is None
    assert checks.prefork_server({"GUNICORN_CMD_ARGS": "--workers=4"}) is not None
    assert checks.prefork_server({"GUNICORN_CMD_ARGS": "-w4"}) is not None
    assert checks.prefork_server({"GUNICORN_CMD_ARGS": "-w 1"}) is None
    # Gunicorn without a worker count on its command line: a config file may set several.
    assert checks.prefork_server({"GUNICORN_CMD_ARGS": "--bind :8000"}) is not None
    assert checks.prefork_server({"WEB_CONCURRENCY": "lots"}) is None


# -- warpmesh.W006: uWSGI with Python threads disabled ---------------------------------------


def fake_uwsgi(monkeypatch: pytest.MonkeyPatch, **attributes: object) -> None:
    """The module uWSGI puts in sys.modules of its workers; one worker, so W003 stays out."""
    module = types.ModuleType("uwsgi")
    for name, value in {"numproc": 1, **attributes}.items():
        setattr(module, name, value)
    monkeypatch.setitem(sys.modules, "uwsgi", module)


@pytest.mark.parametrize(
    ("attributes", "warned"),
    [
        # What uWSGI decided: every uWSGI since 1.0 exports it, whatever set it.
        ({"has_threads": 0, "opt": {"master": True}}, True),
        ({"has_threads": 1, "opt": {"enable-threads": b"true"}}, False),
        ({"has_threads": 1, "opt": {}, "version_info": (2, 0, 28, 0, b"")}, False),
        # Without it, from the options: names are str, values bytes (True for a bare flag).
        ({"opt": {}, "version_info": (2, 0, 26, 0, b"")}, True),
        ({"opt": {"enable-threads": True}}, False),
        ({"opt": {"enable-threads": b"true"}}, False),
        ({"opt": {"enable-threads": b"1"}}, False),
        ({"opt": {"enable-threads": b"false"}}, True),
        ({"opt": {"enable-threads": b"Off"}}, True),
        ({"opt": {"enable-threads": [b"true", b"0"]}}, True),  # the last one wins
        ({"opt": {"enable-threads": [b"0", True]}}, False),
        ({"opt": {b"enable-threads": b"yes"}}, False),
        ({"opt": {"threads": b"4"}}, False),
        ({"opt": {"threads": b"1"}}, False),  # any `threads` turns them on
        ({"opt": {"py-autoreload": b"2"}}, False),
        ({"opt": {"processes": b"4", "master": True}}, True),
        ({}, True),
        ({"opt": {}, "version_info": (2, 0, 27, 0, b"")}, False),  # always on since 2.0.27
    ],
)
def test_w006_uwsgi_without_threads(
    settings: Any, monkeypatch: pytest.MonkeyPatch, attributes: dict[str, object], warned: bool
) -> None:
    fake_uwsgi(monkeypatch, **attributes)
    settings.WARPMESH = PEERS
    messages = deployment()
    assert ids(messages) == (["warpmesh.W006"] if warned else [])
    if warned:
        assert "enable-threads = true" in str(messages[0].hint)


def test_w006_silent_outside_uwsgi_and_with_the_mesh_disabled(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "uwsgi", raising=False)
    settings.WARPMESH = PEERS
    assert deployment() == []
    fake_uwsgi(monkeypatch, has_threads=0, opt={})
    assert ids(deployment()) == ["warpmesh.W006"]
    settings.WARPMESH = {**PEERS, "ENABLED": False}
    assert deployment() == []


# -- warpmesh.E004: the dashboard permission ------------------------------------------------


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (None, True),
        ("staff", True),
        ("public", True),
        ("tests.test_views.only_with_header", True),
        ("admins", False),
        ("tests.test_views.no_such_function", False),
        (42, False),
    ],
)
def test_e004_dashboard_permission(settings: Any, value: object, valid: bool) -> None:
    settings.WARPMESH_DASHBOARD_PERMISSION = value
    messages = checks.check_dashboard(None)
    assert ids(messages) == ([] if valid else ["warpmesh.E004"])


def test_the_checks_are_registered(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    settings.WARPMESH = {**PEERS, "PORT_RANGE": 1}
    settings.WARPMESH_DASHBOARD_PERMISSION = "admins"
    assert ids(run_checks(tags=["warpmesh"])) == ["warpmesh.E004", "warpmesh.W003"]


# -- logs ------------------------------------------------------------------------------------


def node_with_clock(now: list[float]) -> MeshNode:
    config = parse({"PEERS": ["127.0.0.1:1"]})
    return MeshNode(config, b"k" * 32, StaticRegistry([]), clock=lambda: now[0])


def test_rejected_frames_and_gaps_are_logged_at_most_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    node = node_with_clock(now)
    caplog.set_level(logging.INFO, logger="django_warpmesh")
    for _ in range(5):
        node.receiver._reject("bad_mac")
    node.receiver._reject("malformed")
    assert caplog.messages == [
        "mesh: rejected a frame (bad_mac)",
        "mesh: rejected a frame (malformed)",
    ]
    caplog.clear()
    now[0] += LOG_EVERY / 2
    node.log.flush(now[0])
    assert caplog.messages == []  # the minute is not over
    now[0] += LOG_EVERY / 2
    node.log.flush(now[0])  # the receiver does this between batches
    assert caplog.messages == ["mesh: rejected a frame (bad_mac) (4 more time(s) in the last 60 s)"]
    caplog.clear()
    now[0] += LOG_EVERY + 1
    node.log.flush(now[0])  # nothing held back: nothing said, the slate is clean
    node.receiver._reject("bad_mac")
    assert caplog.messages == ["mesh: rejected a frame (bad_mac)"]
    assert node.counters.rejected_by_reason == {"bad_mac": 6, "malformed": 1}

    caplog.clear()
    peer = Peer(b"\x01" * 8, address="127.0.0.1:9")
    node.register_store("default", object())  # type: ignore[arg-type]
    node.receiver._gap(peer)
    node.receiver._gap(peer)
    assert caplog.messages == [
        "mesh: gap detected from 0101010101010101 (127.0.0.1:9): frames were lost, flushing "
        "the mesh caches (default)"
    ]
    assert node.counters.gaps_detected == 2


def log_of(proc: Any) -> str:
    return str(proc.request("logged"))


@pytest.mark.mesh
def test_the_log_lines_of_a_mesh() -> None:
    with cluster(2) as mesh:
        mesh.wait_connected()
        first, second = mesh.procs
        first_id, second_id = first.stats()["node_id"], second.stats()["node_id"]
        log = log_of(first)
        assert f"mesh: enabled — peer id {first_id} at {first.address} (static PEERS (2))" in log
        wait_for(
            lambda: f"mesh: connected to {second_id} ({second.address}), latency " in log_of(first),
            5,
            message="the connected line, with the latency",
        )
        assert log_of(first).count("mesh: connected to") == 1

        # Never a line per invalidation.
        quiet = [log_of(proc) for proc in mesh.procs]
        before = second.stats()["invalidations_received"]
        first.request("flood", prefix="quiet:", count=300)
        wait_for(
            lambda: second.stats()["invalidations_received"] > before,
            5,
            message="the flood to arrive",
        )
        assert [log_of(proc) for proc in mesh.procs] == quiet

        # Forged frames (another key) on 5 connections: counted, each connection hung up on,
        # and one line per reason per minute.
        forger = protocol.Codec(b"not the mesh key".ljust(32, b"!"))
        hello = protocol.heartbeat_body(Heartbeat("", time.monotonic_ns()))
        frame = forger.encode(Frame(Kind.HEARTBEAT, os.urandom(8), 1, 0, hello))
        for connection in range(1, 6):
            raw = pynng.Bus0(send_buffer_size=128)  # the default (16) would drop some
            try:
                raw.dial(f"tcp://{first.address}", block=True)
                for _ in range(5):
                    raw.send(frame)
                wait_for(
                    lambda n=connection: first.stats()["pipes_dropped"] == n,
                    5,
                    message="the forged frames' connection to be hung up on",
                )
            finally:
                raw.close()
        assert first.stats()["rejected_by_reason"].get("bad_mac", 0) >= 5
        assert log_of(first).count("mesh: rejected a frame (bad_mac)") == 1
        assert log_of(first).count("mesh: hung up on a connection from 127.0.0.1:") == 1

        second.kill(signal.SIGKILL)
        wait_for(
            lambda: f"mesh: lost peer {second_id} ({second.address})" in log_of(first),
            5,
            message="the lost line",
        )
        assert log_of(first).count("mesh: lost peer") == 1


@pytest.mark.database
@pytest.mark.django_db
def test_e005_what_discovery_would_hit_is_reported_at_start(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django_warpmesh.models import PeerRow

    settings.WARPMESH = {"ENABLED": True}
    assert checks.check_settings(None) == []
    assert not PeerRow.objects.exists()  # the probe's row was rolled back

    def refuse(*args: object, **kwargs: object) -> None:
        raise ProgrammingError("permission denied for table django_warpmesh_peer")

    monkeypatch.setattr(QuerySet, "update", refuse)
    (error,) = checks.check_settings(None)
    assert error.id == "warpmesh.E005"
    assert error.msg == (
        "Peer discovery would fail on database 'default': ProgrammingError: permission "
        "denied for table django_warpmesh_peer"
    )


@pytest.mark.database
@pytest.mark.django_db
@pytest.mark.parametrize("use_tz", [True, False])
def test_the_probe_passes_whatever_use_tz(settings: Any, use_tz: bool) -> None:
    settings.WARPMESH = {"ENABLED": True}
    settings.USE_TZ = use_tz
    assert checks.check_settings(None) == []


@pytest.mark.parametrize(
    ("overrides", "debug", "warned"),
    [
        ({"BIND": "0.0.0.0"}, False, True),
        ({"BIND": "10.0.0.5"}, False, True),
        ({"BIND": "127.0.0.1"}, False, False),
        ({"BIND": "::1"}, False, False),
        ({"BIND": "0.0.0.0", "SECRET": "a-dedicated-mesh-secret-0123456789"}, False, False),
        ({"BIND": "0.0.0.0"}, True, False),
    ],
)
def test_w007_clear_text_with_a_key_from_secret_key(
    settings: Any, overrides: dict[str, Any], debug: bool, warned: bool
) -> None:
    settings.DEBUG = debug
    settings.SECRET_KEY = "a-production-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz"
    settings.WARPMESH = {**PEERS, **overrides}
    messages = [m for m in deployment() if m.id == "warpmesh.W007"]
    assert bool(messages) is warned
    if warned:
        assert "clear text" in messages[0].msg
        assert settings.SECRET_KEY not in messages[0].msg


# -- warpmesh.E006 / W009: a broker TRANSPORT ----------------------------------------------------


def test_e006_the_postgresql_transport_on_another_database(settings: Any) -> None:
    settings.WARPMESH = {"TRANSPORT": "postgresql"}
    (error,) = deployment()
    assert error.id == "warpmesh.E006"
    assert "'default' is sqlite" in error.msg
    # Not the peer table's checks: a broker needs no discovery.
    assert checks.check_settings(None) == []


def test_e006_a_missing_extra(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.WARPMESH = {"TRANSPORT": "nats://127.0.0.1:4222"}
    assert deployment() == []
    real_find_spec = checks.importlib.util.find_spec
    monkeypatch.setattr(
        checks.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "nats" else real_find_spec(name, *args),
    )
    (error,) = deployment()
    assert error.id == "warpmesh.E006"
    assert "the nats package is not installed" in error.msg
    assert "django-warpmesh[nats]" in error.hint


def test_w009_settings_a_broker_makes_pointless(settings: Any) -> None:
    settings.WARPMESH = {"TRANSPORT": "postgresql://app@db:5432/app", **PEERS}
    (warning,) = deployment()
    assert warning.id == "warpmesh.W009"
    assert "WARPMESH['PEERS']" in warning.msg
