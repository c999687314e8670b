from __future__ import annotations

import json
import subprocess
import sys


def test_import_is_cheap() -> None:
    code = (
        "import sys, json, nas_headprune\n"
        "mods = [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'nni')"
        " or m.startswith(('nas_headprune.strategies', 'nas_headprune.spaces'))]\n"
        "print(json.dumps({'mods': mods, 'version': nas_headprune.__version__}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert report["mods"] == []
    assert report["version"]


def test_lazy_attribute_resolves() -> None:
    code = "import nas_headprune as n; print(n.save_pruned.__module__, n.build_space.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["nas_headprune.io", "nas_headprune.space"]
