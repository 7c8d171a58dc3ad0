"""The distribution: ``python -m build`` makes an sdist and a wheel that carry everything."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from harness import ROOT

pytestmark = pytest.mark.packaging

SHIPPED = [
    "django_warpmesh/__init__.py",
    "django_warpmesh/py.typed",
    "django_warpmesh/migrations/0001_initial.py",
    "django_warpmesh/templates/django_warpmesh/dashboard.html",
    "django_warpmesh/static/django_warpmesh/dashboard.js",
    "django_warpmesh/management/commands/mesh_status.py",
]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    return out


def test_the_wheel_carries_code_migrations_templates_and_static_files(dist: Path) -> None:
    (wheel,) = dist.glob("django_warpmesh-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in SHIPPED:
        assert path in names, path
    unshipped = ("tests/", "example_project/", "benchmarks/", "harness/")
    assert not any(name.startswith(unshipped) for name in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    for requirement in (
        "Requires-Dist: django>=5.2",
        "Requires-Dist: msgpack",
        "Requires-Dist: pynng",
    ):
        assert requirement in text
    assert "License-Expression: MIT" in text


def test_the_sdist_carries_the_package_and_its_readme(dist: Path) -> None:
    (sdist,) = dist.glob("django_warpmesh-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for path in [*SHIPPED, "README.md", "pyproject.toml"]:
        assert path in names, path


def test_the_wheel_installs_and_imports_on_its_own(dist: Path, tmp_path: Path) -> None:
    (wheel,) = dist.glob("django_warpmesh-*.whl")
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    # Imported from the installed copy, not the source tree, with only its dependencies around.
    probe = (
        "import django_warpmesh, pathlib; "
        "root = pathlib.Path(django_warpmesh.__file__).parent; "
        f"assert str(root).startswith({str(target)!r}), root; "
        "assert (root / 'templates/django_warpmesh/dashboard.html').exists(); "
        "print(django_warpmesh.__version__)"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {probe}"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.stdout.strip() == "0.1.0"
