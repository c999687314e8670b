"""The ImageNet recipes (configs/imagenet_*.yaml) run end to end in their --quick form, on a tiny
image folder generated here, with a checkpoint file in the format each recipe expects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from nas_headprune.cli import main
from nas_headprune.config import load_config
from nas_headprune.models.factory import create_model
from nas_headprune.runner import weights_sha256

RECIPES = ["imagenet_deit_small", "imagenet_deit_base", "imagenet_swin_tiny", "imagenet_flatten_swin_tiny"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """train/ and val/ with 2 classes of random 40x40 RGB images (16 and 8 per class)."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("val", 8)):
        for cls in ("n01440764", "n01443537"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{cls}_{i}.JPEG", format="JPEG")
    return root


def _checkpoint(recipe: str, folder: Path) -> tuple[Path, str]:
    """The quick model's weights, saved as the recipe's users would bring them."""
    cfg = load_config(recipe, quick=True)
    torch.manual_seed(1)
    model = create_model(cfg.model.name, **cfg.model.kwargs)
    if cfg.model.checkpoint_format == "flatten_official":
        from test_flatten_models import to_official_swin

        path = folder / "official.pth"
        torch.save({"model": to_official_swin(model)}, path)
        return path, weights_sha256(model)
    path = folder / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, weights_sha256(model)


def test_recipes_state_what_the_user_must_set() -> None:
    for recipe in RECIPES:
        cfg = load_config(recipe)
        assert cfg.model.checkpoint is None and cfg.data.root is None  # the user's files
        assert cfg.data.name == "imagefolder" and cfg.data.img_size == 224
        assert cfg.finetune.distill and cfg.strategy == "similarity_indicator"
        assert cfg.budget in (0.7, 0.63)
        assert cfg.strategy_options["width_step"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_quick_form_runs_end_to_end(recipe, image_folder, tmp_path, capsys) -> None:
    checkpoint, digest = _checkpoint(recipe, tmp_path)
    out = tmp_path / "run"
    args = ["search", "--config", recipe, "--quick", "--out", str(out), "--no-progress"]
    args += ["--set", f"data.root={image_folder}", "--set", f"model.checkpoint={checkpoint}"]
    assert main(args) == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    cfg = load_config(recipe)
    assert result["budget"] == cfg.budget
    assert result["pruned"]["macs"] <= cfg.budget * result["dense"]["macs"]
    assert result["pruned"]["macs"] == result["pruned"]["analytic_macs"]
    assert result["finetune"]["steps"] == 2
    resolved = result["config"]
    assert resolved["finetune"]["mixup"] == 0.8 and resolved["data"]["auto_augment"] == "rand-m9-mstd0.5-inc1"
    # the checkpoint was loaded: the run's dense model is the saved one, not a fresh initialisation
    assert result["dense_sha256"] == digest
