"""Static discovery without a process: the peers file, host names and their resolver, the
registry that joins them (django_warpmesh.node.static, node.resolver)."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from django_warpmesh.node import DiscoveryError
from django_warpmesh.node.resolver import (
    NameNotResolved,
    NameResolver,
    Resolution,
    listening_family,
    lookup,
)
from django_warpmesh.node.static import (
    MAX_FILE_BYTES,
    MAX_FILE_ENTRIES,
    PeersFile,
    StaticRegistry,
    parse_peers_file,
)
from harness import wait_for


class FakeDNS:
    """``socket.getaddrinfo`` over a table the test edits: name -> addresses, or an error."""

    def __init__(self, **records: list[str] | str) -> None:
        self.records: dict[str, list[str] | str] = dict(records)
        self.asked: list[str] = []
        self.lock = threading.Lock()
        self.answering = threading.Event()  # cleared: lookups hang, as on a slow resolver
        self.answering.set()

    def __call__(
        self, host: str, port: int, family: int = 0, **kwargs: Any
    ) -> list[tuple[Any, ...]]:
        with self.lock:
            self.asked.append(host)
        assert self.answering.wait(10)
        with self.lock:
            answer = self.records.get(host, "Name or service not known")
        if isinstance(answer, str):
            raise socket.gaierror(socket.EAI_NONAME, answer)
        found = [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0))
            if ":" in ip
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in answer
        ]
        return [info for info in found if family in (0, info[0])]

    def set(self, host: str, answer: list[str] | str) -> None:
        with self.lock:
            self.records[host] = answer


class FakeNode:
    """What a registry's sync reads of a node, and the wake-up it is given."""

    observer = False

    def __init__(self) -> None:
        self.woken = threading.Event()

    def sync_soon(self) -> None:
        self.woken.set()


@pytest.fixture
def dns() -> FakeDNS:
    return FakeDNS()


def registry(dns: FakeDNS, peers: list[str], path: Path | None = None) -> StaticRegistry:
    return StaticRegistry(peers, str(path) if path else None, interval=0.05, getaddrinfo=dns)


def answered_after_the_first_lookups(reg: StaticRegistry, node: FakeNode, dns: FakeDNS) -> None:
    """While the first lookups hang, the registry says "not known yet" (None), never a part of
    the peers; once they are done, it wakes the node."""
    dns.answering.clear()
    assert reg.sync(node) is None  # type: ignore[arg-type]
    wait_for(lambda: dns.asked, 5, message="the lookup on the resolver's thread")
    assert reg.sync(node) is None  # type: ignore[arg-type]
    dns.answering.set()
    assert node.woken.wait(5)
    node.woken.clear()


# -- the file ------------------------------------------------------------------------------------


def test_a_peers_file_one_address_per_line_comments_and_bad_lines() -> None:
    names, problems = parse_peers_file(
        "# the web tier\n"
        "10.0.0.1:7934\n"
        "\n"
        "  10.0.0.2:7934   # a comment after it\n"
        "10.0.0.1:7934\n"  # listed twice: once
        "web-3.internal:7934\n"
        "[fd00::4]:7934\n"
        "no port here\n"
        "0.0.0.0:7934\n"
        "224.0.0.1:7934\n"
        "10.0.0.5:99999\n"
    )
    assert names == [
        ("10.0.0.1", 7934),
        ("10.0.0.2", 7934),
        ("web-3.internal", 7934),
        ("fd00::4", 7934),
    ]
    assert [number for number, _ in problems] == [8, 9, 10, 11]
    assert "not of the form host:port" in problems[0][1]
    assert "not an address a peer listens on" in problems[1][1]
    assert "between 1 and 65535" in problems[3][1]


