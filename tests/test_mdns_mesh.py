"""mDNS discovery end to end: real processes, each in a host namespace of a LAN of its own."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest

from harness import netns, stays, wait_for
from harness.netns import Host, Lan
from tests.cluster import MeshProcess
from tests.lan import require_namespaces

pytestmark = pytest.mark.mesh

# STARTUP_WAIT: room for the browse window (a second at most) after zeroconf has started.
# STALE_AFTER: the shortest TTL, so the module's processes only stay meshed for longer than it
# if their records are refreshed.
TIMING = {"HEARTBEAT": 0.2, "DISCOVERY_INTERVAL": 0.3, "STARTUP_WAIT": 1.5, "STALE_AFTER": 3}


def start_on(host: Host, **warpmesh: Any) -> MeshProcess:
    config = {"DISCOVERY": "mdns", "BIND": host.address, "PORT_RANGE": 1, **TIMING, **warpmesh}
    proc = MeshProcess(config, prefix=host.prefix)
    try:
        proc.address = proc.request("start")["address"]
    except BaseException:
        proc.close()
        raise
    return proc


def expected_by(proc: MeshProcess) -> set[str]:
    """The addresses ``proc`` expects: the peers mDNS gave it (each row says where from)."""
    return {row["address"] for row in proc.stats()["peers"] if row["source"] == "mdns"}


def meshed(procs: list[MeshProcess]) -> bool:
    """Each expects and is connected to every other, and is ready."""
    for proc in procs:
        others = {other.address for other in procs if other is not proc}
        rows = proc.stats()["peers"]
        connected = {row["address"] for row in rows if row["connected"]}
        if expected_by(proc) != others or not others <= connected or not proc.request("ready"):
            return False
    return True


def write_reaches(writer: MeshProcess, readers: list[MeshProcess], key: str) -> None:
    for proc in [writer, *readers]:
        proc.cache("set", key, "old", None)
    writer.cache("delete", key)
    wait_for(
        lambda: not any(proc.stored(key) for proc in readers),
        5,
        message=f"{key!r} deleted on the others",
    )


@pytest.fixture(scope="module")
def network() -> Iterator[Lan]:
    require_namespaces()
    with netns.lan(3) as made:
        yield made


@pytest.fixture(scope="module")
def trio(network: Lan) -> Iterator[list[MeshProcess]]:
    procs: list[MeshProcess] = []
    try:
        for host in network.hosts[:3]:
            procs.append(start_on(host))
        wait_for(lambda: meshed(procs), 15, interval=0.05, message="the three meshed")
        yield procs
    finally:
        for proc in procs:
            proc.ask_exit()  # all leaving at once, then each waited for
        for proc in procs:
            proc.close()


@pytest.fixture
def host(network: Lan) -> Iterator[Host]:
    """A host joining the LAN for one test."""
    added = network.add_host()
    try:
        yield added
    finally:
        network.remove_host(added)


def test_three_processes_find_each_other_and_stay_coherent(trio: list[MeshProcess]) -> None:
    for proc in trio:
        rows = proc.stats()["peers"]
        assert {row["source"] for row in rows} == {"mdns"}
        assert all(row["connected"] for row in rows)
    write_reaches(trio[0], trio[1:], "from-first")
    write_reaches(trio[2], trio[:2], "from-last")
    assert "via mDNS" in trio[0].request("logged")


MALFORMED = {
    "junk-missing": "id=0123456789abcdef",
    "junk-binary": "\x00\xff\x10=\x01",
    "junk-non-ascii": "id=\xe9\naddr=x\nproto=2\nfp=0\ncaches=[]",
    "0123456789abcdef": "id=fedcba9876543210\naddr=10.0.0.1:1\nproto=2\nfp=0123456789abcdef\n"
    "caches=[]",
    "00000000000000aa": "id=00000000000000aa\naddr=0.0.0.0:7934\nproto=2\nfp=0123456789abcdef\n"
    "caches=[]",
    "00000000000000bb": "id=00000000000000bb\naddr=10.0.0.1:7934\nproto=123456789\n"
    "fp=0123456789abcdef\ncaches=[]",
}


def test_another_secret_is_never_dialled_and_malformed_records_are_dropped(
    trio: list[MeshProcess], host: Host
) -> None:
    stranger = start_on(host, SECRET="another mesh's secret")
    announcer = MeshProcess({"ENABLED": False}, prefix=host.prefix)
    try:
        kwargs = {"services": MALFORMED, "address": host.address}
        announcer.request("run", function="tests.mdnsproc.announce", kwargs=kwargs)

        def counted() -> bool:
            counts = [proc.request("registry") for proc in trio]
            return all(c["ignored"] == 1 and c["malformed"] == len(MALFORMED) for c in counts)

        wait_for(counted, 10, interval=0.1, message="the stranger and the junk counted")
        # Counted once each, however many syncs read them again.
        stays(counted, 1.0, message="each ignored service counted once")
        assert stranger.request("registry")["ignored"] == len(trio)
        assert stranger.stats()["peers"] == []
        for proc in trio:
            assert stranger.address not in {row["address"] for row in proc.stats()["peers"]}
        logged = trio[0].request("logged")
        assert "another mesh (a different WARPMESH['SECRET'])" in logged
        assert logged.count("malformed TXT record") == len(MALFORMED)
        write_reaches(trio[1], [trio[0], trio[2]], "after-the-junk")
    finally:
        announcer.close()
        stranger.close()


def test_peers_that_join_are_found_and_one_that_stops_says_goodbye(
    trio: list[MeshProcess], host: Host
) -> None:
    # Two on one host, as the workers of a pre-fork server: they share UDP port 5353.
    newcomer = start_on(host, STALE_AFTER=30, MDNS_INTERFACES=["eth0"])
    neighbour = start_on(host, PORT=7935)
    try:
        procs = [*trio, newcomer, neighbour]
        wait_for(lambda: meshed(procs), 15, interval=0.05, message="joined")
        write_reaches(newcomer, [*trio, neighbour], "from-newcomer")
    finally:
        neighbour.close()
        newcomer.close()
    # Long before its records' TTL (STALE_AFTER, 30 s): the goodbye.
    wait_for(
        lambda: not any(newcomer.address in expected_by(proc) for proc in trio),
        5,
        message="the newcomer's goodbye",
    )
    assert "is gone: it said goodbye" in trio[0].request("logged")


def test_a_killed_peer_is_gone_once_its_records_expire(trio: list[MeshProcess], host: Host) -> None:
    victim = start_on(host)
    try:
        wait_for(lambda: meshed([*trio, victim]), 15, interval=0.05, message="joined")
        victim.kill(signal.SIGKILL)
        # Refreshed at most a second ago, its records last at least two more.
        assert all(victim.address in expected_by(proc) for proc in trio)
        wait_for(
            lambda: not any(victim.address in expected_by(proc) for proc in trio),
            10,
            interval=0.1,
            message="the killed peer's records to expire",
        )
    finally:
        victim.close()
    assert "its mDNS records expired" in trio[0].request("logged")


def test_lookup_finds_the_peers_without_registering(trio: list[MeshProcess], network: Lan) -> None:
    observer = MeshProcess({"ENABLED": False}, prefix=network.hosts[0].prefix)
    try:
        found = observer.request("run", function="tests.mdnsproc.lookup", kwargs={"timeout": 1.0})
    finally:
        observer.close()
    assert found == {proc.address: "mdns" for proc in trio}
    assert all(expected_by(proc) for proc in trio)


def test_mesh_status_finds_the_mesh_by_mdns(trio: list[MeshProcess], host: Host) -> None:
    observer = MeshProcess(
        {"DISCOVERY": "mdns", "BIND": host.address, **TIMING}, prefix=host.prefix
    )
    try:
        report = observer.request("run", function="tests.mdnsproc.status", kwargs={"timeout": 3})
    finally:
        observer.close()
    assert report["status"] == "healthy", report["verdict"]
    assert report["discovery"] == "mDNS discovery (_warpmesh._tcp.local.)"
    assert {peer["address"]: peer["source"] for peer in report["peers"]} == {
        proc.address: "mdns" for proc in trio
    }
    assert all(peer["answering"] for peer in report["peers"])


def test_a_child_forked_from_an_mdns_node_leaves_its_zeroconf_alone(
    trio: list[MeshProcess],
) -> None:
    parent, *peers = trio
    parent.request("fork")
    child = parent  # the child answers on the same pipes until it exits
    write_reaches(child, peers, "from-the-child")  # relayed through the parent
    child.request("exit")
    got = child.receive(timeout=10)
    assert got == {"ok": {"child_status": 0}}, parent.stderr_tail()
    wait_for(lambda: meshed(trio), 5, message="the three still meshed")
    write_reaches(parent, peers, "from-the-parent")


def test_an_interface_that_does_not_exist_is_a_discovery_failure(network: Lan) -> None:
    proc = start_on(network.hosts[0], PORT=7936, MDNS_INTERFACES=["eth9"])
    try:
        stats = wait_for(
            lambda: (stats := proc.stats())["degraded"] and stats, 10, message="degraded"
        )
    finally:
        proc.close()
    assert "no network interface 'eth9' (it has eth0, lo)" in stats["discovery_error"]
    assert stats["discovery_failures"] >= 2
