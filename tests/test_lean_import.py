from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def _run_json(code: str) -> Any:
    """Run ``code`` in a fresh interpreter (nothing imported yet) and parse the JSON it prints."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_import_is_cheap() -> None:
    code = (
        "import sys, json, nas_headprune\n"
        "mods = [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'nni')"
        " or m.startswith(('nas_headprune.strategies', 'nas_headprune.spaces'))]\n"
        "print(json.dumps({'mods': mods, 'version': nas_headprune.__version__}))\n"
    )
    report = _run_json(code)
    assert report["mods"] == []
    assert report["version"]


def test_lazy_attribute_resolves() -> None:
    code = "import nas_headprune as n; print(n.save_pruned.__module__, n.build_space.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["nas_headprune.io", "nas_headprune.space.build"]


def test_registry_and_nni_strategy_modules_do_not_import_nni() -> None:
    # NNI is an optional extra: only running an NNI strategy (or exporting a space) imports it
    code = (
        "import sys, json\n"
        "from nas_headprune.registry import STRATEGY_GROUP, list_plugins, strategy_class\n"
        "names = [p.name for p in list_plugins(STRATEGY_GROUP)]\n"
        "classes = [strategy_class(n).__name__ for n in ('evolution', 'nni_random')]\n"
        "import nas_headprune.strategies.nni_space\n"
        "mods = [m for m in sys.modules if m.split('.')[0] in ('nni', 'pytorch_lightning')]\n"
        "print(json.dumps({'names': names, 'classes': classes, 'mods': mods}))\n"
    )
    report = _run_json(code)
    assert {"evolution", "nni_random"} <= set(report["names"])
    assert report["classes"] == ["Evolution", "NniRandom"]
    assert report["mods"] == []
