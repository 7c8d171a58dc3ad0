"""Tests on a LAN of network namespaces (:mod:`harness.netns`): skipped where namespaces cannot
be made (not root, no ``ip``), and failed instead with ``CI=true``: CI runs as root and must run
them.

A module's fixture calls :func:`require_namespaces` first::

    @pytest.fixture(scope="module")
    def network() -> Iterator[Lan]:
        require_namespaces()
        with lan(3) as made:
            yield made
"""

from __future__ import annotations

import functools
import os

import pytest

from harness import netns


@functools.cache
def _problem() -> str | None:
    return netns.namespaces_unavailable()


def require_namespaces() -> None:
    """Skip the calling test when network namespaces cannot be made here; with CI=true, fail
    it instead."""
    problem = _problem()
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the tests on network namespaces, but: {problem}")
    pytest.skip(f"network namespaces unavailable: {problem}")
