"""The mDNS registry without a network: what it announces, what it accepts, what it drops."""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

import pytest
from django.test import override_settings
from zeroconf import ServiceInfo, ServiceStateChange

from django_warpmesh import protocol
from django_warpmesh.conf import get_settings
from django_warpmesh.node import mdns
from django_warpmesh.node import mdns_records as records
from django_warpmesh.node.config import MeshSettings
from django_warpmesh.node.interfaces import DiscoveryError
from django_warpmesh.node_factory import frame_key
from harness import ROOT

KEY = b"k" * 32
OURS = records.fingerprint(KEY)


def announced(node_id: str, address: str, **changes: Any) -> dict[bytes, bytes | None]:
    """The TXT properties of a peer's service as they arrive: through zeroconf's encoding."""
    fields = {
        "node_id": node_id,
        "address": address,
        "protocol": protocol.VERSION,
        "fingerprint": OURS,
        **changes,
    }
    info = ServiceInfo(
        records.SERVICE_TYPE,
        records.instance_name(node_id),
        port=1,
        properties=records.properties(records.Announcement(**fields)),
    )
    received = ServiceInfo(records.SERVICE_TYPE, info.name)
    received.text = info.text
    return received.properties


def test_the_fingerprint_is_of_the_key_and_shows_neither_it_nor_the_secret() -> None:
    secret = "correct horse battery staple"
    with override_settings(WARPMESH={"SECRET": secret}):
        key = frame_key(get_settings())
    shown = records.fingerprint(key)
    assert len(shown) == records.FINGERPRINT_HEX
    assert shown == records.fingerprint(key)  # every node derives the same
    assert shown != records.fingerprint(key[:-1] + b"x")
    for part in (secret.encode().hex(), key.hex(), secret):
        assert shown not in part
        assert part not in shown


def test_records_live_stale_after_and_are_announced_at_least_a_second_apart() -> None:
    assert records.record_ttl(30.0) == 30
    assert records.record_ttl(2.5) == records.MIN_TTL
    assert records.record_ttl(4.2) == 5
    # zeroconf drops a packet identical to one received less than 0.8 s before.
    assert records.refresh_interval(records.record_ttl(0.1)) >= 1.0


def test_a_peer_announcement_round_trips_and_long_cache_lists_are_cut() -> None:
    locations = tuple(f"location-{n:03}" for n in range(40))
    items = announced("0123456789abcdef", "10.1.2.3:7934", caches=locations)
    announcement = records.parse(records.instance_name("0123456789abcdef"), items)
    assert announcement.address == "10.1.2.3:7934"
    assert announcement.fingerprint == OURS
    assert 0 < len(announcement.caches) < len(locations)
    assert announcement.caches == locations[: len(announcement.caches)]
    v6 = announced("0123456789abcdef", "[fd00::1]:7934")
    assert records.parse(records.instance_name("0123456789abcdef"), v6).address == "[fd00::1]:7934"


GOOD = {
    b"id": b"0123456789abcdef",
    b"addr": b"10.0.0.1:7934",
    b"proto": str(protocol.VERSION).encode(),
    b"fp": OURS.encode(),
    b"caches": b"[]",
}


@pytest.mark.parametrize(
    "changes",
    [
        {b"addr": None},
        {b"id": b"\xff" * 16},
        {b"id": b"fedcba9876543210"},  # not the service's name
        {b"fp": b"short"},
        {b"proto": b"two"},
        {b"proto": b"1" * 40},
        {b"addr": b"10.0.0.1"},
        {b"addr": b"0.0.0.0:7934"},
        {b"addr": b"224.0.0.251:5353"},
        {b"addr": b"10.0.0.1:70000"},
        {b"caches": b"{"},
        {b"caches": b'{"a": 1}'},
        {b"caches": b"[1]"},
    ],
)
def test_a_malformed_txt_record_is_refused(changes: dict[bytes, bytes | None]) -> None:
    items = {**GOOD, **changes}
    with pytest.raises(records.Malformed):
        records.parse(records.instance_name("0123456789abcdef"), items)


class Watch:
    """What the registry reads of a ServiceWatch."""

    def __init__(self, names: list[str]) -> None:
        self._names = names

    def names(self) -> list[str]:
        return list(self._names)

    def to_request(self, names: list[str]) -> list[str]:
        return names

    def answered(self, name: str) -> None:
        pass


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> mdns.MdnsRegistry:
    return mdns.MdnsRegistry(MeshSettings(discovery="mdns"), KEY)


