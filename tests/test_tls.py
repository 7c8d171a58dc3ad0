"""Mutual TLS between peers (``WARPMESH['TLS']``): settings, real processes, and secrets.

Certificates are made at test time with the ``openssl`` command: a mesh CA, a rogue CA, and
certificates for 127.0.0.1 (an IP subjectAltName) or for a shared name (``SERVER_NAME``).
Without ``openssl`` these tests fail; they never skip.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from django_warpmesh import node as mesh_node
from django_warpmesh.conf import ENV_OPTIONS, OPTIONS, TLSSettings, parse
from harness import ROOT, free_ports, wait_for
from tests.cluster import Cluster, MeshProcess

NO_ENV: dict[str, str] = {}
MESH_NAME = "mesh.internal"
# How long an intruder gets to (fail to) get in: several nng redials (at most 1 s apart) and
# ten heartbeats.
INTRUDER_WINDOW = 2.5


# --- Certificates -----------------------------------------------------------------------------


def openssl(*args: str | Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        pytest.fail("the TLS tests need the openssl command to make their certificates")
    subprocess.run(
        [binary, *map(str, args)], check=True, capture_output=True, timeout=60, text=True
    )


@dataclass
class PKI:
    root: Path

    def make_ca(self, name: str) -> None:
        openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout", self.root / f"{name}.key", "-out", self.root / f"{name}.crt",
        )  # fmt: skip

    def make_cert(self, name: str, ca: str, san: str) -> None:
        """A certificate for ``name`` issued by ``ca``, valid for ``san`` (``IP:…``/``DNS:…``)."""
        ext = self.root / f"{name}.ext"
        ext.write_text(
            f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
        )
        openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-subj", f"/CN={name}",
            "-keyout", self.root / f"{name}.key", "-out", self.root / f"{name}.csr",
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", self.root / f"{name}.csr", "-days", "2",
            "-CA", self.root / f"{ca}.crt", "-CAkey", self.root / f"{ca}.key",
            "-set_serial", str(secrets.randbits(63)), "-extfile", ext,
            "-out", self.root / f"{name}.crt",
        )  # fmt: skip

    def tls(self, name: str, ca: str = "mesh-ca", **extra: str) -> dict[str, str]:
        """The ``WARPMESH['TLS']`` dict of a node holding ``name``'s certificate."""
        return {
            "CERT": str(self.root / f"{name}.crt"),
            "KEY": str(self.root / f"{name}.key"),
            "CA": str(self.root / f"{ca}.crt"),
            **extra,
        }

    def key_body(self, name: str) -> list[str]:
        """The lines that make up ``name``'s private key (what must never leak)."""
        text = (self.root / f"{name}.key").read_text()
        return [line for line in text.splitlines() if line and not line.startswith("-----")]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    pki = PKI(tmp_path_factory.mktemp("pki"))
    pki.make_ca("mesh-ca")
    pki.make_ca("rogue-ca")
    for name in ("node0", "node1", "node2"):
        pki.make_cert(name, "mesh-ca", "IP:127.0.0.1")
    for name in ("named0", "named1"):
        pki.make_cert(name, "mesh-ca", f"DNS:{MESH_NAME}")
    pki.make_cert("rogue", "rogue-ca", "IP:127.0.0.1")
    return pki


# --- Settings ---------------------------------------------------------------------------------


def test_tls_settings_are_parsed(pki: PKI) -> None:
    parsed = parse({"TLS": pki.tls("node0", SERVER_NAME=MESH_NAME)}, NO_ENV).tls
    assert parsed == TLSSettings(
        cert=str(pki.root / "node0.crt"),
        key=str(pki.root / "node0.key"),
        ca=str(pki.root / "mesh-ca.crt"),
        server_name=MESH_NAME,
    )
    default = parse({"TLS": pki.tls("node0")}, NO_ENV).tls
    assert default is not None
    assert default.server_name is None
    # pathlib paths are fine too; None (the default) means plain TCP.
    paths = {key: Path(value) for key, value in pki.tls("node0").items()}
    assert parse({"TLS": paths}, NO_ENV).tls == parse({"TLS": pki.tls("node0")}, NO_ENV).tls
    assert parse({"TLS": None}, NO_ENV).tls is None
    assert parse({}, NO_ENV).tls is None


def test_tls_is_configured_in_the_dict_only(pki: PKI) -> None:
    assert "TLS" in OPTIONS
    assert "TLS" not in ENV_OPTIONS
    assert parse({}, {"WARPMESH_TLS": json.dumps(pki.tls("node0"))}).tls is None


def test_repr_shows_neither_the_secret_nor_the_key(pki: PKI) -> None:
    secret = f"secret-{secrets.token_hex(8)}"
    parsed = parse({"SECRET": secret, "TLS": pki.tls("node0")}, NO_ENV)
    text = repr(parsed)
    assert secret not in text
    assert "node0.key" not in text
    assert "node0.crt" in text  # the certificate is public: shown, which helps debugging


