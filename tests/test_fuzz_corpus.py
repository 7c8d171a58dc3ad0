"""The fuzzing corpus (tests/fuzz/corpus) replayed: each input is handled without a crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from django_warpmesh import protocol
from tests.fuzz.fuzz_frames import CORPUS, Harness

INPUTS = sorted(CORPUS.iterdir())


def test_the_corpus_is_there() -> None:
    assert len(INPUTS) >= 6


@pytest.mark.parametrize("path", INPUTS, ids=[path.name for path in INPUTS])
def test_corpus_input(path: Path) -> None:
    Harness(protocol).one_input(path.read_bytes())


def test_the_seeds_are_valid_frames() -> None:
    harness = Harness(protocol)
    for name, data in harness.seed_corpus().items():
        if name.endswith("-raw"):
            assert harness.codec.decode(data[1:]).origin == b"\x01" * protocol.NODE_ID_SIZE
