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

from nas_headprune.errors import CheckpointError, ConfigError, UnknownNameError

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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != DENSE_FORMAT or "name" not in record:
        raise CheckpointError(f"{path} is not a nas-headprune dense model record")
    if not isinstance(record["name"], str):
        raise CheckpointError(f"{path}: 'name' must be a model name (a string), not {record['name']!r}")
    if not isinstance(record.get("kwargs", {}), dict):
        raise CheckpointError(
            f"{path}: 'kwargs' must be a mapping of constructor arguments, not {record['kwargs']!r}"
        )
    return record


def _weights_only_refusal(exc: BaseException, path: str | os.PathLike) -> str | None:
    """Why ``torch.load(weights_only=True)`` refused a well-formed file holding other objects than
    tensors (e.g. ``Unsupported global: GLOBAL argparse.Namespace``; "" when torch does not say), or
    None for another failure: bytes that are no pickle at all raise the same exception type."""
    import pickle
    import zipfile

    text = str(exc)
    if not isinstance(exc, pickle.UnpicklingError) or "weights only load failed" not in text.lower():
        return None
    # torch.save writes a zip archive; an older, plain pickle is recognised by what it refers to
    if not zipfile.is_zipfile(path) and "global" not in text.lower():
        return None
    for line in text.splitlines():
        if "Unsupported global:" in line:
            return line[line.index("Unsupported global:") :].split(". Please")[0].strip()
    return ""


def read_torch_file(path: str | os.PathLike, pickled_hint: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; any failure is a :class:`CheckpointError`
    naming ``path``. ``pickled_hint`` (how to convert the file) ends the message when the file holds
    objects other than tensors, which a weights-only load refuses since unpickling them can run code."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: no such file") from exc
    except Exception as exc:  # torch.load raises many types for a damaged file; all mean the same here
        reason = _weights_only_refusal(exc, path)
        if reason is not None:
            raise CheckpointError(
                f"checkpoint {path} holds objects other than tensors, which a weights-only load refuses"
                f"{f' ({reason})' if reason else ''}. {pickled_hint}"
            ) from exc
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is corrupt or not a torch.save file "
            f"({type(exc).__name__}: {exc})"
        ) from exc


_PICKLED_HINT = (
    "If you trust the file, save its weights alone once: obj = torch.load(path, weights_only=False), "
    "then torch.save(obj.state_dict(), new_path) for a whole model or torch.save(obj['model'], new_path) "
    "for a training checkpoint, and point model.checkpoint at new_path."
)


def _check_state_dict(model: nn.Module, state: Any, path: Path) -> dict[str, Any]:
    """``state`` as a state dict that fits ``model`` exactly (names and shapes), else a
    :class:`CheckpointError` naming ``path`` and a few of the offending keys."""
    import torch

    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict (name -> tensor)")
    not_tensors = [str(k) for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if not_tensors:
        raise CheckpointError(
            f"{path} is not a state dict: entries that are not name -> tensor: {_few(not_tensors)}"
        )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: expected {tuple(v.shape)}, found {tuple(state[k].shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        if wrong:
            parts.append(f"wrong shape {_few(wrong)}")
        raise CheckpointError(f"{path} does not fit the model {type(model).__name__}: " + "; ".join(parts))
    return state


def _few(items: list[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f" ... ({len(items) - limit} more)" if len(items) > limit else "")


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load ``model.checkpoint``: a ``.safetensors`` file or a ``torch.save``d state dict
    (``weights_only=True``; ``{"model": ...}`` and ``{"state_dict": ...}`` are unwrapped).

    A path that does not exist is a :class:`ConfigError`; a file that is damaged, pickles other
    objects or does not fit ``model`` (names, shapes) is a :class:`CheckpointError`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"model.checkpoint: weights file {path} does not exist")
    state: Any
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    else:
        state = read_torch_file(path, _PICKLED_HINT)
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
    model.load_state_dict(_check_state_dict(model, state, path), strict=True)


def load_dense(directory: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    from nas_headprune.models.factory import create_model

    record = read_dense_record(directory)
    try:
        model = create_model(record["name"], **record.get("kwargs", {}))
    except (TypeError, ValueError) as exc:  # UsageError (an unknown name) is a ValueError too
        raise CheckpointError(
            f"cannot rebuild model {record['name']!r} from {Path(directory) / 'dense.json'}: {exc}"
        ) from exc
    weights = Path(directory) / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{directory} is not a dense model folder: model.safetensors is missing")
    load_weights(model, weights)
    return model.eval(), record
