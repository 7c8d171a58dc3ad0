"""Sizes a maintainer can hold in their head: modules, classes and functions of the package."""

from __future__ import annotations

import ast
from pathlib import Path

from harness import ROOT

PACKAGE = ROOT / "django_warpmesh"
MODULE_LINES, CLASS_LINES, FUNCTION_LINES = 500, 400, 60


def sources() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if "migrations" not in p.parts]


def test_no_module_class_or_function_outgrows_its_bound() -> None:
    too_long = []
    for path in sources():
        text = path.read_text(encoding="utf-8")
        name = str(path.relative_to(ROOT))
        if text.count("\n") > MODULE_LINES:
            too_long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                bound = CLASS_LINES if isinstance(node, ast.ClassDef) else FUNCTION_LINES
                if size > bound:
                    too_long.append(f"{name}:{node.lineno} {node.name}: {size} lines")
    assert not too_long, "\n".join(too_long)
