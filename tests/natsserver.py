"""A private nats-server for the NATS transport's tests, and a peer process to talk to.

Each test starts its own server on a free loopback port, so that it can kill it (SIGKILL), hang
it (SIGSTOP) and start it again on the same port; never the machine's shared one.

``python -m tests.natsserver URL CHANNEL`` is a peer in a process of its own: it prints
``connected``/``lost`` as its transport says so, and publishes ``echo:<frame>`` for every frame
it receives, until its stdin closes.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from harness import ROOT, free_ports, wait_for

# Debian installs it in /usr/sbin, which is not on every user's PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


def nats_server_binary() -> str | None:
    return os.environ.get("WARPMESH_NATS_SERVER") or shutil.which("nats-server", path=SEARCH_PATH)


class NatsServer:
    """``nats-server`` on 127.0.0.1 and a port of its own, its log in ``directory``."""

    def __init__(self, binary: str, directory: Path, *options: str) -> None:
        self.binary = binary
        self.options = options  # more of nats-server's command line: --tls ...
        self.log = directory / "nats-server.log"
        (self.port,) = free_ports(1)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-a", "127.0.0.1", "-p", str(self.port), *self.options],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._ready, 10, interval=0.02, message=f"nats-server on port {self.port}")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"nats-server exited: {self.log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                return sock.recv(4).startswith(b"INFO")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: its clients' sockets close at once, as when its machine goes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case it was paused
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the sockets stay open and nothing answers, as with a hung server."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


class PeerProcess:
    """``python -m tests.natsserver``: a NatsTransport in another process, echoing frames."""

    def __init__(self, url: str, channel: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.natsserver", url, channel],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class _Printer:
    def transport_connected(self) -> None:
        print("connected", flush=True)

    def transport_lost(self, reason: str) -> None:
        print("lost", flush=True)


def main(url: str, channel: str) -> None:
    from django_warpmesh.node.transports.nats import NatsTransport

    transport = NatsTransport(url, channel, inbox_capacity=1000)
    transport.start(_Printer())
    try:
        while True:
            readable, _, _ = select.select([transport.recv_fd, sys.stdin], [], [], 5)
            if sys.stdin in readable and not sys.stdin.read(1):
                return  # the test is done with us
            for received in transport.receive(100):
                # Refused while the link is down: the test then sends again.
                transport.send(b"echo:" + received.data)
    finally:
        started = time.monotonic()
        transport.close(2.0)
        print(f"closed in {time.monotonic() - started:.2f}s", flush=True)


def required_binary() -> str:
    """The nats-server binary (and nats-py), or skip the test: except with CI=true, where a
    missing one fails it (CI must run the broker tests)."""
    import importlib.util

    import pytest

    binary = nats_server_binary()
    missing = None
    if importlib.util.find_spec("nats") is None:
        missing = "nats-py is not installed (pip install -e '.[test]')"
    elif binary is None:
        missing = "no nats-server binary (apt-get install nats-server, or WARPMESH_NATS_SERVER)"
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the NATS transport's tests, but {missing}")
        pytest.skip(missing)
    assert binary is not None
    return binary


@contextlib.contextmanager
def running_server(directory: Path) -> Iterator[NatsServer]:
    """A nats-server of the test's own, started, and killed at the end."""
    server = NatsServer(required_binary(), directory)
    server.start()
    try:
        yield server
    finally:
        server.kill()


if __name__ == "__main__":
    main(*sys.argv[1:])
