"""The ``WARPMESH`` setting: defaults, validation, environment overrides and reloading."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator
from decimal import Decimal

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from django_warpmesh import conf
from django_warpmesh.conf import (
    DEFAULT_PORT,
    ENV_OPTIONS,
    OPTIONS,
    MeshSettings,
    format_address,
    get_settings,
    parse,
    parse_address,
)

NO_ENV: dict[str, str] = {}


def key_error(name: str) -> str:
    """A regex matching an error message that names ``WARPMESH['<name>']``."""
    return re.escape(f"WARPMESH['{name}']")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No ``WARPMESH_*`` variable of the caller's shell leaks in, and no parsed value leaks out."""
    for name in ENV_OPTIONS:
        monkeypatch.delenv(f"WARPMESH_{name}", raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


# --- Defaults ---------------------------------------------------------------------------------


def test_defaults() -> None:
    parsed = parse({}, NO_ENV)
    assert parsed == MeshSettings()
    assert parsed.enabled is True
    assert parsed.bind == "0.0.0.0"
    assert parsed.port == DEFAULT_PORT == 7934
    assert parsed.port_range == 64
    assert parsed.advertise is None
    assert parsed.peers == ()
    assert parsed.heartbeat == 1.0
    assert parsed.secret is None
    assert parsed.startup_wait is None
    assert parsed.queue_size == 100_000
    # Their product is what strangers can make a node queue before verifying a frame: 16 MiB.
    assert parsed.buffer_size == 4096
    assert parsed.max_frame_bytes == 4096
    assert parsed.discovery_interval == 5.0
    assert parsed.stale_after == 30.0
    assert parsed.database is None
    assert parsed.degraded_timeout == 5.0
    assert parsed.effective_startup_wait == 3.0
    assert parsed.discovery_enabled is True


def test_none_means_all_defaults() -> None:
    assert parse(None, NO_ENV) == MeshSettings()


def test_every_option_is_a_field() -> None:
    fields = {field.name for field in dataclasses.fields(MeshSettings)}
    assert {name.lower() for name in OPTIONS} == fields
    assert set(ENV_OPTIONS) == set(OPTIONS) - {"TLS"}  # TLS: in the dict only


def test_full_configuration_is_normalised() -> None:
    parsed = parse(
        {
            "ENABLED": "yes",
            "BIND": " 10.0.0.5 ",
            "PORT": "8000",
            "PORT_RANGE": 1,
            "ADVERTISE": "web-1.internal:8000",
            "PEERS": ("a.internal:1", " b.internal:2 ", "a.internal:1", "[::1]:3"),
            "HEARTBEAT": 2,
            "SECRET": "s3cret",
            "STARTUP_WAIT": "1.5",
            "QUEUE_SIZE": 16,
            "BUFFER_SIZE": 8192,
            "MAX_FRAME_BYTES": 4096,
            "DISCOVERY_INTERVAL": 1,
            "STALE_AFTER": 1.5,
            "DATABASE": " replica ",
            "DEGRADED_TIMEOUT": None,
        },
        NO_ENV,
    )
    assert parsed == MeshSettings(
        enabled=True,
        bind="10.0.0.5",
        port=8000,
        port_range=1,
        advertise="web-1.internal:8000",
        peers=("a.internal:1", "b.internal:2", "[::1]:3"),
        heartbeat=2.0,
        secret="s3cret",
        startup_wait=1.5,
        queue_size=16,
        buffer_size=8192,
        max_frame_bytes=4096,
        discovery_interval=1.0,
        stale_after=1.5,
        database="replica",
        degraded_timeout=None,
    )
    assert type(parsed.heartbeat) is float
    assert type(parsed.port) is int
    assert parsed.discovery_enabled is False


def test_secret_is_not_in_the_repr() -> None:
    parsed = parse({"SECRET": "hunter2-hunter2"}, NO_ENV)
    assert parsed.secret == "hunter2-hunter2"
    assert "hunter2" not in repr(parsed)


def test_settings_are_frozen() -> None:
    parsed = parse({}, NO_ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({}, 3.0),
        ({"HEARTBEAT": 0.25}, 0.75),
        ({"HEARTBEAT": 10}, 30.0),
        ({"HEARTBEAT": 10, "STARTUP_WAIT": 2}, 2.0),
        ({"HEARTBEAT": 0.25, "STARTUP_WAIT": None}, 0.75),
        ({"STARTUP_WAIT": "none"}, 3.0),
        ({"STARTUP_WAIT": ""}, 3.0),
    ],
)
def test_startup_wait_defaults_to_three_heartbeats(raw: dict[str, object], expected: float) -> None:
    assert parse(raw, NO_ENV).effective_startup_wait == pytest.approx(expected)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({}, True),
        ({"PEERS": []}, True),
        ({"PEERS": ["a:1"]}, False),
        ({"ENABLED": False}, False),
        ({"ENABLED": False, "PEERS": ["a:1"]}, False),
    ],
)
def test_discovery_only_without_static_peers(raw: dict[str, object], expected: bool) -> None:
    assert parse(raw, NO_ENV).discovery_enabled is expected


