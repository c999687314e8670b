"""Structural rules of the code base, checked on its source."""

from __future__ import annotations

import ast
from pathlib import Path

import nas_headprune

ROOT = Path(nas_headprune.__file__).resolve().parent.parent
PACKAGES = ("nas_headprune", "strategies", "spaces")


def _classes():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    yield path.relative_to(ROOT), node


def _is_exception(node: ast.ClassDef) -> bool:
    names = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
    return bool(names) and all(n.endswith(("Error", "Exception")) for n in names)


def test_every_public_exception_class_lives_in_errors_py() -> None:
    outside = [
        f"{path}:{node.lineno} {node.name}"
        for path, node in _classes()
        if _is_exception(node) and not node.name.startswith("_") and str(path) != "nas_headprune/errors.py"
    ]
    assert outside == []


def test_the_rule_finds_exception_classes() -> None:
    """The check above sees the classes of errors.py, so an empty list there means something."""
    found = [
        node.name
        for path, node in _classes()
        if str(path) == "nas_headprune/errors.py" and _is_exception(node)
    ]
    assert {"UsageError", "BudgetError", "StoreError", "CheckpointError"} <= set(found)


def test_every_path_named_in_the_architecture_page_exists() -> None:
    import re

    text = (ROOT / "docs" / "architecture.md").read_text()
    paths = set(re.findall(r"`((?:nas_headprune|strategies|spaces|configs|tests|docs)/[\w./]*)`", text))
    assert len(paths) > 20  # the page names the modules it describes
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert missing == []
