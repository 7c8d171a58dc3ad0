"""Where an invalidation's latency goes: the mesh's path from ``cache.set`` to the key gone,
cut into stages by timestamps taken inside the writer's and one receiver's node.

    .venv/bin/python -m benchmarks.latency_stages [--processes 2] [--rounds 300]

Stages (``time.monotonic_ns()``, one clock for every process of the host):

* write → send: on the writing thread, ``cache.set`` (local store, queueing), then taking the
  queue and building the op: the writing thread sends its own invalidation;
* send → receiver has the frame: encoding and HMAC, nng and TCP on loopback, and the receiving
  side taking it (a reader draining before its read, or the receiver thread); ``send()`` itself
  may return after the frame has arrived;
* receiver has the frame → checked: verifying, decoding, sequence and liveness checks;
* checked → key gone: applying to the local store.

The timestamps are taken by wrapping three methods of
:class:`django_warpmesh.node.MeshNode` in the worker processes: a few clock reads per message on
top of what ``benchmarks/run`` measures. Rounds are 2-4 ms apart, as in section 2, so each
invalidation travels alone.
"""

from __future__ import annotations

import argparse
import itertools
import random
import time
from typing import Any

STAGES = ("send", "batch", "checked")

# -- in the workers ------------------------------------------------------------------------------

_stamps: dict[str, list[int]] = {stage: [] for stage in STAGES}
_batch_started = [0]


def install() -> bool:
    """Wrap the node's methods so that each stage of a message leaves a timestamp."""
    from django_warpmesh.node import MeshNode

    if getattr(MeshNode, "_stages_installed", False):
        return True
    send_invalidate = MeshNode._send_invalidate
    handle_batch, track_invalidate = MeshNode._handle_batch, MeshNode._track_invalidate

    def timed_send_invalidate(self: MeshNode, ops: Any) -> None:
        _stamps["send"].append(time.monotonic_ns())
        send_invalidate(self, ops)

    def timed_handle_batch(self: MeshNode, batch: Any) -> None:
        _batch_started[0] = time.monotonic_ns()
        handle_batch(self, batch)

    def timed_track_invalidate(self: MeshNode, *args: Any) -> bool:
        _stamps["batch"].append(_batch_started[0])
        _stamps["checked"].append(time.monotonic_ns())
        return track_invalidate(self, *args)

    MeshNode._send_invalidate = timed_send_invalidate  # type: ignore[method-assign]
    MeshNode._handle_batch = timed_handle_batch  # type: ignore[method-assign]
    MeshNode._track_invalidate = timed_track_invalidate  # type: ignore[method-assign]
    MeshNode._stages_installed = True  # type: ignore[attr-defined]
    return True


def reset() -> bool:
    for stamps in _stamps.values():
        stamps.clear()
    return True


def stamps() -> dict[str, list[int]]:
    return _stamps


# -- in the parent -------------------------------------------------------------------------------


STAGE_NAMES = (
    "write",
    "send",
    "receiver has the frame",
    "checked",
    "key gone",
)


def measure(processes: int, rounds: int) -> list[tuple[str, list[float]]]:
    """Each stage's span (µs) per round, in order, then the total: ``(label, spans)``."""
    from benchmarks.latency import GAP_S, WAIT_S, open_system
    from benchmarks.procs import mesh_fleet

    with mesh_fleet(processes) as workers:
        for worker in workers:
            worker.call("latency_stages:install")
        open_system("mesh", workers, warmup=50)
        writer, receiver, *_ = workers
        for worker in workers:
            worker.call("latency_stages:reset")
        keys = [f"stage-{i}" for i in range(rounds)]
        receiver.call("transports:arm", system="mesh", keys=keys)
        gaps = [random.uniform(*GAP_S) for _ in keys]
        written = writer.call(
            "transports:write", timeout=60 + 2 * sum(gaps), system="mesh", keys=keys, gaps=gaps
        )
        gone = receiver.call(
            "transports:wait", timeout=WAIT_S + 30, system="mesh", keys=keys, within=WAIT_S
        )
        sent, got = writer.call("latency_stages:stamps"), receiver.call("latency_stages:stamps")

    # One frame per round, in order on both sides (rounds travel alone; heartbeats carry no
    # INVALIDATE). A round lost or coalesced would misalign them: refuse rather than guess.
    counts = {len(written), len(sent["send"]), len(got["checked"])}
    if len(counts) != 1 or any(gone[key] is None for key in keys):
        raise RuntimeError(f"the rounds did not line up one frame each ({counts})")
    points = [
        written,
        sent["send"],
        got["batch"],
        got["checked"],
        [gone[key] for key in keys],
    ]
    spans = [
        (
            f"{start_name} → {end_name}",
            [(end - start) / 1000 for start, end in zip(starts, ends, strict=True)],
        )
        for (start_name, starts), (end_name, ends) in itertools.pairwise(
            zip(STAGE_NAMES, points, strict=True)
        )
    ]
    total = [(end - start) / 1000 for start, end in zip(written, points[-1], strict=True)]
    return [*spans, ("total", total)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="fleet size (2 or more)")
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    if args.processes < 2 or args.rounds < 1:
        parser.error("--processes must be at least 2 and --rounds at least 1")

    from benchmarks.common import fmt_us, median, percentile

    try:
        stages = measure(args.processes, args.rounds)
    except RuntimeError as exc:
        raise SystemExit(f"{exc}; run again") from None
    print(f"{args.processes} processes, {args.rounds} rounds, the writer → one receiver:")
    print(f"{'stage':<52}{'p50':>10}{'p99':>10}")
    for label, spans in stages:
        print(f"{label:<52}{fmt_us(median(spans)):>10}{fmt_us(percentile(spans, 0.99)):>10}")


if __name__ == "__main__":
    main()
