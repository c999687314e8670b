"""The README's plugin example runs exactly as written, and stays under 40 lines."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest

from nas_headprune.testing import run_conformance

README = Path(__file__).resolve().parents[1] / "README.md"


def _plugin_source() -> str:
    text = README.read_text()
    section = text.split("## Writing a strategy", 1)[1]
    match = re.search(r"```python\n(# my_plugin\.py\n.*?)```", section, re.S)
    assert match, "README lost its plugin example"
    return match.group(1)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "my_plugin.py").write_text(_plugin_source())
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_plugin", None)
    yield importlib.import_module("my_plugin")
    sys.modules.pop("my_plugin", None)


def test_example_is_short() -> None:
    assert len(_plugin_source().strip().splitlines()) < 40


def test_example_passes_the_conformance_kit(plugin) -> None:
    run_conformance(plugin.MaskGradient)


def test_example_runs_from_the_cli(plugin, tmp_path, capsys) -> None:
    from test_cli import _search_args

    from nas_headprune.cli import main

    assert main(_search_args(tmp_path, "budget=0.7", strategy="my_plugin:MaskGradient")) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["strategy"] == "my_plugin:MaskGradient"
    assert result["config"]["strategy_options"]["batches"] == 2  # the plugin's own Config default
    assert result["pruned"]["macs"] <= 0.7 * result["dense"]["macs"]
    assert result["pruned"]["macs"] < result["dense"]["macs"]
