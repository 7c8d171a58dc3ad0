"""The fuzzing corpora replayed: each input is handled without a crash.

``tests/fuzz/corpus``: the frame decoder alone (``fuzz_frames``). ``tests/fuzz/corpus_node``:
scripts of frames, pipes and ticks through a whole node (``fuzz_node``), with its checks after
every step: nothing escapes, a frame that fails verification changes nothing, the maps stay
bounded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from django_warpmesh import protocol
from tests.fuzz import fuzz_node
from tests.fuzz.fuzz_frames import CORPUS, Harness

INPUTS = sorted(CORPUS.iterdir())
NODE_INPUTS = sorted(fuzz_node.CORPUS.iterdir())


def test_the_corpus_is_there() -> None:
    assert len(INPUTS) >= 6
    assert len(NODE_INPUTS) >= 30


@pytest.mark.parametrize("path", INPUTS, ids=[path.name for path in INPUTS])
def test_corpus_input(path: Path) -> None:
    Harness(protocol).one_input(path.read_bytes())


def test_the_seeds_are_valid_frames() -> None:
    harness = Harness(protocol)
    for name, data in harness.seed_corpus().items():
        if name.endswith("-raw"):
            assert harness.codec.decode(data[1:]).origin == b"\x01" * protocol.NODE_ID_SIZE


def test_the_node_corpus() -> None:
    """Every script of the node's corpus, in one test (a few ms each)."""
    harness = fuzz_node.harness()
    for path in NODE_INPUTS:
        try:
            harness.one_input(path.read_bytes())
        except Exception as exc:
            raise AssertionError(f"{path.name}: {exc}") from exc


def test_the_node_harness_sees_what_it_checks() -> None:
    """The harness is not vacuous: its scripts get frames applied, copies dropped, junk
    rejected and connections hung up on, and a forged frame that did change state is caught."""
    harness = fuzz_node.harness()
    counts: dict[str, int] = {}
    with harness.small_bounds(), fuzz_node.quiet():
        for path in NODE_INPUTS:
            run = fuzz_node.Run(harness, fuzz_node.Draw(path.read_bytes()))
            run.run()
            counters = run.node.counters
            for name in ("invalidations_received", "duplicates", "gaps_detected", "pipes_dropped"):
                counts[name] = counts.get(name, 0) + getattr(counters, name)
            for reason, count in counters.rejected_by_reason.items():
                counts[reason] = counts.get(reason, 0) + count
    assert all(
        counts.get(name, 0) > 0
        for name in ("invalidations_received", "duplicates", "gaps_detected", "pipes_dropped")
    ), counts
    assert {"bad_mac", "malformed", "foreign_origin", "dropped_connection"} <= set(counts)

    class Leaky(fuzz_node.Run):
        """A node whose rejection binds a pipe, as the duplicate shortcut once did."""

        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            reject = self.node.receiver._reject

            def leaky(reason: str) -> None:
                reject(reason)
                self.node.links.pipe_owner[99] = b"x" * 8

            self.node.receiver._reject = leaky  # type: ignore[method-assign]

    # Node id, not ready; connect pipe 1; deliver one message on it: 40 random bytes.
    script = bytes([0x50, 255, 0, 0, 2, 0, 0, 9, 40]) + b"\x01" * 40
    with (
        harness.small_bounds(),
        fuzz_node.quiet(),
        pytest.raises(AssertionError, match="fails verification changed"),
    ):
        Leaky(harness, fuzz_node.Draw(script)).run()
