"""The wheel carries the mapped packages, presets, entry points and the embedded model."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nas_headprune.registry import SPACE_GROUP, STRATEGY_GROUP, DuplicatePluginError, _entries

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contents(tmp_path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    wheel = next(tmp_path.glob("nas_headprune-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "nas_headprune/__init__.py",
        "nas_headprune/py.typed",
        "nas_headprune/strategies/magnitude.py",
        "nas_headprune/spaces/timm_vit.py",
        "nas_headprune/configs/default.yaml",
        "nas_headprune/configs/ablations/fmnist_baselines.yaml",
        "nas_headprune/configs/ablations/components.yaml",
        "nas_headprune/strategies/nni_search.py",
        "nas_headprune/strategies/similarity_indicator/__init__.py",
        "nas_headprune/strategies/similarity_indicator/search.py",
        "nas_headprune/spaces/_hidden_units.py",
        "nas_headprune/space/build.py",
        "nas_headprune/evaluator/latency.py",
        "nas_headprune/configs/ablations/flagship_equal_steps.yaml",
        "nas_headprune/strategies/nni_space.py",
        "nas_headprune/assets/vit_fmnist/model.safetensors",
        "nas_headprune/assets/vit_fmnist/dense.json",
        "nas_headprune/assets/flatten_fmnist/model.safetensors",
    ):
        assert expected in names, expected
    assert not any(n.startswith(("strategies/", "spaces/", "configs/", "tests/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert (
        "[nas_headprune.strategies]" in text
        and "magnitude = nas_headprune.strategies.magnitude:Magnitude" in text
    )
    assert "[nas_headprune.spaces]" in text


def test_builtins_declared_as_entry_points() -> None:
    assert {"magnitude", "random", "taylor"} <= set(_entries(STRATEGY_GROUP))
    assert {"timm_attention", "timm_mlp", "timm_window_attention"} <= set(_entries(SPACE_GROUP))


def test_duplicate_plugin_name_is_an_error(monkeypatch) -> None:
    from importlib.metadata import EntryPoint

    import nas_headprune.registry as registry

    fake = [
        EntryPoint("magnitude", "pkg_a.mod:A", STRATEGY_GROUP),
        EntryPoint("magnitude", "pkg_b.mod:B", STRATEGY_GROUP),
    ]
    monkeypatch.setattr(registry, "entry_points", lambda group: [e for e in fake if e.group == group])
    with pytest.raises(
        DuplicatePluginError, match="'magnitude'.*published twice: pkg_a.mod:A and pkg_b.mod:B"
    ):
        registry.strategy_class("magnitude")


def test_shipped_models_load() -> None:
    import torch

    from nas_headprune.models.dense import embedded_dir, load_dense

    for name, family in (("embedded", "vit_tiny_patch16_224"), ("embedded_flatten", "flatten_swin_mnist")):
        model, record = load_dense(embedded_dir(name))
        assert record["name"] == family and record["test"]["top1"] > 80
        with torch.no_grad():
            assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