def test_the_file_is_read_again_and_its_last_good_list_kept(tmp_path: Path) -> None:
    path = tmp_path / "peers"
    path.write_text("10.0.0.1:7934\n")
    peers_file = PeersFile(str(path))
    assert peers_file.read() == [("10.0.0.1", 7934)]
    path.write_text("10.0.0.1:7934\n10.0.0.2:7934\n")
    assert peers_file.read() == [("10.0.0.1", 7934), ("10.0.0.2", 7934)]
    path.unlink()
    with pytest.raises(FileNotFoundError):
        peers_file.read()
    assert peers_file.names == [("10.0.0.1", 7934), ("10.0.0.2", 7934)]
    path.write_bytes(b"\xff\xfe not text")
    with pytest.raises(ValueError, match="utf-8"):
        peers_file.read()
    path.write_bytes(b"#" * (MAX_FILE_BYTES + 1))
    with pytest.raises(ValueError, match="larger than"):
        peers_file.read()
    assert peers_file.names == [("10.0.0.1", 7934), ("10.0.0.2", 7934)]


def test_a_file_of_too_many_addresses_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "peers"
    path.write_text("".join(f"10.1.{i // 250}.{i % 250 + 1}:7934\n" for i in range(1100)))
    peers_file = PeersFile(str(path))
    assert len(peers_file.read()) == MAX_FILE_ENTRIES
    assert peers_file.problems == [
        (0, f"1100 addresses; only the first {MAX_FILE_ENTRIES} are used")
    ]


# -- names -------------------------------------------------------------------------------------


def test_lookup_takes_every_a_and_aaaa_record(dns: FakeDNS) -> None:
    dns.set("mesh.svc", ["10.0.0.2", "10.0.0.1", "fd00::1", "10.0.0.1"])
    assert lookup(("mesh.svc", 7934), dns) == ("10.0.0.1:7934", "10.0.0.2:7934", "[fd00::1]:7934")


def test_only_the_family_the_fleet_listens_on(dns: FakeDNS) -> None:
    dns.set("mesh.svc", ["10.0.0.1", "fd00::1"])  # a dual-stack Service: each pod twice
    assert listening_family("0.0.0.0") == socket.AF_INET
    assert lookup(("mesh.svc", 7934), dns, socket.AF_INET) == ("10.0.0.1:7934",)
    assert listening_family("::") == socket.AF_INET6
    assert lookup(("mesh.svc", 7934), dns, socket.AF_INET6) == ("[fd00::1]:7934",)
    assert listening_family("web-1.internal") == socket.AF_UNSPEC
    dns.set("v4only.svc", ["10.0.0.1"])
    with pytest.raises(NameNotResolved, match="no AAAA record"):
        lookup(("v4only.svc", 7934), dns, socket.AF_INET6)


def test_lookup_leaves_out_link_local_v6_and_fails_without_records() -> None:
    def scoped(host: str, port: int, **kwargs: Any) -> list[tuple[Any, ...]]:
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fe80::1", port, 0, 2))]

    with pytest.raises(NameNotResolved, match="no A or AAAA record"):
        lookup(("mesh.svc", 7934), scoped)
    with pytest.raises(NameNotResolved, match="Name or service not known"):
        lookup(("nowhere.svc", 7934), FakeDNS())


def test_the_resolver_keeps_a_names_last_good_set_when_a_lookup_fails(dns: FakeDNS) -> None:
    changes = threading.Semaphore(0)
    resolver = NameResolver(0.02, changes.release, dns)
    dns.set("mesh.svc", ["10.0.0.1", "10.0.0.2"])
    resolver.want([("mesh.svc", 7934)])
    try:
        assert changes.acquire(timeout=5)
        assert resolver.results() == {
            ("mesh.svc", 7934): Resolution(("10.0.0.1:7934", "10.0.0.2:7934"))
        }
        dns.set("mesh.svc", "Temporary failure in name resolution")
        assert changes.acquire(timeout=5)
        assert resolver.results()[("mesh.svc", 7934)] == Resolution(
            ("10.0.0.1:7934", "10.0.0.2:7934"), "Temporary failure in name resolution"
        )
        dns.set("mesh.svc", ["10.0.0.3"])
        assert changes.acquire(timeout=5)
        assert resolver.results()[("mesh.svc", 7934)] == Resolution(("10.0.0.3:7934",))
        resolver.want([])  # forgotten: no result kept, no more lookups of it
        assert resolver.results() == {}
    finally:
        resolver.stop()


