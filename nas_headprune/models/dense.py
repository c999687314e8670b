"""Dense (unpruned) model checkpoints: ``dense.json`` (model name, constructor arguments, data
set, measured accuracy) next to ``model.safetensors``. The embedded default model ships in this
format inside the package (``nas_headprune/assets/``)."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from nas_headprune.errors import CheckpointError, UnknownNameError

DENSE_FORMAT = "nas-headprune/dense-model"
EMBEDDED = {"embedded": "vit_fmnist", "embedded_vit": "vit_fmnist", "embedded_flatten": "flatten_fmnist"}


def embedded_dir(name: str = "embedded") -> Path:
    """Folder of a shipped model (``embedded`` is the default)."""
    key = EMBEDDED.get(name, name)
    path = Path(str(resources.files("nas_headprune") / "assets" / key))
    if not (path / "dense.json").is_file():
        raise UnknownNameError(
            f"no embedded model {name!r} in {path.parent}; shipped: " + ", ".join(sorted(EMBEDDED))
        )
    return path


def save_dense(model: nn.Module, directory: str | os.PathLike, record: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    from nas_headprune.atomic import atomic_path, atomic_write_json

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": DENSE_FORMAT})
    atomic_write_json(out / "dense.json", {"format": DENSE_FORMAT, **record})
    return out


def read_dense_record(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / "dense.json"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{directory} is not a dense model folder: dense.json is missing") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if record.get("format") != DENSE_FORMAT or "name" not in record:
        raise CheckpointError(f"{path} is not a nas-headprune dense model record")
    return record


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a ``.safetensors`` file or a ``torch.save``d state dict (``weights_only=True``)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    state: Any
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("model", "state_dict"):
                if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                    state = state[key]
    except FileNotFoundError as exc:
        raise CheckpointError(f"weights file {path} does not exist") from exc
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable weights file: {exc}") from exc
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path} does not fit the model: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )


def load_dense(directory: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    from nas_headprune.models.factory import create_model

    record = read_dense_record(directory)
    model = create_model(record["name"], **record.get("kwargs", {}))
    load_weights(model, Path(directory) / "model.safetensors")
    return model.eval(), record
