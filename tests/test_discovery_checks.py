"""The system checks of DISCOVERY and the settings it uses (checks/peers.py): E007, E008, W010,
W011, and W009 for what a broker makes pointless."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from django.core.checks import CheckMessage

from django_warpmesh import checks
from django_warpmesh.checks import peers


@pytest.fixture(autouse=True)
def _no_prefork_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks, "prefork_server", lambda environ: None)


def messages(settings: Any, **warpmesh: Any) -> list[CheckMessage]:
    settings.WARPMESH = {"ENABLED": True, "BIND": "127.0.0.1", **warpmesh}
    return [m for m in checks.check_deployment(None) if m.id != "warpmesh.W002"]


def test_static_without_anything_listed(settings: Any) -> None:
    (error,) = messages(settings, DISCOVERY="static")
    assert error.id == "warpmesh.E007"
    assert "neither PEERS nor PEERS_FILE" in error.msg


@pytest.mark.parametrize("mode", ["database", "mdns"])
def test_a_mode_that_would_ignore_peers(settings: Any, mode: str, tmp_path: Path) -> None:
    peers_file = tmp_path / "peers"
    peers_file.write_text("10.0.0.1:7934\n")
    found = messages(settings, DISCOVERY=mode, PEERS=["10.0.0.2:7934"], PEERS_FILE=str(peers_file))
    errors = [m for m in found if m.id == "warpmesh.E007"]
    assert len(errors) == 1
    assert f"is {mode!r} but PEERS and PEERS_FILE are set too" in errors[0].msg


def test_mdns_without_zeroconf(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "zeroconf" else real(name, *args)

    monkeypatch.setattr(peers.importlib.util, "find_spec", find_spec)
    (error,) = messages(settings, DISCOVERY="mdns")
    assert error.id == "warpmesh.E008"
    assert "pip install 'django-warpmesh[mdns]'" in str(error.hint)


def test_mdns_on_an_interface_this_host_lacks(settings: Any) -> None:
    (error,) = messages(settings, DISCOVERY="mdns", MDNS_INTERFACES=["lo", "wm-no-such0"])
    assert error.id == "warpmesh.E008"
    assert "this host has no network interface 'wm-no-such0'" in error.msg
    assert messages(settings, DISCOVERY="mdns", MDNS_INTERFACES=["lo", "127.0.0.1"]) == []


def test_mdns_interfaces_without_mdns(settings: Any) -> None:
    (warning,) = messages(settings, PEERS=["10.0.0.2:7934"], MDNS_INTERFACES=["eth0"])
    assert warning.id == "warpmesh.W010"


def test_a_peers_file_with_bad_lines_or_none_at_all(settings: Any, tmp_path: Path) -> None:
    peers_file = tmp_path / "peers"
    peers_file.write_text("10.0.0.1:7934\nweb-2\n# fine\n0.0.0.0:7934\n")
    (warning,) = messages(settings, PEERS_FILE=str(peers_file))
    assert warning.id == "warpmesh.W011"
    assert "line 2: 'web-2' is not of the form host:port" in warning.msg
    assert "line 4: '0.0.0.0' is not an address a peer listens on" in warning.msg
    peers_file.unlink()
    (warning,) = messages(settings, PEERS_FILE=str(peers_file))
    assert warning.id == "warpmesh.W011"
    assert "cannot be read (No such file or directory)" in warning.msg
    peers_file.write_text("10.0.0.1:7934\n")
    assert messages(settings, PEERS_FILE=str(peers_file)) == []


def test_the_defaults_and_explicit_modes_that_work(settings: Any, tmp_path: Path) -> None:
    peers_file = tmp_path / "peers"
    peers_file.write_text("10.0.0.1:7934\n")
    assert messages(settings, PEERS=["10.0.0.2:7934"]) == []
    assert messages(settings, DISCOVERY="static", PEERS_FILE=str(peers_file)) == []
    assert messages(settings, DISCOVERY="database") == []
    assert messages(settings) == []


def test_w009_every_discovery_setting_a_broker_makes_pointless(
    settings: Any, tmp_path: Path
) -> None:
    (warning,) = messages(
        settings,
        TRANSPORT="postgresql://app@db:5432/app",
        DISCOVERY="mdns",
        PEERS_FILE=str(tmp_path / "peers"),
        MDNS_INTERFACES=["eth0"],
    )
    assert warning.id == "warpmesh.W009"
    for name in ("PEERS_FILE", "DISCOVERY", "MDNS_INTERFACES"):
        assert f"'{name}'" in warning.msg
