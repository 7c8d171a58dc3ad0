"""Static discovery with real processes: WARPMESH['PEERS_FILE'] read again while they run (a peer
added to it is dialled, one removed is hung up on), host names resolved again (in a network
namespace of the test's own, with its own hosts file), and a listed address that is the process
itself."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from harness import free_ports, netns, stays, wait_for
from tests.cluster import MeshProcess, manage
from tests.lan import require_namespaces

pytestmark = pytest.mark.mesh

TIMINGS = {"HEARTBEAT": 0.2, "DISCOVERY_INTERVAL": 0.2, "BIND": "127.0.0.1", "PORT_RANGE": 1}


def start(
    port: int, peers_file: Path | None, prefix: Sequence[str] = (), **warpmesh: Any
) -> MeshProcess:
    listed = {"PEERS_FILE": str(peers_file)} if peers_file else {}
    proc = MeshProcess({**TIMINGS, "PORT": port, **listed, **warpmesh}, prefix=prefix)
    proc.address = proc.request("start")["address"]
    return proc


def connected(proc: MeshProcess) -> dict[str, str]:
    """The peers ``proc`` is connected to, by address, and where it found each."""
    return {peer["address"]: peer["source"] for peer in proc.stats()["peers"] if peer["connected"]}


def evicted_everywhere(writer: MeshProcess, readers: list[MeshProcess], key: str) -> None:
    """A write on ``writer`` drops ``key`` from every reader (the mesh carries it)."""
    for proc in readers:
        proc.cache("set", key, "old", None)
    writer.cache("set", key, "new", None)
    wait_for(
        lambda: not any(proc.stored(key) for proc in readers),
        10,
        message=f"{key!r} to leave the readers",
    )


@pytest.fixture
def procs() -> Iterator[list[MeshProcess]]:
    started: list[MeshProcess] = []
    yield started
    for proc in started:
        proc.close()


def test_a_peers_file_edited_while_the_fleet_runs(tmp_path: Path, procs: list[MeshProcess]) -> None:
    ports = free_ports(4)
    addresses = [f"127.0.0.1:{port}" for port in ports]
    shared = tmp_path / "peers"  # a ConfigMap, as the three first processes mount it
    shared.write_text("# the web tier\n" + "\n".join(addresses[:3]) + "\nnot-an-address\n")
    procs.extend(start(port, shared) for port in ports[:3])
    first, second, third = procs
    for proc in procs:
        others = {a for a in addresses[:3] if a != proc.address}
        wait_for(lambda p=proc, o=others: set(connected(p)) == o, 15, message="the file's peers")
        assert set(connected(proc).values()) == {"PEERS_FILE"}
        assert proc.request("ready")
    evicted_everywhere(first, [second, third], "k1")

    # A fourth process whose own file lists nobody else: only the others' file can join it.
    alone = tmp_path / "alone"
    alone.write_text("")
    newcomer = start(ports[3], alone)
    procs.append(newcomer)
    assert connected(newcomer) == {}
    with shared.open("a") as file:  # edited in place, as an operator would
        file.write(f"{addresses[3]}\n")
    for proc in (first, second, third):
        wait_for(
            lambda p=proc: connected(p).get(addresses[3]) == "PEERS_FILE",
            10,
            message="the added peer dialled",
        )
    wait_for(lambda: len(connected(newcomer)) == 3, 10, message="the newcomer joined")
    assert set(connected(newcomer).values()) == {"inbound"}  # it dialled nobody
    evicted_everywhere(newcomer, [first, second, third], "k2")
    evicted_everywhere(second, [first, third, newcomer], "k3")

    # Removed from the file: the others hang up, and no longer expect it.
    shared.write_text("\n".join(addresses[:3]) + "\n")
    wait_for(lambda: connected(newcomer) == {}, 10, message="the removed peer hung up on")
    for proc in (first, second, third):
        wait_for(
            lambda p=proc: addresses[3] not in {peer["address"] for peer in p.stats()["peers"]},
            10,
            message="the removed peer forgotten",
        )
        stats = proc.stats()
        assert stats["discovery_error"] is None
        assert not stats["degraded"]
    evicted_everywhere(third, [first, second], "k4")


def test_a_missing_file_caps_the_cache_until_it_appears(
    tmp_path: Path, procs: list[MeshProcess]
) -> None:
    ports = free_ports(2)
    path = tmp_path / "not-yet"
    procs.extend(start(port, path, DEGRADED_TIMEOUT=2.0) for port in ports)
    first, second = procs
    wait_for(
        lambda: first.stats()["degraded"], 10, message="degraded while the file cannot be read"
    )
    assert "cannot read PEERS_FILE" in first.stats()["discovery_error"]
    path.write_text(f"127.0.0.1:{ports[0]}\n127.0.0.1:{ports[1]}\n")
    for proc in procs:
        wait_for(
            lambda p=proc: not p.stats()["degraded"] and len(connected(p)) == 1,
            15,
            message="connected and uncapped once the file is there",
        )
    evicted_everywhere(first, [second], "k")


def test_mesh_status_finds_the_peers_where_the_nodes_do(
    tmp_path: Path, procs: list[MeshProcess]
) -> None:
    ports = free_ports(2)
    listed = tmp_path / "peers"
    listed.write_text("".join(f"127.0.0.1:{port}\n" for port in ports))
    procs.extend(start(port, listed) for port in ports)
    for proc in procs:
        wait_for(lambda p=proc: len(connected(p)) == 1, 15, message="connected")
    result = manage(
        "mesh_status",
        "--json",
        env={"WARPMESH_PEERS_FILE": str(listed), "WARPMESH_HEARTBEAT": "0.2"},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["discovery"] == f"static PEERS_FILE {listed}"
    assert {peer["address"]: peer["source"] for peer in report["peers"]} == {
        f"127.0.0.1:{port}": "PEERS_FILE" for port in ports
    }
    assert all(peer["answering"] for peer in report["peers"])


def test_a_listed_address_that_turns_out_to_be_itself_is_not_waited_for(
    tmp_path: Path, procs: list[MeshProcess]
) -> None:
    # Behind a NAT, or a Service: it advertises one address, and is listed under another.
    (port,) = free_ports(1)
    listed = tmp_path / "peers"
    listed.write_text(f"127.0.0.1:{port}\n")
    proc = start(port, listed, ADVERTISE=f"127.0.0.9:{port}", STARTUP_WAIT=30.0)
    procs.append(proc)
    assert proc.address == f"127.0.0.9:{port}"
    wait_for(lambda: proc.request("ready"), 10, message="ready without waiting for itself")
    stats = proc.stats()
    assert not stats["degraded"]
    assert stats["peers"] == []


def test_a_peer_that_leaves_cleanly_caps_nobody_while_it_is_still_listed(
    tmp_path: Path, procs: list[MeshProcess]
) -> None:
    # A rolling deploy: the old pod says goodbye, its address stays listed (a DNS record, a
    # file) until discovery catches up. Only after STALE_AFTER is it missed.
    ports = free_ports(3)
    listed = tmp_path / "peers"
    listed.write_text("".join(f"127.0.0.1:{port}\n" for port in ports))
    procs.extend(start(port, listed, STALE_AFTER=3.0) for port in ports)
    leaving, *staying = procs
    for proc in procs:
        wait_for(lambda p=proc: len(connected(p)) == 2, 15, message="all connected")
    leaving.ask_exit()
    assert leaving.wait_eof(time.monotonic() + 10)
    for proc in staying:
        wait_for(lambda p=proc: leaving.address not in connected(p), 5, message="the goodbye heard")
    stays(
        lambda: not any(proc.stats()["degraded"] for proc in staying),
        1.0,
        message="nobody capped by a peer that left cleanly",
    )
    evicted_everywhere(staying[0], staying[1:], "k")
    # Still listed after STALE_AFTER: now it is a peer that cannot be reached.
    wait_for(lambda: staying[0].stats()["degraded"], 10, message="missed after STALE_AFTER")


def hosts(name: str, *numbers: int) -> str:
    """A hosts file where ``name`` resolves to 127.0.0.N for each N: one line per address, as a
    headless Service's records."""
    return netns.DEFAULT_HOSTS + "".join(f"127.0.0.{n}\t{name}\n" for n in numbers)