@pytest.mark.parametrize(
    ("name", "value", "field", "expected"),
    [
        ("PORT", 0, "port", 0),
        ("PORT", 65535, "port", 65535),
        ("PORT_RANGE", 1, "port_range", 1),
        ("PORT_RANGE", 1024, "port_range", 1024),
        ("QUEUE_SIZE", 16, "queue_size", 16),
        ("QUEUE_SIZE", 10**12, "queue_size", 10**12),
        ("BUFFER_SIZE", 16, "buffer_size", 16),
        ("BUFFER_SIZE", 8192, "buffer_size", 8192),
        ("MAX_FRAME_BYTES", 4096, "max_frame_bytes", 4096),
        ("MAX_FRAME_BYTES", 64 * 1024 * 1024, "max_frame_bytes", 64 * 1024 * 1024),
        ("HEARTBEAT", 0.001, "heartbeat", 0.001),
        ("HEARTBEAT", "2", "heartbeat", 2.0),
        ("STARTUP_WAIT", 0.01, "startup_wait", 0.01),
        ("DEGRADED_TIMEOUT", 60, "degraded_timeout", 60.0),
        ("DEGRADED_TIMEOUT", "None", "degraded_timeout", None),
        ("SECRET", "", "secret", None),
        ("SECRET", None, "secret", None),
        ("DATABASE", "", "database", None),
        ("DATABASE", "default", "database", "default"),
        ("ADVERTISE", "", "advertise", None),
        ("ADVERTISE", None, "advertise", None),
        ("ADVERTISE", "[2001:db8::1]:7934", "advertise", "[2001:db8::1]:7934"),
        ("BIND", "::", "bind", "::"),
        ("BIND", "localhost", "bind", "localhost"),
        ("BIND", "my-host.example.com.", "bind", "my-host.example.com."),
        ("BIND", "x" * 63, "bind", "x" * 63),
        ("ENABLED", False, "enabled", False),
        ("ENABLED", "off", "enabled", False),
    ],
)
def test_accepted_values(name: str, value: object, field: str, expected: object) -> None:
    assert getattr(parse({name: value}, NO_ENV), field) == expected


# --- Validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [[], "PEERS=a:1", 42, [("PEERS", [])]])
def test_setting_must_be_a_dict(raw: object) -> None:
    with pytest.raises(ImproperlyConfigured, match=r"settings\.WARPMESH must be a dict"):
        parse(raw, NO_ENV)


def test_unknown_key_is_named() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"Unknown WARPMESH key\(s\): PEER\.") as info:
        parse({"PEER": ["a:1"]}, NO_ENV)
    assert "Known: ENABLED, BIND, PORT," in str(info.value)


