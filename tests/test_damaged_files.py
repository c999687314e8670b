"""Damaged, foreign or tampered model files end in one error naming the file, never a traceback.

Loaders covered here: saved pruned models (``load_pruned``), dense model folders (``load_dense``),
``model.checkpoint`` weights (``load_weights``) and official FLatten checkpoints. The fine-tune and
similarity_indicator checkpoints are tested next to their loops (test_finetune.py,
test_similarity_indicator.py).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from zoo import MODEL_ZOO, input_size, make_model

from nas_headprune import load_pruned, save_pruned
from nas_headprune.errors import CheckpointError, ConfigError
from nas_headprune.evaluator.materialize import materialize
from nas_headprune.models import flatten  # noqa: F401  (registers the FLatten models with timm)
from nas_headprune.models.dense import load_dense, load_weights, save_dense
from nas_headprune.models.flatten import load_official_checkpoint
from nas_headprune.space import build_space

# ------------------------------------------------------------------------------------ damage kinds


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\xff\xfe\x00 not a model file \x80" * 8)


def _edit_json(edit: Callable[[Any], Any]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))

    return damage


def _edit_record(**changes: Any) -> Callable[[Path], None]:
    return _edit_json(lambda record: {**record, **changes})


def _drop(key: str) -> Callable[[Path], None]:
    return _edit_json(lambda record: {k: v for k, v in record.items() if k != key})


def _edit_safetensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path))

    return damage


def _drop_first_tensor(tensors: dict[str, torch.Tensor]) -> None:
    del tensors[sorted(tensors)[0]]


def _reshape_a_matrix(tensors: dict[str, torch.Tensor]) -> None:
    key = next(k for k in sorted(tensors) if tensors[k].ndim == 2)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])


def _change_first_width(arch: dict[str, int]) -> dict[str, int]:
    label = next(k for k, v in arch.items() if v > 1)
    return {**arch, label: arch[label] - 1}


# ------------------------------------------------------------------------- saved pruned models


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = make_model("vit")
    space = build_space(model, input_size("vit"))
    pruned = materialize(model, space, space.first_channels(space.sample(3)))
    return save_pruned(pruned, tmp_path_factory.mktemp("pruned") / "model")


PRUNED_DAMAGE: dict[str, tuple[str, Callable[[Path], None], str]] = {
    # name: (file, damage, what the message says after the path)
    "json-empty": ("pruned.json", _empty, "is not valid JSON"),
    "json-truncated": ("pruned.json", _truncated, "is not valid JSON"),
    "json-garbage": ("pruned.json", _garbage, "is not valid JSON"),
    "json-list": ("pruned.json", _edit_json(lambda r: [r]), "is not a nas-headprune pruned model"),
    "json-no-architecture": ("pruned.json", _drop("architecture"), "lacks the field 'architecture'"),
    "base-not-a-dict": ("pruned.json", _edit_record(base="vit"), "'base' must be"),
    "kwargs-not-a-dict": (
        "pruned.json",
        _edit_json(lambda r: {**r, "base": {**r["base"], "kwargs": [1, 2]}}),
        "'base.kwargs' must be a mapping",
    ),
    "unknown-base-model": (
        "pruned.json",
        _edit_json(lambda r: {**r, "base": {**r["base"], "name": "no_such_model"}}),
        "cannot rebuild base model 'no_such_model'",
    ),
    "input-size-not-a-list": ("pruned.json", _edit_record(input_size="28x28"), "'input_size' must be"),
    "input-size-tampered": (
        "pruned.json",
        _edit_record(input_size=[1, 32, 32]),
        "cannot rebuild the search space",
    ),
    "architecture-not-a-dict": ("pruned.json", _edit_record(architecture=[4, 8]), "'architecture' must map"),
    "width-not-an-int": (
        "pruned.json",
        _edit_json(lambda r: {**r, "architecture": {k: str(v) for k, v in r["architecture"].items()}}),
        "'architecture' must map",
    ),
    "width-tampered": (
        "pruned.json",
        _edit_json(lambda r: {**r, "architecture": _change_first_width(r["architecture"])}),
        "does not match architecture in pruned.json: shape mismatch",
    ),
    "scaled-not-a-list": ("pruned.json", _edit_record(scaled=7), "'scaled' must be a list"),
    "weights-empty": ("model.safetensors", _empty, "is not a readable safetensors file"),
    "weights-truncated": ("model.safetensors", _truncated, "is not a readable safetensors file"),
    "weights-garbage": ("model.safetensors", _garbage, "is not a readable safetensors file"),
    "weights-missing-tensor": ("model.safetensors", _edit_safetensors(_drop_first_tensor), "missing"),
    "weights-wrong-shape": ("model.safetensors", _edit_safetensors(_reshape_a_matrix), "shape mismatch"),
}


@pytest.mark.parametrize("kind", sorted(PRUNED_DAMAGE))
def test_damaged_pruned_model(pruned_dir: Path, tmp_path: Path, kind: str) -> None:
    name, damage, message = PRUNED_DAMAGE[kind]
    folder = Path(shutil.copytree(pruned_dir, tmp_path / "model"))
    damage(folder / name)
    with pytest.raises(CheckpointError, match=re.escape(str(folder))) as info:
        load_pruned(folder)
    assert message in str(info.value)


# --------------------------------------------------------------------------- dense model folders


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    name, kwargs, _ = MODEL_ZOO["vit"]
    out = tmp_path_factory.mktemp("dense") / "model"
    return save_dense(make_model("vit"), out, {"name": name, "kwargs": kwargs})


DENSE_DAMAGE: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "json-empty": ("dense.json", _empty, "is not valid JSON"),
    "json-garbage": ("dense.json", _garbage, "is not valid JSON"),
    "json-list": ("dense.json", _edit_json(lambda r: [r]), "is not a nas-headprune dense model record"),
    "json-no-name": ("dense.json", _drop("name"), "is not a nas-headprune dense model record"),
    "name-not-a-string": ("dense.json", _edit_record(name=["vit"]), "'name' must be a model name"),
    "kwargs-not-a-dict": ("dense.json", _edit_record(kwargs="img_size=28"), "'kwargs' must be a mapping"),
    "unknown-model": (
        "dense.json",
        _edit_record(name="no_such_model"),
        "cannot rebuild model 'no_such_model'",
    ),
    "kwargs-tampered": (
        "dense.json",
        _edit_json(lambda r: {**r, "kwargs": {**r["kwargs"], "embed_dim": 64}}),
        "wrong shape",
    ),
    "weights-truncated": ("model.safetensors", _truncated, "is not a readable safetensors file"),
    "weights-garbage": ("model.safetensors", _garbage, "is not a readable safetensors file"),
    "weights-missing-tensor": ("model.safetensors", _edit_safetensors(_drop_first_tensor), "missing"),
    "weights-wrong-shape": ("model.safetensors", _edit_safetensors(_reshape_a_matrix), "wrong shape"),
    "weights-deleted": ("model.safetensors", lambda path: path.unlink(), "model.safetensors is missing"),
}


@pytest.mark.parametrize("kind", sorted(DENSE_DAMAGE))
def test_damaged_dense_model(dense_dir: Path, tmp_path: Path, kind: str) -> None:
    name, damage, message = DENSE_DAMAGE[kind]
    folder = Path(shutil.copytree(dense_dir, tmp_path / "model"))
    damage(folder / name)
    with pytest.raises(CheckpointError, match=re.escape(str(folder))) as info:
        load_dense(folder)
    assert message in str(info.value)


# ---------------------------------------------------------------------- model.checkpoint weights


def _state(model_key: str = "vit") -> dict[str, torch.Tensor]:
    return make_model(model_key).state_dict()


def _wrong_shapes() -> dict[str, torch.Tensor]:
    state = _state()
    key = next(k for k, v in state.items() if v.ndim == 2)
    state[key] = torch.zeros(3, 5)
    return state


WEIGHTS_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty": (_empty, "corrupt or not a torch.save file"),
    "garbage": (_garbage, "corrupt or not a torch.save file"),
    "truncated": (
        lambda p: (torch.save(_state(), p), _truncated(p)),
        "corrupt or not a torch.save file",
    ),
    "pickled-objects": (
        lambda p: torch.save({"model": _state(), "args": argparse.Namespace(lr=1.0)}, p),
        "weights_only=False",
    ),
    "pickled-module": (lambda p: torch.save(make_model("vit"), p), "obj.state_dict()"),
    "not-a-dict": (lambda p: torch.save([torch.zeros(3)], p), "holds a list, not a state dict"),
    "values-not-tensors": (lambda p: torch.save({"blocks": 3}, p), "not name -> tensor: blocks"),
    "missing-tensor": (
        lambda p: torch.save({k: v for k, v in _state().items() if k != "cls_token"}, p),
        "missing cls_token",
    ),
    "wrong-shape": (
        lambda p: torch.save(_wrong_shapes(), p),
        "wrong shape blocks.0.attn.qkv.weight: expected (144, 48), found (3, 5)",
    ),
    "other-model": (lambda p: torch.save(_state("swin"), p), "unexpected"),
}


@pytest.mark.parametrize("kind", sorted(WEIGHTS_DAMAGE))
def test_damaged_model_checkpoint(tmp_path: Path, kind: str) -> None:
    damage, message = WEIGHTS_DAMAGE[kind]
    path = tmp_path / "weights.pt"
    path.write_bytes(b"")
    damage(path)
    model = make_model("vit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=re.escape(str(path))) as info:
        load_weights(model, path)
    assert message in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # left untouched


def test_model_checkpoint_that_does_not_exist_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.checkpoint: .*nope\.pt does not exist"):
        load_weights(make_model("vit"), tmp_path / "nope.pt")


def test_wrapped_state_dicts_still_load(tmp_path: Path) -> None:
    state = _state()
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pt")
    model = make_model("vit", seed=1)
    load_weights(model, tmp_path / "wrapped.pt")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------- official FLatten checkpoints


def _flatten_state() -> dict[str, torch.Tensor]:
    return timm.create_model("flatten_deit_mnist").state_dict()


FLATTEN_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty": (_empty, "corrupt or not a torch.save file"),
    "garbage": (_garbage, "corrupt or not a torch.save file"),
    "truncated": (lambda p: (torch.save(_flatten_state(), p), _truncated(p)), "corrupt"),
    "not-a-dict": (lambda p: torch.save(torch.zeros(3), p), "holds a Tensor, not a state dict"),
    "values-not-tensors": (
        lambda p: torch.save({**_flatten_state(), "pos_drop.p": 0.1}, p),
        "not name -> tensor: 'pos_drop.p'",
    ),
}


@pytest.mark.parametrize("kind", sorted(FLATTEN_DAMAGE))
def test_damaged_official_flatten_checkpoint(tmp_path: Path, kind: str) -> None:
    damage, message = FLATTEN_DAMAGE[kind]
    path = tmp_path / "official.pth"
    path.write_bytes(b"")
    damage(path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))) as info:
        load_official_checkpoint(timm.create_model("flatten_deit_mnist"), path)
    assert message in str(info.value)
