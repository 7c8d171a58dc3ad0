"""The receiver thread of a real node, in this process: how often an idle node wakes."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from django_warpmesh.conf import parse
from django_warpmesh.node import TICK_IDLE_MS, MeshNode
from django_warpmesh.node_factory import StaticRegistry
from harness import free_ports, wait_for


@pytest.fixture
def idle_node() -> Iterator[MeshNode]:
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    config = parse({"BIND": "127.0.0.1", "PORT": port, "PORT_RANGE": 1, "PEERS": [address]})
    node = MeshNode(config, b"k" * 32, StaticRegistry([address]))
    node.start()
    try:
        wait_for(lambda: node.ready, 10, message="the node to be ready")
        yield node
    finally:
        node.stop()


def test_an_idle_receiver_wakes_only_for_its_ticks(idle_node: MeshNode) -> None:
    laps = 0
    tick_every = idle_node.receiver._tick_every_ms

    def counted() -> int:
        nonlocal laps
        laps += 1
        return tick_every()

    idle_node.receiver._tick_every_ms = counted  # type: ignore[method-assign]
    window = 1.5
    time.sleep(window)  # the behaviour measured is what the thread does while nothing happens
    # One lap per tick (each lap asks the cadence before and after its wait): a wait that
    # ended a fraction of a millisecond early and spun until the tick was due makes hundreds.
    ticks = window * 1000 / TICK_IDLE_MS
    assert laps <= 4 * (ticks + 2), laps
