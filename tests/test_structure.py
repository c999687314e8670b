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


def _module_files() -> dict[str, Path]:
    """Module name -> file, for the package and the plugins installed inside it."""
    where = {"nas_headprune": ROOT / "nas_headprune", "nas_headprune.strategies": ROOT / "strategies"}
    where["nas_headprune.spaces"] = ROOT / "spaces"
    for sub in ("evaluator", "models"):
        where[f"nas_headprune.{sub}"] = ROOT / "nas_headprune" / sub
    files = {}
    for package, folder in where.items():
        for path in folder.rglob("*.py"):
            parts = [*path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([package, *parts])] = path
    return files


def _import_graph():
    """Who imports whom among the project's modules: every import statement, at the top or inside a
    function, except under ``if TYPE_CHECKING:`` and inside a module's ``__getattr__`` (the lazy
    re-exports that keep old import paths working)."""
    import networkx as nx

    files = _module_files()
    graph = nx.DiGraph()
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        ignored = set()
        for node in ast.walk(tree):
            type_checking = isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
            lazy = isinstance(node, ast.FunctionDef) and node.name == "__getattr__" and node in tree.body
            if type_checking or lazy:
                ignored.update(id(sub) for sub in ast.walk(node))
        package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if id(node) in ignored:
                continue
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{up}.{node.module}" if node.module else up
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target in files and target != name:
                    graph.add_edge(name, target)
    return graph


def test_the_project_imports_one_way() -> None:
    import networkx as nx

    graph = _import_graph()
    # the graph is the real one: the layers' known edges are in it
    for edge in [
        ("nas_headprune.strategy", "nas_headprune.allocate"),
        ("nas_headprune.allocate", "nas_headprune.space"),
        ("nas_headprune.space.build", "nas_headprune.registry"),
        ("nas_headprune.pipeline.search", "nas_headprune.space.build"),
        (
            "nas_headprune.strategies.similarity_indicator.search",
            "nas_headprune.strategies.similarity_indicator.masks",
        ),
    ]:
        assert graph.has_edge(*edge), edge
    cycles = [" -> ".join(c) for c in nx.simple_cycles(graph)]
    assert cycles == []


def test_the_evaluator_imports_nothing_of_the_pipeline_layer() -> None:
    """The evaluator (surgery, reweight, fine-tune, metrics) sits below the pipeline: it never imports
    the run folder, the stages or the data loaders."""
    graph = _import_graph()
    above = (
        "nas_headprune.pipeline",
        "nas_headprune.runfolder",
        "nas_headprune.runner",
        "nas_headprune.data",
    )
    upward = [
        f"{a} -> {b}"
        for a, b in graph.edges
        if a.startswith("nas_headprune.evaluator") and b.startswith(above)
    ]
    assert graph.has_edge("nas_headprune.evaluator.finetune_epoch", "nas_headprune.jsonlog")
    assert upward == []
