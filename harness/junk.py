"""Strangers spraying junk at a mesh port: what a client without the key can make a node hold.

Used by ``tests/test_faults.py`` and by the benchmarks (section 3's junk-flood table). Loopback
only, and bounded: every client stops when the flood is stopped or its ``seconds`` are up.

Two kinds of client, each on a thread of its own (their sends release the GIL):

* **nng**: a ``Bus0`` socket dialling the node, sending random frames as fast as it can; nng
  dials again at once when the node hangs up on it.
* **raw**: a plain TCP connection that does nng's SP handshake (8 bytes: ``\\0SP\\0``, the Bus0
  protocol id, 2 reserved), then writes length-prefixed random frames and never reads what the
  node sends it (a stuck peer too); it connects again at once when the node hangs up.

``sizes`` cycles over the clients: a frame the node's receive limit refuses makes nng close
that connection at its 8-byte length, before anything is allocated for it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pynng

# nng's SP header for a Bus0 socket: "\0SP\0", protocol 7 << 4 | 0, two reserved bytes.
_SP_HEADER = b"\x00SP\x00" + struct.pack(">H", 0x70) + b"\x00\x00"


def rss_of(pid: int) -> int:
    """VmRSS of process ``pid`` in bytes (``/proc/<pid>/status``)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass
class Flood:
    address: str  # host:port of the node under attack
    kinds: Sequence[str] = ("nng", "nng", "raw", "raw")
    sizes: Sequence[int] = (1 << 20, 4096)
    seconds: float = 10.0  # a hard stop, whatever the caller does
    sent: list[int] = field(default_factory=list)  # frames sent, per client
    connections: list[int] = field(default_factory=list)  # connections made, per client
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self._deadline = time.monotonic() + self.seconds
        self.sent = [0] * len(self.kinds)
        self.connections = [0] * len(self.kinds)
        for index, kind in enumerate(self.kinds):
            size = self.sizes[index % len(self.sizes)]
            target = self._nng if kind == "nng" else self._raw
            thread = threading.Thread(target=target, args=(index, size), daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self._deadline

    def _nng(self, index: int, size: int) -> None:
        junk = os.urandom(size)
        with pynng.Bus0(send_buffer_size=64, reconnect_time_min=10, reconnect_time_max=50) as sock:
            sock.add_post_pipe_connect_cb(lambda pipe: self._connected(index))
            sock.dial(f"tcp://{self.address}", block=False)
            while self._running():
                try:
                    sock.send(junk, block=False)
                except pynng.TryAgain:
                    time.sleep(0.0002)  # no pipe up, or its queue full: yield, then again
                    continue
                self.sent[index] += 1

    def _connected(self, index: int) -> None:
        self.connections[index] += 1

    def _raw(self, index: int, size: int) -> None:
        host, port = self.address.rsplit(":", 1)
        frame = struct.pack(">Q", size) + os.urandom(size)
        while self._running():
            try:
                with socket.create_connection((host, int(port)), timeout=1) as sock:
                    self.connections[index] += 1
                    sock.sendall(_SP_HEADER)
                    while self._running():
                        sock.sendall(frame)
                        self.sent[index] += 1
            except OSError:
                time.sleep(0.001)  # hung up on, or refused: connect again


@contextlib.contextmanager
def flood(address: str, **options: object) -> Iterator[Flood]:
    running = Flood(address, **options)  # type: ignore[arg-type]
    running.start()
    try:
        yield running
    finally:
        running.stop()