def test_unknown_keys_are_all_named_in_order() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"key\(s\): 1, ZED, peers\."):
        parse({"peers": [], "ZED": 1, 1: 2, "PORT": 80}, NO_ENV)


INVALID: list[tuple[str, object]] = [
    ("ENABLED", 1),
    ("ENABLED", 0),
    ("ENABLED", None),
    ("ENABLED", "maybe"),
    ("ENABLED", ""),
    ("BIND", ""),
    ("BIND", "   "),
    ("BIND", None),
    ("BIND", 127),
    ("BIND", "bad host"),
    ("BIND", "under_score"),
    ("BIND", "a..b"),
    ("BIND", "."),
    ("BIND", "-"),
    ("BIND", "127.0.0.1:80"),
    ("BIND", "[::1]"),
    ("BIND", "x" * 64),
    ("PORT", -1),
    ("PORT", 65536),
    ("PORT", 80.0),
    ("PORT", True),
    ("PORT", None),
    ("PORT", "http"),
    ("PORT", "80.5"),
    ("PORT_RANGE", 0),
    ("PORT_RANGE", 1025),
    ("PORT_RANGE", "many"),
    ("ADVERTISE", "10.0.0.1"),
    ("ADVERTISE", "10.0.0.1:"),
    ("ADVERTISE", ":80"),
    ("ADVERTISE", "10.0.0.1:0"),
    ("ADVERTISE", "10.0.0.1:65536"),
    ("ADVERTISE", "10.0.0.1:http"),
    ("ADVERTISE", "bad host:80"),
    ("ADVERTISE", "[::1]"),
    ("ADVERTISE", "[::1]80"),
    ("ADVERTISE", "::1:80"),
    ("TRANSPORT", ""),
    ("TRANSPORT", 4222),
    ("TRANSPORT", "redis://127.0.0.1:6379"),
    ("TRANSPORT", "nats://"),
    ("TRANSPORT", "nats://bad host:4222"),
    ("TRANSPORT", "nats://127.0.0.1:99999"),
    ("TRANSPORT", "nats://127.0.0.1:4222,"),
    ("TRANSPORT", "postgresql://"),
    ("TRANSPORT", "mysql"),
    ("ADVERTISE", "   "),
    ("ADVERTISE", 42),
    ("ADVERTISE", ["10.0.0.1:80"]),
    ("PEERS", None),
    ("PEERS", 42),
    ("PEERS", {"a:1"}),
    ("PEERS", {"a:1": True}),
    ("PEERS", "nohost"),
    ("PEERS", ["a:1", "nohost"]),
    ("PEERS", ["a:1", 5]),
    ("PEERS", ["a:b"]),
    ("PEERS", ["[::1]:x"]),
    ("PEERS", ["bad_host:1"]),
    ("PEERS", ["2001:db8::1:80"]),
    ("PEERS", [""]),
    ("HEARTBEAT", 0),
    ("HEARTBEAT", 0.0),
    ("HEARTBEAT", -1),
    ("HEARTBEAT", "0"),
    ("HEARTBEAT", "abc"),
    ("HEARTBEAT", math.nan),
    ("HEARTBEAT", math.inf),
    ("HEARTBEAT", -math.inf),
    ("HEARTBEAT", "nan"),
    ("HEARTBEAT", "inf"),
    ("HEARTBEAT", "1e999"),
    ("HEARTBEAT", 10**400),
    ("HEARTBEAT", True),
    ("HEARTBEAT", None),
    ("HEARTBEAT", Decimal("1")),
    ("SECRET", 123),
    ("SECRET", b"bytes-secret"),
    ("SECRET", "   "),
    ("STARTUP_WAIT", 0),
    ("STARTUP_WAIT", -1),
    ("STARTUP_WAIT", math.nan),
    ("STARTUP_WAIT", math.inf),
    ("STARTUP_WAIT", 10**400),
    ("STARTUP_WAIT", "soon"),
    ("STARTUP_WAIT", False),
    ("QUEUE_SIZE", 15),
    ("QUEUE_SIZE", 0),
    ("QUEUE_SIZE", -1),
    ("QUEUE_SIZE", 1.5),
    ("QUEUE_SIZE", "lots"),
    ("BUFFER_SIZE", 15),
    ("BUFFER_SIZE", 8193),
    ("BUFFER_SIZE", (1 << 20) + 1),
    ("MAX_FRAME_BYTES", 4095),
    ("MAX_FRAME_BYTES", 64 * 1024 * 1024 + 1),
    ("DISCOVERY_INTERVAL", 0),
    ("DISCOVERY_INTERVAL", -5),
    ("DISCOVERY_INTERVAL", math.inf),
    ("DISCOVERY_INTERVAL", None),
    ("STALE_AFTER", 0),
    ("STALE_AFTER", math.nan),
    ("STALE_AFTER", "later"),
    ("DATABASE", 5),
    ("DATABASE", "   "),
    ("DEGRADED_TIMEOUT", 0),
    ("DEGRADED_TIMEOUT", -1),
    ("DEGRADED_TIMEOUT", math.inf),
    ("DEGRADED_TIMEOUT", "forever"),
    ("DRAIN_ON_READ", "usually"),
    ("ORM", "sometimes"),
    ("ORM_INCLUDE", "shop.models.Product"),
    ("ORM_INCLUDE", [1]),
    ("ORM_EXCLUDE", {"shop": True}),
    ("ORM_EXCLUDE", ["not a label"]),
    ("PEERS_FILE", 42),
    ("DISCOVERY", "multicast"),
    ("DISCOVERY", True),
    ("MDNS_INTERFACES", "eth0 eth1"),
    ("MDNS_INTERFACES", [7]),
    ("TLS", "/etc/mesh/cert.pem"),
    ("TLS", {"CERT": "/nonexistent/cert.pem"}),
    ("TLS", {"CERT": "a", "KEY": "b", "CA": "c", "CRL": "d"}),
]