def test_a_resolver_error_does_not_end_its_thread() -> None:
    calls: list[str] = []

    def broken(host: str, port: int, **kwargs: Any) -> list[tuple[Any, ...]]:
        calls.append(host)
        raise RuntimeError("resolver bug")

    resolver = NameResolver(0.01, lambda: None, broken)
    resolver.want([("mesh.svc", 7934)])
    try:
        wait_for(lambda: len(calls) >= 3, 5, message="lookups after the error")
        assert resolver.results()[("mesh.svc", 7934)].error == "RuntimeError: resolver bug"
    finally:
        resolver.stop()


# -- the registry ------------------------------------------------------------------------------


def test_ip_addresses_alone_are_known_without_waiting(dns: FakeDNS) -> None:
    reg = registry(dns, ["10.0.0.1:7934", "10.0.0.2:7934"])
    expected = {"10.0.0.1:7934": "PEERS", "10.0.0.2:7934": "PEERS"}
    assert reg.initial() == expected
    assert reg.sync(FakeNode()) == expected  # type: ignore[arg-type]
    assert dns.asked == []


def test_a_name_is_a_peer_per_address_once_resolved_off_the_calling_thread(
    dns: FakeDNS,
) -> None:
    dns.set("mesh.svc", ["10.0.0.2", "10.0.0.3"])
    reg = registry(dns, ["10.0.0.1:7934", "mesh.svc:7934"])
    node = FakeNode()
    try:
        assert reg.initial() is None  # a name: nothing resolved where the node starts
        answered_after_the_first_lookups(reg, node, dns)
        assert reg.sync(node) == {  # type: ignore[arg-type]
            "10.0.0.1:7934": "PEERS",
            "10.0.0.2:7934": "dns:mesh.svc",
            "10.0.0.3:7934": "dns:mesh.svc",
        }
        dns.set("mesh.svc", ["10.0.0.3", "10.0.0.4"])  # a pod replaced
        assert node.woken.wait(5)
        assert set(reg.sync(node) or ()) == {"10.0.0.1:7934", "10.0.0.3:7934", "10.0.0.4:7934"}  # type: ignore[arg-type]
    finally:
        reg.leave(node)  # type: ignore[arg-type]


def test_a_failed_lookup_keeps_the_last_good_set_and_counts_as_a_failure(dns: FakeDNS) -> None:
    dns.set("mesh.svc", ["10.0.0.2"])
    reg = registry(dns, ["mesh.svc:7934"])
    node = FakeNode()
    try:
        reg.sync(node)  # type: ignore[arg-type]
        assert node.woken.wait(5)
        assert reg.sync(node) == {"10.0.0.2:7934": "dns:mesh.svc"}  # type: ignore[arg-type]
        node.woken.clear()
        dns.set("mesh.svc", "Temporary failure in name resolution")
        assert node.woken.wait(5)
        with pytest.raises(DiscoveryError) as info:
            reg.sync(node)  # type: ignore[arg-type]
        assert "cannot resolve mesh.svc:7934 (Temporary failure in name resolution)" in str(
            info.value
        )
        assert info.value.addresses == {"10.0.0.2:7934": "dns:mesh.svc"}
    finally:
        reg.leave(node)  # type: ignore[arg-type]


def test_a_name_that_never_resolved_is_not_waited_for_forever(dns: FakeDNS) -> None:
    reg = registry(dns, ["10.0.0.1:7934", "nowhere.svc:7934"])
    node = FakeNode()
    try:
        answered_after_the_first_lookups(reg, node, dns)
        with pytest.raises(DiscoveryError) as info:
            reg.sync(node)  # type: ignore[arg-type]
        assert info.value.addresses == {"10.0.0.1:7934": "PEERS"}
    finally:
        reg.leave(node)  # type: ignore[arg-type]