def test_a_host_name_resolved_again_while_the_fleet_runs(procs: list[MeshProcess]) -> None:
    require_namespaces()
    name = "shop-mesh.test"
    # A namespace of the test's own: its hosts file is the DNS, every 127.x address is its own.
    with netns.namespace(hosts_file=hosts(name, 2, 3, 4)) as host:

        def member(number: int) -> MeshProcess:
            proc = start(
                7934,
                None,
                host.prefix,
                BIND=f"127.0.0.{number}",
                PEERS=[f"{name}:7934"],  # every pod lists the Service, itself included
            )
            procs.append(proc)
            return proc

        first, second, third = (member(n) for n in (2, 3, 4))
        for proc in procs:
            wait_for(lambda p=proc: len(connected(p)) == 2, 15, message="the name's peers")
            assert set(connected(proc).values()) == {f"dns:{name}"}
        evicted_everywhere(first, [second, third], "k1")

        # A new pod: its record appears, and every pod dials it.
        host.write_hosts(hosts(name, 2, 3, 4, 5))
        fourth = member(5)
        for proc in procs:
            wait_for(lambda p=proc: len(connected(p)) == 3, 10, message="the new record dialled")
        evicted_everywhere(fourth, [first, second, third], "k2")

        # A pod that vanishes (killed with its node): unreachable, capping the others, until its
        # record is gone; then it is no longer expected.
        second.kill()
        wait_for(lambda: first.stats()["degraded"], 10, message="the vanished pod missed")
        host.write_hosts(hosts(name, 2, 4, 5))
        for proc in (first, third, fourth):
            wait_for(
                lambda p=proc: not p.stats()["degraded"], 10, message="its record gone: not missed"
            )
            assert "127.0.0.3:7934" not in {peer["address"] for peer in proc.stats()["peers"]}
        evicted_everywhere(third, [first, fourth], "k3")

        # The name stops resolving: the last good set stays, and the failure shows.
        host.write_hosts(netns.DEFAULT_HOSTS)
        wait_for(
            lambda: (
                "cannot resolve shop-mesh.test:7934" in (first.stats()["discovery_error"] or "")
            ),
            10,
            message="the failed lookup reported",
        )
        assert set(connected(first)) == {"127.0.0.4:7934", "127.0.0.5:7934"}
        evicted_everywhere(first, [third, fourth], "k4")