@pytest.mark.parametrize(("name", "value"), INVALID, ids=[f"{n}={v!r:.30}" for n, v in INVALID])
def test_invalid_value_names_the_key(name: str, value: object) -> None:
    with pytest.raises(ImproperlyConfigured, match=key_error(name)) as info:
        parse({name: value}, NO_ENV)
    assert "environment" not in str(info.value)


@pytest.mark.parametrize(
    ("value", "transport", "broker"),
    [
        ("nng", "nng", None),
        ("NNG", "nng", None),
        ("postgresql", "postgresql", "postgresql"),
        ("postgres", "postgresql", "postgresql"),
        (
            "postgresql://app@db.internal:5432/app",
            "postgresql://app@db.internal:5432/app",
            "postgresql",
        ),
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222", "nats"),
        ("nats://nats-0:4222,nats://nats-1", "nats://nats-0:4222,nats://nats-1", "nats"),
        ("tls://user:secret@[::1]:4222", "tls://user:secret@[::1]:4222", "nats"),
    ],
)
def test_transport(value: str, transport: str, broker: str | None) -> None:
    parsed = parse({"TRANSPORT": value}, NO_ENV)
    assert parsed.transport == transport
    assert parsed.broker == broker
    assert parse({}, NO_ENV).transport == "nng"


def test_a_bad_transport_url_never_shows_its_password() -> None:
    with pytest.raises(ImproperlyConfigured) as info:
        parse({"TRANSPORT": "redis://user:hunter2@cache:6379"}, NO_ENV)
    assert "hunter2" not in str(info.value)
    assert "redis://user:***@cache:6379" in str(info.value)


def test_every_option_has_an_invalid_case() -> None:
    assert {name for name, _ in INVALID} == set(OPTIONS)


