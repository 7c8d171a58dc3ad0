"""How long a frame takes from NatsTransport.send() in one process to the inbox of another.

    python scripts/nats_latency.py [--frames N]

Starts a private nats-server, a receiving process and a sending process; the sender stamps each
frame with time.monotonic() (CLOCK_MONOTONIC, one clock for every process of the machine), the
receiver polls its inbox's fd as the node's receiver does and subtracts. Two runs: the sending
thread idle between frames (sleeping), then busy in pure Python (holding the GIL) between them,
which makes the transport's loop thread wait for the GIL at each of its wake-ups; and a burst
of 100 frames. ``--receiver-busy``: a thread of the receiving process busy in Python too.
"""

from __future__ import annotations

import argparse
import json
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from django_warpmesh.node.transports.nats import NatsTransport  # noqa: E402
from harness import wait_for  # noqa: E402
from tests.natsserver import NatsServer, nats_server_binary  # noqa: E402

CHANNEL = "warpmesh_latency"


class _Quiet:
    def transport_connected(self) -> None:
        pass

    def transport_lost(self, reason: str) -> None:
        pass


def receiver(url: str, count: int, busy_thread: bool) -> None:
    if busy_thread:  # another thread of the receiving process busy in Python all along
        threading.Thread(target=busy, args=(3600.0,), daemon=True).start()
    transport = NatsTransport(url, CHANNEL, inbox_capacity=100_000)
    transport.start(_Quiet())
    wait_for(lambda: transport.connected, 10)
    print("ready", flush=True)
    delays: dict[str, list[float]] = {}
    seen = 0
    while seen < count:
        select.select([transport.recv_fd], [], [], 10)
        now = time.monotonic()
        for frame in transport.receive(1000):
            kind, stamp = frame.split(b" ", 2)[:2]
            delays.setdefault(kind.decode(), []).append(now - float(stamp))
            seen += 1
    transport.close(2.0)
    print(json.dumps(delays), flush=True)


def busy(seconds: float) -> None:
    """Pure Python for ``seconds``: holds the GIL but for the interpreter's switch interval."""
    end = time.perf_counter() + seconds
    total = 0
    while time.perf_counter() < end:
        for i in range(200):
            total += i * i


def sender(url: str, frames: int, size: int) -> None:
    transport = NatsTransport(url, CHANNEL, inbox_capacity=10)
    transport.start(_Quiet())
    wait_for(lambda: transport.connected, 10)
    padding = b"x" * size
    for kind in ("idle", "busy"):
        for _ in range(frames):
            if kind == "idle":
                time.sleep(0.002)
            else:
                busy(0.002)
            assert transport.send(b"%s %r " % (kind.encode(), time.monotonic()) + padding)
    # One burst of 100 frames back to back, the thread busy afterwards.
    for _ in range(100):
        assert transport.send(b"burst %r " % time.monotonic() + padding)
    busy(0.5)
    transport.close(2.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--size", type=int, default=200, help="bytes of padding per frame")
    parser.add_argument(
        "--receiver-busy", action="store_true", help="a thread of the receiver busy in Python"
    )
    parser.add_argument("--role", choices=["receiver", "sender"])
    parser.add_argument("--url")
    args = parser.parse_args()
    total = 2 * args.frames + 100
    if args.role == "receiver":
        receiver(args.url, total, args.receiver_busy)
        return
    if args.role == "sender":
        sender(args.url, args.frames, args.size)
        return
    binary = nats_server_binary()
    assert binary, "no nats-server"
    server = NatsServer(binary, Path(tempfile.mkdtemp()))
    server.start()
    try:
        common = [sys.executable, __file__, "--url", server.url, "--frames", str(args.frames)]
        extra = ["--receiver-busy"] if args.receiver_busy else []
        recv = subprocess.Popen(
            [*common, *extra, "--role", "receiver"], stdout=subprocess.PIPE, text=True
        )
        assert recv.stdout is not None
        assert recv.stdout.readline().strip() == "ready"
        subprocess.run([*common, "--size", str(args.size), "--role", "sender"], check=True)
        delays = json.loads(recv.stdout.readline())
        recv.wait(10)
    finally:
        server.kill()
    print(
        f"{args.frames} frames per run, about {args.size + 25} bytes each, receiver "
        f"{'busy' if args.receiver_busy else 'idle'}, switch interval "
        f"{sys.getswitchinterval() * 1000:g} ms: send() -> the other process's inbox, in us"
    )
    for kind, values in delays.items():
        ordered = sorted(v * 1e6 for v in values)

        def pct(p: float, ordered: list[float] = ordered) -> float:
            return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

        print(
            f"  {kind:5} n={len(ordered):5} median={statistics.median(ordered):8.0f} "
            f"p90={pct(90):8.0f} p99={pct(99):8.0f} max={ordered[-1]:8.0f}"
        )


if __name__ == "__main__":
    main()
