"""The README's demo command, end to end: it narrates, exits 0 and leaves no process behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from harness import ROOT

pytestmark = pytest.mark.mesh


def test_the_demo_runs_and_cleans_up(tmp_path: os.PathLike[str]) -> None:
    env = {**os.environ, "DEMO_ROUNDS": "20"}
    env.pop("DATABASE_URL", None)
    env.pop("WARPMESH_ENABLED", None)
    result = subprocess.run(
        [sys.executable, "example_project/demo.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "They found each other through the peer table" in out
    assert re.search(r"B dropped its stale copy [\d.]+ ms after A's response", out)
    assert re.search(r"C: \d+\.\d\d \(from cache: False\)", out)
    assert "write -> gone on both: median" in out
    assert "healthy: 3 peer(s)" in out
    assert "All three instances stopped cleanly." in out
    for pid in map(int, re.findall(r"\(pid (\d+),", out)):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