def test_error_message_shows_the_bad_value() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"must be between 1 and 1024, got 2000\."):
        parse({"PORT_RANGE": 2000}, NO_ENV)
    with pytest.raises(ImproperlyConfigured, match=r"must be a boolean, got 'maybe'\."):
        parse({"ENABLED": "maybe"}, NO_ENV)
    with pytest.raises(ImproperlyConfigured, match=r"must be > 0\.0, got nan\."):
        parse({"HEARTBEAT": math.nan}, NO_ENV)


@pytest.mark.parametrize(
    "raw",
    [
        {"STALE_AFTER": 5},
        {"STALE_AFTER": 4},
        {"DISCOVERY_INTERVAL": 30},
        {"DISCOVERY_INTERVAL": 60, "STALE_AFTER": 59.9},
    ],
)
def test_stale_after_must_outlast_discovery_interval(raw: dict[str, object]) -> None:
    with pytest.raises(
        ImproperlyConfigured,
        match=re.escape(
            "WARPMESH['STALE_AFTER'] must be longer than WARPMESH['DISCOVERY_INTERVAL']"
        ),
    ):
        parse(raw, NO_ENV)


def test_stale_after_just_longer_than_discovery_interval() -> None:
    parsed = parse({"DISCOVERY_INTERVAL": 60, "STALE_AFTER": 60.5}, NO_ENV)
    assert (parsed.discovery_interval, parsed.stale_after) == (60.0, 60.5)


# --- Environment ------------------------------------------------------------------------------


def test_environment_wins_over_the_dict() -> None:
    parsed = parse(
        {"PORT": 1000, "HEARTBEAT": 5, "PEERS": ["a:1"]},
        {"WARPMESH_PORT": "2000", "WARPMESH_HEARTBEAT": "0.5"},
    )
    assert (parsed.port, parsed.heartbeat, parsed.peers) == (2000, 0.5, ("a:1",))


def test_environment_alone_sets_an_option() -> None:
    assert parse({}, {"WARPMESH_ADVERTISE": "10.1.2.3:7934"}).advertise == "10.1.2.3:7934"


def test_environment_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARPMESH_QUEUE_SIZE", "1234")
    assert parse({}).queue_size == 1234
    assert parse({}, NO_ENV).queue_size == 100_000


def test_other_environment_variables_are_ignored() -> None:
    environ = {
        "WARPMESH_TEST_DB": "postgresql",
        "WARPMESH_NOPE": "x",
        "warpmesh_port": "1",
        "PORT": "1",
    }
    assert parse({}, environ) == MeshSettings()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a.internal:1", ("a.internal:1",)),
        ("a.internal:1,b.internal:2", ("a.internal:1", "b.internal:2")),
        (" a:1 , b:2 ,, a:1 ,", ("a:1", "b:2")),
        ("[::1]:7934,10.0.0.1:7934", ("[::1]:7934", "10.0.0.1:7934")),
        ("", ()),
        (" , ", ()),
    ],
)
def test_environment_peers_are_comma_separated(value: str, expected: tuple[str, ...]) -> None:
    parsed = parse({"PEERS": ["ignored:1"]}, {"WARPMESH_PEERS": value})
    assert parsed.peers == expected
    assert parsed.discovery_enabled is (not expected)


