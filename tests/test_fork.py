"""nng aborts a forked child whose parent had opened a socket: we must never let it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness import ROOT, free_ports

pytestmark = pytest.mark.mesh


def run_fork(mode: str) -> tuple[dict[str, object], dict[str, object], str]:
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    config = {"BIND": "127.0.0.1", "PORT": port, "PORT_RANGE": 8, "PEERS": [address]}
    result = subprocess.run(
        [sys.executable, "-m", "tests.forkproc", mode],
        cwd=ROOT,
        env={**os.environ, "WARPMESH_JSON": json.dumps(config)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    child, parent = (json.loads(line) for line in result.stdout.splitlines())
    return child, parent, result.stderr


def test_child_of_a_process_that_opened_the_socket_is_relayed_by_it() -> None:
    child, parent, stderr = run_fork("after-open")
    assert parent["child_status"] == 0  # not aborted
    assert parent["parent_value"] == "parent"
    assert child["child_value"] == "child"
    # What the parent cached was kept coherent by the parent's node, not the child's: the
    # child starts empty.
    assert child["had_parent_value"] is False
    stats = child["stats"]
    assert isinstance(stats, dict)
    assert stats["enabled"] is True
    assert "relayed through its node" in stats["reason"]
    assert stats["degraded"] is False
    assert "its invalidations are relayed through that process's node" in stderr


def test_a_parent_socket_collected_in_the_child_does_not_abort_it() -> None:
    # pynng closes a socket when it is collected, and any nng call aborts a forked child.
    child, parent, _ = run_fork("garbage")
    assert parent["child_status"] == 0  # not aborted (6: SIGABRT)
    assert child["child_value"] == "child"


def test_child_of_a_process_whose_node_stopped_caches_locally_capped() -> None:
    child, parent, stderr = run_fork("after-stop")
    assert parent["child_status"] == 0  # not aborted
    assert child["child_value"] == "child"
    stats = child["stats"]
    assert isinstance(stats, dict)
    assert stats["enabled"] is False
    assert "forked" in stats["reason"]
    assert stats["degraded"] is True
    assert "nng cannot be used after fork" in stderr


def test_child_forked_before_first_use_gets_its_own_node() -> None:
    child, parent, _ = run_fork("before-open")
    assert parent["child_status"] == 0
    stats = child["stats"]
    assert isinstance(stats, dict)
    assert stats["enabled"] is True
    assert child["child_value"] == "child"