def bad_tls_cases(pki: PKI) -> list[tuple[str, object, str]]:
    """(case, TLS value, the key the error must name)."""
    good = pki.tls("node0")
    encrypted = pki.root / "encrypted.key"
    openssl(
        "pkey", "-in", pki.root / "node0.key", "-aes256", "-passout", "pass:pw", "-out", encrypted
    )
    return [
        ("not a dict", good["CERT"], "TLS"),
        ("a list", [good["CERT"], good["KEY"], good["CA"]], "TLS"),
        ("unknown key", {**good, "PASSWORD": "pw"}, "TLS"),
        ("lower-case key", {**{k.lower(): v for k, v in good.items()}}, "TLS"),
        ("no CERT", {"KEY": good["KEY"], "CA": good["CA"]}, "CERT"),
        ("no KEY", {"CERT": good["CERT"], "CA": good["CA"]}, "KEY"),
        ("no CA", {"CERT": good["CERT"], "KEY": good["KEY"]}, "CA"),
        ("empty dict", {}, "CERT"),
        ("CERT missing file", {**good, "CERT": str(pki.root / "nope.crt")}, "CERT"),
        ("KEY missing file", {**good, "KEY": str(pki.root / "nope.key")}, "KEY"),
        ("CA missing file", {**good, "CA": str(pki.root / "nope.crt")}, "CA"),
        ("KEY a directory", {**good, "KEY": str(pki.root)}, "KEY"),
        ("CERT empty", {**good, "CERT": ""}, "CERT"),
        ("CA not a string", {**good, "CA": 42}, "CA"),
        ("KEY bytes", {**good, "KEY": good["KEY"].encode()}, "KEY"),
        ("CERT holds a key", {**good, "CERT": pki.tls("node1")["KEY"]}, "CERT"),
        ("KEY holds a certificate", {**good, "KEY": good["CERT"]}, "KEY"),
        ("CA holds a key", {**good, "CA": pki.tls("node1")["KEY"]}, "CA"),
        ("KEY encrypted", {**good, "KEY": str(encrypted)}, "KEY"),
        ("SERVER_NAME not a host", {**good, "SERVER_NAME": "not a host"}, "SERVER_NAME"),
        ("SERVER_NAME empty", {**good, "SERVER_NAME": ""}, "SERVER_NAME"),
        ("SERVER_NAME not a string", {**good, "SERVER_NAME": 1}, "SERVER_NAME"),
    ]


def test_bad_tls_settings_name_the_key(pki: PKI) -> None:
    for case, value, key in bad_tls_cases(pki):
        named = "WARPMESH['TLS']" if key == "TLS" else f"WARPMESH['TLS']['{key}']"
        with pytest.raises(ImproperlyConfigured, match=re.escape(named)) as info:
            parse({"TLS": value}, NO_ENV)
        message = str(info.value)
        # What KEY names is never shown, nor any key's contents (CERT and CA paths are).
        if isinstance(value, dict) and isinstance(value.get("KEY"), str) and value["KEY"]:
            assert value["KEY"] not in message, (case, message)
        assert not any(line in message for line in pki.key_body("node0")), case


def test_unreadable_files_at_start_fail_the_node_naming_the_key(pki: PKI, tmp_path: Path) -> None:
    """The files are read again when the node starts: a problem then names the setting (and is
    logged by the caller, which caches alone), before any socket is opened."""
    for name in ("node0.crt", "node0.key", "mesh-ca.crt"):
        shutil.copy(pki.root / name, tmp_path / name)
    files = {
        "CERT": str(tmp_path / "node0.crt"),
        "KEY": str(tmp_path / "node0.key"),
        "CA": str(tmp_path / "mesh-ca.crt"),
    }
    config = parse({"TLS": files, "PEERS": ["127.0.0.1:1"]}, NO_ENV)

    os.remove(files["KEY"])
    node = mesh_node.MeshNode(config, b"k" * 32, Registry())
    with pytest.raises(OSError, match=re.escape("WARPMESH['TLS']['KEY']: cannot read")) as info:
        node.start()
    assert files["KEY"] not in str(info.value)
    assert node.socket is None

    shutil.copy(pki.root / "node0.key", files["KEY"])
    Path(files["CERT"]).write_text(
        "-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n"
    )
    node = mesh_node.MeshNode(config, b"k" * 32, Registry())
    with pytest.raises(OSError, match=re.escape("WARPMESH['TLS']['CERT'] and ['KEY']")) as info:
        node.start()
    assert not any(line in str(info.value) for line in pki.key_body("node0"))
    assert node.socket is None