@pytest.mark.parametrize(
    ("name", "value", "field", "expected"),
    [
        ("PORT", " 8000 ", "port", 8000),
        ("PORT_RANGE", "1", "port_range", 1),
        ("QUEUE_SIZE", "5000", "queue_size", 5000),
        ("BUFFER_SIZE", "16", "buffer_size", 16),
        ("MAX_FRAME_BYTES", "65536", "max_frame_bytes", 65536),
        ("HEARTBEAT", "0.25", "heartbeat", 0.25),
        ("HEARTBEAT", "3", "heartbeat", 3.0),
        ("DISCOVERY_INTERVAL", "1e0", "discovery_interval", 1.0),
        ("STALE_AFTER", " 45 ", "stale_after", 45.0),
        ("STARTUP_WAIT", "2.5", "startup_wait", 2.5),
        ("STARTUP_WAIT", "none", "startup_wait", None),
        ("STARTUP_WAIT", "", "startup_wait", None),
        ("DEGRADED_TIMEOUT", "NONE", "degraded_timeout", None),
        ("DEGRADED_TIMEOUT", "7", "degraded_timeout", 7.0),
        ("SECRET", "from-env", "secret", "from-env"),
        ("SECRET", "", "secret", None),
        ("DATABASE", "replica", "database", "replica"),
        ("DATABASE", "", "database", None),
        ("ADVERTISE", "", "advertise", None),
        ("ADVERTISE", "[fe80::1]:80", "advertise", "[fe80::1]:80"),
        ("BIND", "127.0.0.1", "bind", "127.0.0.1"),
    ],
)
def test_environment_values_are_parsed(name: str, value: str, field: str, expected: object) -> None:
    assert getattr(parse({}, {f"WARPMESH_{name}": value}), field) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True),
        ("true", True),
        ("True", True),
        ("YES", True),
        (" on ", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("OFF", False),
    ],
)
def test_environment_booleans(value: str, expected: bool) -> None:
    assert parse({"ENABLED": not expected}, {"WARPMESH_ENABLED": value}).enabled is expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ENABLED", "maybe"),
        ("ENABLED", ""),
        ("BIND", "bad host"),
        ("PORT", "http"),
        ("PORT", "70000"),
        ("PORT_RANGE", "0"),
        ("ADVERTISE", "no-port"),
        ("PEERS", "a:1,nohost"),
        ("PEERS", "a:1;b:2"),
        ("HEARTBEAT", "abc"),
        ("HEARTBEAT", "nan"),
        ("HEARTBEAT", "-1"),
        ("SECRET", "  "),
        ("STARTUP_WAIT", "-1"),
        ("QUEUE_SIZE", "1.5"),
        ("BUFFER_SIZE", "8"),
        ("MAX_FRAME_BYTES", "1"),
        ("DISCOVERY_INTERVAL", "0"),
        ("STALE_AFTER", "inf"),
        ("DATABASE", "  "),
        ("DEGRADED_TIMEOUT", "never"),
    ],
)
def test_bad_environment_value_names_the_variable(name: str, value: str) -> None:
    # The dict value is fine: the error must point at the variable that broke it.
    with pytest.raises(ImproperlyConfigured) as info:
        parse({}, {f"WARPMESH_{name}": value})
    message = str(info.value)
    assert f"WARPMESH_{name}" in message
    assert f"WARPMESH['{name}']" in message


def test_bad_environment_value_wins_over_a_good_dict_value() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"environment variable WARPMESH_PORT"):
        parse({"PORT": 8000}, {"WARPMESH_PORT": "eighty"})


def test_bad_dict_value_is_overridden_by_a_good_environment_value() -> None:
    assert parse({"PORT": "eighty"}, {"WARPMESH_PORT": "80"}).port == 80


def test_unknown_dict_key_is_an_error_even_with_environment() -> None:
    with pytest.raises(ImproperlyConfigured, match="PORTS"):
        parse({"PORTS": 1}, {"WARPMESH_PORT": "80"})


# --- get_settings and override_settings -------------------------------------------------------


def test_get_settings_parses_the_django_setting() -> None:
    assert get_settings() == parse(settings.WARPMESH, NO_ENV)


def test_get_settings_is_cached() -> None:
    assert get_settings() is get_settings()


def test_override_settings_reparses() -> None:
    before = get_settings()
    with override_settings(WARPMESH={"PORT": 9000, "PEERS": ["a.internal:1"], "HEARTBEAT": 0.5}):
        inside = get_settings()
        assert inside.port == 9000
        assert inside.peers == ("a.internal:1",)
        assert inside.effective_startup_wait == 1.5
        assert get_settings() is inside
        with override_settings(WARPMESH={"PORT": 9001}):
            assert get_settings().port == 9001
            assert get_settings().peers == ()
        assert get_settings() == inside
    after = get_settings()
    assert after is not inside
    assert after == before


