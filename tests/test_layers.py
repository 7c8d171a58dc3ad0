"""The layers depend one way: protocol <- node <- cache <- orm. The node knows no Django."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.cluster import ROOT

NO_DJANGO = "assert not any(m == 'django' or m.startswith('django.') for m in sys.modules), " + (
    "sorted(m for m in sys.modules if m.startswith('django'))"
)


@pytest.mark.parametrize(
    "module",
    [
        "django_warpmesh",
        "django_warpmesh.protocol",
        "django_warpmesh.node",
        "django_warpmesh.node.process",
    ],
)
def test_importing_the_node_imports_no_django(module: str) -> None:
    # A fresh interpreter: this one has Django loaded already.
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; import {module}; {NO_DJANGO}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