class Registry:
    description = "test"
    rejected = 0

    def initial(self) -> list[str] | None:
        return None

    def sync(self, node: object) -> None:
        return None

    def leave(self, node: object) -> None:
        pass


# --- Real processes ---------------------------------------------------------------------------


class TLSCluster(Cluster):
    """A :class:`Cluster` whose process ``i`` gets ``tls[i]`` as ``WARPMESH['TLS']``."""

    def __init__(self, tls: Sequence[dict[str, str]], **kwargs: Any) -> None:
        self.tls = list(tls)
        super().__init__(len(self.tls), **kwargs)

    def config(self, index: int) -> dict[str, Any]:
        return {**super().config(index), "TLS": self.tls[index]}


@contextmanager
def tls_cluster(tls: Sequence[dict[str, str]], **kwargs: Any) -> Iterator[TLSCluster]:
    mesh = TLSCluster(tls, **kwargs)
    try:
        yield mesh
    finally:
        mesh.close()


def connected(proc: MeshProcess) -> set[str]:
    return {peer["address"] for peer in proc.stats()["peers"] if peer["connected"]}


def invalidates_across(mesh: Cluster) -> None:
    """Each process's write evicts the other processes' copies."""
    for index, writer in enumerate(mesh.procs):
        key = f"across-{index}"
        for proc in mesh.procs:
            proc.cache("set", key, "old", None)
        writer.cache("set", key, "new", None)
        others = [proc for proc in mesh.procs if proc is not writer]
        wait_for(
            lambda others=others, key=key: not any(proc.stored(key) for proc in others),
            5,
            message=f"{key} to leave the other processes",
        )


@pytest.mark.mesh
@pytest.mark.parametrize("naming", ["ip-san", "server-name"])
def test_peers_with_certificates_from_the_same_ca_connect_and_invalidate(
    pki: PKI, naming: str
) -> None:
    if naming == "ip-san":
        # Each node's own certificate, for 127.0.0.1: verified against the address dialled.
        tls = [pki.tls("node0"), pki.tls("node1")]
    else:
        # Certificates for one shared name only, which every dialer expects.
        tls = [pki.tls(f"named{i}", SERVER_NAME=MESH_NAME) for i in (0, 1)]
    with tls_cluster(tls) as mesh:
        mesh.wait_connected()
        assert connected(mesh.procs[0]) == {mesh.addresses[1]}
        assert connected(mesh.procs[1]) == {mesh.addresses[0]}
        invalidates_across(mesh)
        for proc in mesh.procs:
            assert proc.stats()["frames_rejected"] == 0


@pytest.mark.mesh
def test_server_name_is_verified(pki: PKI) -> None:
    """Certificates issued by the right CA, but not for the address dialled (and no
    SERVER_NAME): neither node accepts the other as a server, so no pipe ever opens."""
    with tls_cluster([pki.tls("named0"), pki.tls("named1")], STARTUP_WAIT=0.2) as mesh:
        time.sleep(INTRUDER_WINDOW)
        for proc in mesh.procs:
            stats = proc.stats()
            assert not any(peer["connected"] for peer in stats["peers"]), stats
            assert stats["degraded"] is True
            assert stats["frames_received"] == 0


@pytest.mark.mesh
@pytest.mark.parametrize("intruder", ["rogue-ca-certificate", "plain-tcp"])
def test_untrusted_peer_cannot_join(pki: PKI, intruder: str) -> None:
    """An intruder that knows the SECRET and every address, and trusts our CA, but holds no
    certificate from it (or speaks plain TCP): never connected, its writes reach nobody."""
    secret = f"shared-{secrets.token_hex(8)}"
    (intruder_port,) = free_ports(1)
    intruder_address = f"127.0.0.1:{intruder_port}"
    with tls_cluster(
        [pki.tls("node0"), pki.tls("node1")],
        SECRET=secret,
        STARTUP_WAIT=0.3,
        # The trusted nodes dial the intruder too: it is refused as a server as well.
        extra_peers=[intruder_address],
    ) as mesh:
        mesh.wait_connected()
        for proc in mesh.procs:
            proc.cache("set", "precious", 1, None)
            proc.cache("set", "also-precious", 2, None)
        config: dict[str, Any] = {
            "BIND": "127.0.0.1",
            "PORT": intruder_port,
            "PORT_RANGE": 1,
            "PEERS": [*mesh.addresses, intruder_address],
            "SECRET": secret,
            "HEARTBEAT": 0.2,
            "STARTUP_WAIT": 0.2,
        }
        if intruder == "rogue-ca-certificate":
            config["TLS"] = pki.tls("rogue", ca="mesh-ca")
        stranger = MeshProcess(config)
        try:
            assert stranger.request("start")["enabled"] is True
            deadline = time.monotonic() + INTRUDER_WINDOW
            while time.monotonic() < deadline:
                stranger.cache("delete", "precious")
                stranger.cache("clear")
                assert not connected(stranger)
                for proc in mesh.procs:
                    assert intruder_address not in connected(proc)
                time.sleep(0.1)
            assert stranger.stats()["invalidations_sent"] > 0  # it did try
            for proc in mesh.procs:
                assert proc.stored("precious")
                assert proc.stored("also-precious")
                stats = proc.stats()
                # Not even a frame: the handshake failed before the mesh saw anything.
                assert stats["frames_rejected"] == 0, stats
                assert stats["rejected_by_reason"] == {}, stats
                assert {p["address"] for p in stats["peers"] if p["id"]} <= set(mesh.addresses)
            # The trusted nodes still talk to each other.
            invalidates_across(mesh)
        finally:
            stranger.close()