def cache_of(
    monkeypatch: pytest.MonkeyPatch, services: dict[str, dict[bytes, bytes | None]]
) -> Watch:
    """Services as zeroconf's cache would give them, by instance name."""

    def cached(zc: object, name: str) -> ServiceInfo | None:
        if name not in services:
            return None
        info = ServiceInfo(records.SERVICE_TYPE, name, port=1)
        info.text = b"".join(
            bytes([len(item)]) + item
            for item in (k + (b"" if v is None else b"=" + v) for k, v in services[name].items())
        )
        return info

    monkeypatch.setattr(mdns, "cached_service", cached)
    monkeypatch.setattr(mdns, "request_services", lambda zc, names: None)
    return Watch(sorted(services))


def test_only_peers_of_this_mesh_and_protocol_are_dialled_and_the_others_counted_once(
    registry: mdns.MdnsRegistry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ours, other_mesh, older, junk = (f"{n:016x}" for n in range(1, 5))
    watch = cache_of(
        monkeypatch,
        {
            records.instance_name(ours): announced(ours, "10.0.0.1:7934"),
            records.instance_name(other_mesh): announced(
                other_mesh, "10.0.0.2:7934", fingerprint=records.fingerprint(b"other")
            ),
            records.instance_name(older): announced(older, "10.0.0.3:7934", protocol=1),
            records.instance_name(junk): {b"\x00": b"\xff"},
            "junk._warpmesh._tcp.local.": announced(junk, "0.0.0.0:7934"),
        },
    )
    with caplog.at_level(logging.INFO, logger="django_warpmesh"):
        for _ in range(3):
            peers = registry._peers(object(), watch, "self", "10.0.0.9:7934")  # type: ignore[arg-type]
    assert list(peers) == ["10.0.0.1:7934"]
    assert (registry.ignored, registry.malformed) == (2, 2)
    assert len(caplog.records) == 4  # once each, not once a sync
    assert "a different WARPMESH['SECRET']" in caplog.text
    assert "it speaks protocol 1" in caplog.text


def test_its_own_service_and_address_are_skipped(
    registry: mdns.MdnsRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    own, twin = "00000000000000aa", "00000000000000bb"
    watch = cache_of(
        monkeypatch,
        {
            records.instance_name(own): announced(own, "10.0.0.1:7934"),
            records.instance_name(twin): announced(twin, "10.0.0.1:7934"),
        },
    )
    assert registry._peers(object(), watch, own, "10.0.0.1:7934") == {}  # type: ignore[arg-type]


def test_the_browser_handler_records_and_never_raises() -> None:
    woken: list[int] = []

    def wake() -> None:
        woken.append(1)
        raise RuntimeError("a bug")

    watch = mdns.ServiceWatch(wake)
    name = records.instance_name("00000000000000aa")
    watch.changed(None, records.SERVICE_TYPE, name, ServiceStateChange.Added)  # type: ignore[arg-type]
    assert watch.names() == [name]
    watch.changed(None, records.SERVICE_TYPE, name, ServiceStateChange.Removed)  # type: ignore[arg-type]
    assert watch.names() == []
    assert watch.take_goodbyes() == {name}
    assert watch.take_goodbyes() == set()
    assert len(woken) == 2
    # Each service is asked for once until it answers.
    assert watch.to_request([name]) == [name]
    assert watch.to_request([name]) == []
    watch.answered(name)
    assert watch.to_request([name]) == [name]


def test_interfaces_by_name_or_address_and_a_missing_one_named() -> None:
    adapters = {"eth0": ["10.0.0.5", "fe80::1"], "lo": ["127.0.0.1", "::1"]}
    assert records.interfaces((), adapters) is None
    assert records.interfaces(("eth0", "192.168.1.9"), adapters) == ["10.0.0.5", "192.168.1.9"]
    with pytest.raises(DiscoveryError, match=r"no network interface 'wlan0' \(it has eth0, lo\)"):
        records.interfaces(("wlan0",), adapters)
    with pytest.raises(DiscoveryError, match="has no address"):
        records.interfaces(("eth1",), {"eth1": []})


def test_no_zeroconf_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "zeroconf", None)
    with pytest.raises(DiscoveryError, match=r"pip install 'django-warpmesh\[mdns\]'"):
        mdns.MdnsRegistry(MeshSettings(discovery="mdns"), KEY)


def test_zeroconf_that_cannot_listen_is_a_discovery_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import zeroconf

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(98, "Address already in use")

    monkeypatch.setattr(zeroconf, "Zeroconf", refuse)
    with pytest.raises(DiscoveryError, match="mDNS cannot listen on UDP port 5353"):
        mdns.open_zeroconf(())


def test_making_the_registry_imports_neither_zeroconf_nor_django() -> None:
    # A fresh interpreter: node/ knows no Django, and zeroconf is imported by the maintenance
    # thread (the registry is made where the node starts: maybe a request's thread).
    code = (
        "import sys; from django_warpmesh.node import mdns, config; "
        "mdns.MdnsRegistry(config.MeshSettings(discovery='mdns'), b'key'); "
        "assert not [m for m in sys.modules if m.split('.')[0] in ('zeroconf', 'django')]"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
