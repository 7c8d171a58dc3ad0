"""The network namespaces of harness.netns: LANs whose multicast stays on them, cleaned up."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from harness import netns, wait_for
from harness.netns import Host, Lan
from tests.lan import require_namespaces

pytestmark = pytest.mark.mesh

GROUP, PORT = "239.255.77.7", 47777

# Joins GROUP on the host's own address, says so, then prints each datagram until stdin closes.
RECEIVER = f"""
import select, socket, struct, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("", {PORT}))
sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                socket.inet_aton("{GROUP}") + socket.inet_aton(sys.argv[1]))
print("joined", flush=True)
while sys.stdin not in select.select([sock, sys.stdin], [], [])[0]:
    data, (source, _) = sock.recvfrom(2048)
    print(data.decode(), source, flush=True)
"""

SENDER = f"""
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(sys.argv[1]))
sock.sendto(sys.argv[2].encode(), ("{GROUP}", {PORT}))
"""


@pytest.fixture(scope="module")
def network() -> Iterator[Lan]:
    require_namespaces()
    with netns.lan(2) as made:
        yield made


class Receiver:
    def __init__(self, host: Host) -> None:
        self.proc = subprocess.Popen(
            [*host.prefix, sys.executable, "-c", RECEIVER, host.address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "joined"

    def next_line(self, timeout: float = 10.0) -> str:
        """What it heard next ("" if nothing within ``timeout``)."""
        assert self.proc.stdout is not None
        if select.select([self.proc.stdout], [], [], timeout)[0]:
            return self.proc.stdout.readline().strip()
        return ""

    def stop(self) -> list[str]:
        """Whatever else it heard."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        rest = self.proc.stdout.read()
        self.proc.wait(10)
        return rest.splitlines()


def send(host: Host, text: str) -> None:
    host.run(sys.executable, "-c", SENDER, host.address, text).check_returncode()


def test_multicast_flows_between_the_hosts_of_a_lan_and_nowhere_else(network: Lan) -> None:
    root_interfaces = socket.if_nameindex()
    first, second = network.hosts
    with netns.lan(1) as elsewhere:
        near, far = Receiver(first), Receiver(elsewhere.hosts[0])
        try:
            send(second, "hello")
            assert near.next_line() == f"hello {second.address}"
            # Another LAN (the same group and port): had it got there, it would have by now.
            assert far.next_line(timeout=0.2) == ""
        finally:
            heard = near.stop() + far.stop()
        assert socket.if_nameindex() == root_interfaces
    assert heard == []
    assert socket.if_nameindex() == root_interfaces


def test_a_host_added_to_a_running_lan_reaches_the_others_and_goes_when_removed(
    network: Lan,
) -> None:
    listener = Receiver(network.hosts[0])
    newcomer = network.add_host()
    try:
        assert newcomer.address not in {host.address for host in network.hosts[:-1]}
        send(newcomer, "joined")
        assert listener.next_line() == f"joined {newcomer.address}"
    finally:
        listener.stop()
        network.remove_host(newcomer)
    assert newcomer.namespace not in netns.namespaces()
    assert not (netns.NETNS_ETC / newcomer.namespace).exists()


def test_a_lan_leaves_nothing_behind_even_when_the_test_fails() -> None:
    require_namespaces()
    with pytest.raises(RuntimeError), netns.lan(2) as made:  # noqa: PT012
        names = made.namespaces
        assert set(names) <= set(netns.namespaces())
        raise RuntimeError("the test failed")
    assert not set(names) & set(netns.namespaces())
    assert not any((netns.NETNS_ETC / name).exists() for name in names)


def test_the_namespaces_of_a_dead_run_are_removed_by_the_next() -> None:
    require_namespaces()
    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan = f"wm{gone.pid}-1-hub"
    netns.ip("netns", "add", orphan)
    netns.write_hosts(orphan, netns.DEFAULT_HOSTS)
    mine = f"wm{os.getpid()}-0-kept"
    netns.ip("netns", "add", mine)
    try:
        assert orphan in netns.remove_orphans()
        assert orphan not in netns.namespaces()
        assert not (netns.NETNS_ETC / orphan).exists()
        assert mine in netns.namespaces()  # this process is alive
    finally:
        netns.delete_namespace(orphan)
        netns.delete_namespace(mine)


LOOKUP = """
import socket, sys
for line in sys.stdin:
    found = socket.getaddrinfo(line.strip(), 80, socket.AF_INET, socket.SOCK_STREAM)
    print(" ".join(sorted({address[4][0] for address in found})), flush=True)
"""


def test_a_namespace_hosts_file_resolves_a_name_to_every_line_and_is_read_again() -> None:
    require_namespaces()
    lines = "".join(f"127.0.0.{n}\tservice\n" for n in (2, 3, 4))
    with netns.namespace(netns.DEFAULT_HOSTS + lines) as host:
        path = netns.NETNS_ETC / host.namespace / "hosts"
        inode = path.stat().st_ino
        proc = subprocess.Popen(
            [*host.prefix, sys.executable, "-c", LOOKUP],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            proc.stdin.write("service\n")
            proc.stdin.flush()
            assert proc.stdout.readline().split() == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
            host.write_hosts(netns.DEFAULT_HOSTS + "127.0.0.9\tservice\n")
            assert path.stat().st_ino == inode  # what the running process's mount shows
            proc.stdin.write("service\n")
            proc.stdin.flush()
            assert proc.stdout.readline().split() == ["127.0.0.9"]
        finally:
            proc.stdin.close()
            proc.wait(10)
        assert wait_for(lambda: not netns.processes_in([host.namespace]), 5)