@pytest.mark.mesh
def test_secrets_never_appear_in_stats_or_logs(pki: PKI, tmp_path: Path) -> None:
    secret = f"mesh-secret-{secrets.token_hex(12)}"
    forbidden = [secret, *pki.key_body("node0"), *pki.key_body("node1"), *pki.key_body("node2")]
    forbidden += [str(pki.root / f"node{i}.key") for i in range(3)]

    def assert_clean(text: str, what: str) -> None:
        for item in forbidden:
            assert item not in text, f"{what} shows a secret: {item[:12]}…"

    broken = tmp_path / "broken.crt"
    broken.write_text("-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n")
    with tls_cluster([pki.tls("node0"), pki.tls("node1"), pki.tls("node2")], SECRET=secret) as mesh:
        mesh.wait_connected()
        invalidates_across(mesh)
        # A peer leaves, and another cannot start (its certificate is unusable): both logged.
        mesh.procs[2].close()
        wait_for(lambda: mesh.addresses[2] not in connected(mesh.procs[0]), 5, message="goodbye")
        failed = MeshProcess(
            {
                **mesh.config(1),
                "PORT": 0,
                "PORT_RANGE": 1,
                "TLS": {**pki.tls("node1"), "CERT": str(broken)},
            }
        )
        try:
            assert failed.request("start")["enabled"] is False
            stats = failed.stats()
            assert "WARPMESH['TLS']['CERT']" in stats["reason"]
            assert_clean(json.dumps(stats), "mesh_stats() of the node that could not start")
            logged = failed.request("logged")
            assert "could not start" in logged
            assert_clean(logged, "the log of the node that could not start")
        finally:
            failed.close()
        for proc in mesh.procs[:2]:
            assert_clean(json.dumps(proc.stats()), "mesh_stats()")
            logged = proc.request("logged")
            assert "mesh:" in logged
            assert_clean(logged, "the log")


@pytest.mark.mesh
def test_mesh_status_observes_a_tls_mesh(pki: PKI, tmp_path: Path) -> None:
    """The observer of ``manage.py mesh_status`` dials with its own certificate too."""
    with tls_cluster([pki.tls("node0"), pki.tls("node1")]) as mesh:
        mesh.wait_connected()
        settings_module = tmp_path / "tls_observer_settings.py"
        warpmesh = {"ENABLED": True, "PEERS": mesh.addresses, "HEARTBEAT": 0.2}
        settings_module.write_text(
            "from tests.settings import *  # noqa: F403\n"
            f"WARPMESH = {{**{warpmesh!r}, 'TLS': {pki.tls('node2')!r}}}\n"
        )
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tls_observer_settings",
            "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
        }
        env.pop("WARPMESH_ENABLED", None)
        result = subprocess.run(
            [sys.executable, "-m", "django", "mesh_status", "--json"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads(result.stdout)
        assert report["status"] == "healthy"
        assert {peer["address"] for peer in report["peers"]} == set(mesh.addresses)
        assert all(peer["answering"] for peer in report["peers"])
        for line in pki.key_body("node2"):
            assert line not in result.stdout + result.stderr
        assert str(pki.root / "node2.key") not in result.stdout + result.stderr


def test_client_configurations_are_bounded(pki: PKI, monkeypatch: pytest.MonkeyPatch) -> None:
    from django_warpmesh.node import tls

    settings = parse({"TLS": pki.tls("node0")}, NO_ENV).tls
    assert settings is not None
    transport = tls.TLSTransport(settings)
    monkeypatch.setattr(tls, "MAX_CLIENT_CONFIGS", 4)
    first = transport.client_config("host-0")
    for n in range(1, 10):  # as many hosts as the peer table may name
        transport.client_config(f"host-{n}")
    assert len(transport._clients) == 4
    assert list(transport._clients) == ["host-6", "host-7", "host-8", "host-9"]
    # The most recent are kept, and the same name gives the same configuration back.
    assert transport.client_config("host-9") is transport._clients["host-9"]
    assert transport.client_config("host-0") is not first
