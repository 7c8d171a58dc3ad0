"""The protocol's and the sender's hot paths, timed alone in this process (no sockets, no Django).

    .venv/bin/python -m benchmarks.micro [--rounds 7]

What the changelog's per-frame and per-key figures come from: decoding a one-key frame (what a
receiver does per frame before its checks), coalescing queued writes and splitting them into
frames (what the sender does per key), splitting one 200,000-key invalidation. Best of the
rounds, timeit-style; run it on two commits to compare them.
"""

from __future__ import annotations

import argparse
import os
import pickle
import time
from collections.abc import Callable

from django_warpmesh import protocol
from django_warpmesh.node import coalesce
from django_warpmesh.protocol import Frame, Kind, Op, OpCode

BUDGET = 256 * 1024  # the node's frame body budget (node.FRAME_BODY_BUDGET)


def best(call: Callable[[], object], repeat: int, rounds: int) -> float:
    """Best seconds per call over ``rounds`` rounds of ``repeat`` calls."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeat):
            call()
        times.append((time.perf_counter() - started) / repeat)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    codec = protocol.Codec(os.urandom(32))
    origin = os.urandom(protocol.NODE_ID_SIZE)
    one_key = codec.encode(
        Frame(
            Kind.INVALIDATE,
            origin,
            1,
            1,
            protocol.ops_body([Op("default", OpCode.DELETE, [":1:user:42"])]),
        )
    )
    queue = [
        ("default", OpCode.DELETE_UNLESS, (f":1:user:{i}", pickle.dumps({"id": i, "n": "Ada"})))
        for i in range(700)
    ]
    bulk = [Op("default", OpCode.DELETE, [f":1:bulk-{i}" for i in range(200_000)])]

    def send_queue() -> None:
        protocol.split_ops(coalesce(queue, set()), BUDGET)

    decode = best(lambda: codec.decode(one_key), 20_000, args.rounds)
    per_key = best(send_queue, 20, args.rounds) / len(queue)
    split = best(lambda: protocol.split_ops(bulk, BUDGET), 1, args.rounds)
    frames = len(protocol.split_ops(bulk, BUDGET))
    print(f"{'decode a one-key frame (verify, unpack, validate)':<52}{decode * 1e6:8.2f} µs")
    print(f"{'coalesce + split, per queued set (700 queued)':<52}{per_key * 1e6:8.2f} µs")
    print(f"{'split one invalidation of 200,000 keys':<52}{split * 1e3:8.1f} ms ({frames} frames)")


if __name__ == "__main__":
    main()