def test_the_file_read_at_each_sync(
    dns: FakeDNS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "peers"
    path.write_text("10.0.0.2:7934\nnot an address\n")
    reg = registry(dns, ["10.0.0.1:7934"], path)
    node = FakeNode()
    caplog.set_level(logging.INFO, "django_warpmesh")
    assert reg.initial() is None  # the file is read on the maintenance thread, not here
    assert reg.sync(node) == {"10.0.0.1:7934": "PEERS", "10.0.0.2:7934": "PEERS_FILE"}  # type: ignore[arg-type]
    path.write_text("10.0.0.3:7934\nnot an address\n")  # one replaced; the bad line still there
    assert reg.sync(node) == {"10.0.0.1:7934": "PEERS", "10.0.0.3:7934": "PEERS_FILE"}  # type: ignore[arg-type]
    bad = [r for r in caplog.records if "line 2" in r.getMessage()]
    assert len(bad) == 1  # said once, not at every sync
    assert reg.rejected == 1
    assert f"PEERS_FILE {path} line 2: 'not an address' is not of the form host:port" in (
        bad[0].getMessage()
    )
    messages = [r.getMessage() for r in caplog.records]
    assert "mesh: discovered 1 new peer(s) via PEERS_FILE: 10.0.0.3:7934" in messages
    assert "mesh: 1 peer(s) no longer listed, hanging up: 10.0.0.2:7934" in messages


def test_an_unreadable_file_keeps_its_last_list(dns: FakeDNS, tmp_path: Path) -> None:
    path = tmp_path / "peers"
    reg = registry(dns, [], path)
    node = FakeNode()
    with pytest.raises(DiscoveryError, match="cannot read PEERS_FILE") as info:
        reg.sync(node)  # type: ignore[arg-type]
    assert info.value.addresses is None  # never read: not "no peers", but "not known yet"
    path.write_text("10.0.0.2:7934\n")
    assert reg.sync(node) == {"10.0.0.2:7934": "PEERS_FILE"}  # type: ignore[arg-type]
    path.unlink()
    with pytest.raises(DiscoveryError, match="No such file or directory") as info:
        reg.sync(node)  # type: ignore[arg-type]
    assert info.value.addresses == {"10.0.0.2:7934": "PEERS_FILE"}


def test_names_in_the_file_are_resolved_too(dns: FakeDNS, tmp_path: Path) -> None:
    path = tmp_path / "peers"
    path.write_text("mesh.svc:7934\n")
    dns.set("mesh.svc", ["10.0.0.7"])
    reg = registry(dns, [], path)
    node = FakeNode()
    try:
        answered_after_the_first_lookups(reg, node, dns)
        assert reg.sync(node) == {"10.0.0.7:7934": "dns:mesh.svc"}  # type: ignore[arg-type]
        path.write_text("")  # the name removed: forgotten, and its addresses with it
        assert reg.sync(node) == {}  # type: ignore[arg-type]
        assert reg.resolver.results() == {}
    finally:
        reg.leave(node)  # type: ignore[arg-type]


def test_the_observer_resolves_on_its_own_thread(dns: FakeDNS, tmp_path: Path) -> None:
    path = tmp_path / "peers"
    path.write_text("10.0.0.2:7934\nmesh.svc:7934\n")
    dns.set("mesh.svc", ["10.0.0.3"])
    reg = registry(dns, ["10.0.0.1:7934"], path)
    assert reg.lookup_now(1.0) == {
        "10.0.0.1:7934": "PEERS",
        "10.0.0.2:7934": "PEERS_FILE",
        "10.0.0.3:7934": "dns:mesh.svc",
    }


def test_the_observer_says_why_it_found_nobody(dns: FakeDNS, tmp_path: Path) -> None:
    reg = registry(dns, ["nowhere.svc:7934"], tmp_path / "missing")
    with pytest.raises(DiscoveryError) as info:
        reg.lookup_now(1.0)
    assert "cannot read PEERS_FILE" in str(info.value)
    assert "cannot resolve nowhere.svc:7934 (Name or service not known)" in str(info.value)
