"""Network namespaces a test makes for itself: LANs of hosts, and hosts files per namespace.

Multicast (mDNS discovery) must never leave the machine or reach its real interfaces, and
tests that run at the same time must not hear each other. So a :class:`Lan` is made of
namespaces only: a hub namespace holding a Linux bridge, and one namespace per host, joined to
the bridge by a veth pair whose ends live in the hub and in the host (never in the root
namespace). Each host has ``lo`` up, its own IPv4 address on a /24 of its LAN, and a route for
224.0.0.0/4 through its veth, so multicast flows between the hosts of a LAN and nowhere else.

Names carry this process's pid (``wm<pid>-<lan>-...``), so parallel test runs never collide;
the namespaces of a run that was killed before it could clean up are removed by the next run
(:func:`remove_orphans`), by their dead pid.

``ip netns exec NS`` bind-mounts each file of ``/etc/netns/NS/`` over the same name in
``/etc``: :func:`write_hosts` gives a namespace its own ``/etc/hosts``. The file must exist
before the process starts (the mount is made then), and it is rewritten in place, never
replaced, so a running process sees each new version through its mount.

Needs root and ``ip`` (iproute2); :func:`namespaces_unavailable` says why not, else None.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

NETNS_ETC = Path("/etc/netns")
_PREFIX = "wm"
_NAME = re.compile(rf"^{_PREFIX}(\d+)-")
_lan_numbers = itertools.count(1)
DEFAULT_HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


class NamespaceError(RuntimeError):
    """An ``ip`` command failed; the message has its command line and its stderr."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if check and done.returncode != 0:
        raise NamespaceError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be made here (not root, no ``ip``, a kernel or a container
    that refuses), or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    name = f"{_PREFIX}{os.getpid()}-probe"
    try:
        ip("netns", "add", name)
        ip("-n", name, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1")
        ip("-n", name, "link", "add", "br0", "type", "bridge")
    except (NamespaceError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot make a network namespace with a veth pair and a bridge: {exc}"
    finally:
        ip("netns", "del", name, check=False)
    return None


def namespaces() -> list[str]:
    """The names of every network namespace ``ip netns`` knows."""
    return [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]


def remove_orphans() -> list[str]:
    """Delete the namespaces (and their ``/etc/netns`` directories) left by runs whose process
    is gone; the names removed."""
    removed = []
    for name in namespaces():
        match = _NAME.match(name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        delete_namespace(name)
        removed.append(name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def delete_namespace(name: str) -> None:
    """Remove a namespace (its veth ends go with it) and its ``/etc/netns`` directory; no error
    if either is gone already."""
    ip("netns", "del", name, check=False)
    shutil.rmtree(NETNS_ETC / name, ignore_errors=True)


def write_etc(namespace: str, filename: str, text: str) -> Path:
    """Make ``text`` the ``/etc/<filename>`` of processes run in ``namespace`` by ``ip netns
    exec``.

    Rewritten in place (one write, then a truncate to its length): replacing the file would
    leave the processes already running with the old inode under their bind mount.
    """
    directory = NETNS_ETC / namespace
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
    return path


def write_hosts(namespace: str, text: str) -> Path:
    """The ``/etc/hosts`` of ``namespace``: glibc reads it again at each lookup, so a running
    process's next ``getaddrinfo`` sees what was written. A line holds one address (and any
    number of names): a name on several lines resolves to all of their addresses, with ``multi
    on`` (which every namespace made here has in its ``/etc/host.conf``; with ``multi off`` only
    the first). They come in file order unless getaddrinfo's RFC 6724 sorting reorders them."""
    return write_etc(namespace, "hosts", text)


@dataclass(frozen=True)
class Host:
    """A namespace of its own: on a :class:`Lan` (``address`` its IPv4 address there, on
    ``interface``), or alone (:func:`namespace`, ``address`` 127.0.0.1)."""

    namespace: str
    address: str
    interface: str = "eth0"

    @property
    def prefix(self) -> list[str]:
        """What to put before a command to run it in this namespace."""
        return ["ip", "netns", "exec", self.namespace]

    def run(self, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in this namespace to its end, its output captured as text."""
        return subprocess.run(
            [*self.prefix, *argv], capture_output=True, text=True, check=False, timeout=timeout
        )

    def write_hosts(self, text: str) -> Path:
        return write_hosts(self.namespace, text)


def _new_namespace(name: str, hosts: str | None) -> None:
    ip("netns", "add", name)
    # Before any process starts in it: ``ip netns exec`` bind-mounts what exists then.
    write_hosts(name, DEFAULT_HOSTS if hosts is None else hosts)
    # Without "multi on" glibc returns only the first line of a name listed on several; the
    # machine's own host.conf may say either.
    write_etc(name, "host.conf", "multi on\n")
    ip("-n", name, "link", "set", "lo", "up")


class Lan:
    """A bridge in a hub namespace and the hosts joined to it; :meth:`close` (:func:`lan` calls
    it, whatever happened) removes every namespace of it."""

    def __init__(self, hosts: int = 0, *, hosts_file: str | None = None) -> None:
        number = next(_lan_numbers)
        pid = os.getpid()
        self.name = f"{_PREFIX}{pid}-{number}"
        # A /24 per LAN of this process; the pid spreads the LANs of parallel runs too.
        self.subnet = f"10.{64 + pid % 128}.{number % 256}"
        self.hub = f"{self.name}-hub"
        self.hosts: list[Host] = []
        self._hosts_file = hosts_file
        self._numbers = itertools.count(1)
        self._closed = False
        remove_orphans()
        try:
            _new_namespace(self.hub, None)
            ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            # Without IGMP snooping the bridge floods every group to every port, as a plain
            # switch does: no querier is needed for a group to get through.
            ip("-n", self.hub, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
            ip("-n", self.hub, "link", "set", "br0", "up")
            for _ in range(hosts):
                self.add_host()
        except BaseException:
            self.close()
            raise

    @property
    def namespaces(self) -> list[str]:
        return [self.hub, *(host.namespace for host in self.hosts)]

    def add_host(self, *, hosts_file: str | None = None) -> Host:
        """A new host namespace on this LAN, its veth up, its address .N of the LAN's /24.

        ``hosts_file``: its ``/etc/hosts`` (default: the LAN's, else localhost only).
        """
        number = next(self._numbers)
        if number > 253:
            raise NamespaceError(f"{self.name}: no more than 253 hosts on a LAN")
        host = Host(f"{self.name}-h{number}", f"{self.subnet}.{number}")
        port = f"h{number}"
        _new_namespace(host.namespace, hosts_file or self._hosts_file)
        self.hosts.append(host)
        # Both ends are made inside namespaces: the root namespace never has either.
        ip(
            "-n", self.hub, "link", "add", port, "type", "veth",
            "peer", "name", host.interface, "netns", host.namespace,
        )  # fmt: skip
        ip("-n", self.hub, "link", "set", port, "master", "br0", "up")
        ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.interface)
        ip("-n", host.namespace, "link", "set", host.interface, "up")
        ip("-n", host.namespace, "route", "add", "224.0.0.0/4", "dev", host.interface)
        return host

    def remove_host(self, host: Host) -> None:
        """Take ``host`` off the LAN: its namespace (and its processes' network) goes."""
        delete_namespace(host.namespace)
        self.hosts.remove(host)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for name in reversed(self.namespaces):
            delete_namespace(name)
        self.hosts.clear()


@contextlib.contextmanager
def lan(hosts: int, *, hosts_file: str | None = None) -> Iterator[Lan]:
    """A :class:`Lan` of ``hosts`` hosts, removed on the way out."""
    made = Lan(hosts, hosts_file=hosts_file)
    try:
        yield made
    finally:
        made.close()


@contextlib.contextmanager
def namespace(hosts_file: str | None = None) -> Iterator[Host]:
    """One namespace of its own, ``lo`` up and nothing else (every 127.x address of it is its
    own), ``hosts_file`` its ``/etc/hosts``; removed on the way out."""
    remove_orphans()
    host = Host(f"{_PREFIX}{os.getpid()}-{next(_lan_numbers)}-alone", "127.0.0.1", "lo")
    try:
        _new_namespace(host.namespace, hosts_file)
        yield host
    finally:
        delete_namespace(host.namespace)


def processes_in(names: Sequence[str]) -> list[int]:
    """The pids of the processes whose network namespace is one of ``names`` (``ip netns
    pids``): what a test left running there."""
    pids: list[int] = []
    for name in names:
        done = ip("netns", "pids", name, check=False)
        pids.extend(int(pid) for pid in done.stdout.split())
    return pids
