"""What importing the package pulls in, checked in one fresh interpreter (nothing imported yet) that
takes the steps in order, each recording what it imported: the package itself, its lazy attributes,
the strategy registry with the NNI strategy modules, the space adapters. Modules only accumulate, so
a step that imports too much makes its own test fail, or a later one, never none."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

# one fresh interpreter imports the package and its plugins (about 9 s): started early under -n 2
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("lean_import")]

_STEPS = """
import json, sys

def heavy(*roots):
    return sorted(m for m in sys.modules if m.split('.')[0] in roots)

report = {}
import nas_headprune
report['package'] = {
    'mods': heavy('torch', 'timm', 'nni')
    + sorted(m for m in sys.modules if m.startswith(('nas_headprune.strategies', 'nas_headprune.spaces'))),
    'version': nas_headprune.__version__,
}
report['lazy'] = [nas_headprune.save_pruned.__module__, nas_headprune.build_space.__module__]

from nas_headprune.registry import STRATEGY_GROUP, list_plugins, strategy_class
names = [p.name for p in list_plugins(STRATEGY_GROUP)]
classes = [strategy_class(n).__name__ for n in ('evolution', 'nni_random')]
import nas_headprune.strategies.nni_space
report['nni'] = {'names': names, 'classes': classes, 'mods': heavy('nni', 'pytorch_lightning')}

from nas_headprune.registry import space_adapters
report['adapters'] = {'names': [a.name for a in space_adapters()], 'mods': heavy('transformers')}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def steps() -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _STEPS], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_import_is_cheap(steps) -> None:
    assert steps["package"]["mods"] == []
    assert steps["package"]["version"]


def test_lazy_attribute_resolves(steps) -> None:
    assert steps["lazy"] == ["nas_headprune.io", "nas_headprune.space.build"]


def test_registry_and_nni_strategy_modules_do_not_import_nni(steps) -> None:
    # NNI is an optional extra: only running an NNI strategy (or exporting a space) imports it
    assert {"evolution", "nni_random"} <= set(steps["nni"]["names"])
    assert steps["nni"]["classes"] == ["Evolution", "NniRandom"]
    assert steps["nni"]["mods"] == []


def test_hf_adapters_do_not_import_transformers(steps) -> None:
    # the Hugging Face adapters are listed without importing transformers (the hf extra)
    names = steps["adapters"]["names"]
    assert "hf_bert_attention" in names and "hf_vit_mlp" in names, names
    assert steps["adapters"]["mods"] == []