@override_settings(WARPMESH={"ENABLED": False, "BIND": "127.0.0.1"})
def test_override_settings_as_decorator() -> None:
    parsed = get_settings()
    assert parsed.enabled is False
    assert parsed.bind == "127.0.0.1"


def test_override_to_none_gives_defaults() -> None:
    with override_settings(WARPMESH=None):
        assert get_settings() == MeshSettings()


def test_override_with_invalid_setting_raises() -> None:
    with (
        override_settings(WARPMESH={"HEARTBEAT": -1}),
        pytest.raises(ImproperlyConfigured, match=key_error("HEARTBEAT")),
    ):
        get_settings()
    assert get_settings() == parse(settings.WARPMESH, NO_ENV)


def test_secret_key_change_reparses() -> None:
    before = get_settings()
    with override_settings(SECRET_KEY="another-secret-key"):
        inside = get_settings()
        assert inside is not before
        assert inside == before


def test_unrelated_setting_change_keeps_the_cache() -> None:
    before = get_settings()
    with override_settings(DEBUG=True):
        assert get_settings() is before
    assert get_settings() is before


def test_environment_is_read_when_reparsed(monkeypatch: pytest.MonkeyPatch) -> None:
    before = get_settings()
    monkeypatch.setenv("WARPMESH_PORT", "4321")
    assert get_settings() is before  # cached until the setting changes
    conf.reload(setting="WARPMESH")
    assert get_settings().port == 4321
    conf.reload(setting="CACHES")
    monkeypatch.setenv("WARPMESH_PORT", "4322")
    assert get_settings().port == 4321


# --- Addresses --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("example.com:7934", ("example.com", 7934)),
        ("web-1.internal.:65535", ("web-1.internal.", 65535)),
        ("localhost:1", ("localhost", 1)),
        (" db:5432 ", ("db", 5432)),
        ("[::1]:7934", ("::1", 7934)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
        ("[::ffff:10.0.0.1]:80", ("::ffff:10.0.0.1", 80)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address("PEERS", text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "host",
        "host:",
        ":80",
        "host:0",
        "host:65536",
        "host:-1",
        "host:http",
        "bad host:80",
        "host_name:80",
        "[::1]",
        "[::1]80",
        "[::1]:",
        "[::1]:80:90",
        "[]:80",
        "[bad host]:80",
        "::1:80",
        "2001:db8::1:443",
        "2001:db8::1",
        "::1",
        None,
        80,
        ("host", 80),
    ],
)
def test_parse_address_rejects(text: object) -> None:
    with pytest.raises(ImproperlyConfigured, match=key_error("peer table")):
        parse_address("peer table", text)


def test_unbracketed_ipv6_is_explained() -> None:
    with pytest.raises(ImproperlyConfigured, match=re.escape("[host]:port")):
        parse_address("ADVERTISE", "fd00::1:10")


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("127.0.0.1", 80, "127.0.0.1:80"),
        ("example.com", 7934, "example.com:7934"),
        ("::1", 7934, "[::1]:7934"),
        ("2001:db8::1", 443, "[2001:db8::1]:443"),
        ("::", 0, "[::]:0"),
    ],
)
def test_format_address(host: str, port: int, expected: str) -> None:
    assert format_address(host, port) == expected


@hypothesis_settings(max_examples=200, deadline=None)
@given(ip=st.ip_addresses(), port=st.integers(min_value=1, max_value=65535))
def test_format_then_parse_round_trips(ip: object, port: int) -> None:
    host = str(ip)
    text = format_address(host, port)
    assert parse_address("PEERS", text) == (host, port)
    assert parse({"PEERS": [text, text]}, NO_ENV).peers == (text,)
