"""The layers depend one way: protocol <- node <- cache <- orm. The node knows no Django."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness import ROOT

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


def test_importing_the_package_wires_nothing() -> None:
    """Signal receivers, fork and exit hooks and the node factory are connected by the app's
    ``ready()`` (or the first MeshCache), never by an import."""
    code = "; ".join(
        [
            "from django.conf import settings",
            "settings.configure()",
            "import django_warpmesh.cache, django_warpmesh.conf, django_warpmesh.checks",
            "import django_warpmesh.node_factory, django_warpmesh.contrib.cachalot",
            "import django_warpmesh.orm, django_warpmesh.observe, django_warpmesh.views",
            "from django.core.signals import setting_changed",
            "from django_warpmesh.node import process",
            "assert not process._hooked",
            "assert process._node_factory is None",
            "ours = [r for r in setting_changed.receivers if 'django_warpmesh' in str(r[0])]",
            "assert not ours, ours",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
