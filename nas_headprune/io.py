"""Save and load pruned models: architecture as JSON, weights as safetensors (never pickle).

A saved model is a folder with ``pruned.json`` (format tag, base model name and constructor
arguments, input size, architecture) and ``model.safetensors``. Loading rebuilds the base model by
name, prunes it to the architecture and loads the weights, so nothing in the folder can run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from nas_headprune.atomic import atomic_path, atomic_write_text
from nas_headprune.errors import ArchitectureError, CheckpointError, UsageError

FORMAT = "nas-headprune/pruned-model"
FORMAT_VERSION = 1
ARCH_FILE = "pruned.json"
WEIGHTS_FILE = "model.safetensors"


def save_pruned(model: nn.Module, directory: str | os.PathLike, base: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a result of :func:`~nas_headprune.materialize`) to ``directory``.

    ``base`` (``{"name": ..., "kwargs": {...}}``) is taken from the model when it was built with
    :func:`nas_headprune.models.factory.create_model`; a Hugging Face model (loaded with
    ``from_pretrained``, say) is recorded by its config as ``{"name": "hf:<ModelClass>", "kwargs":
    {config}}``; pass ``base`` for models built another way.
    """
    from safetensors.torch import save_file

    from nas_headprune import __version__
    from nas_headprune.evaluator.materialize import META_ATTR
    from nas_headprune.models.factory import BASE_ATTR, hf_base_record, is_hf_model

    meta = getattr(model, META_ATTR, None)
    if meta is None:
        raise UsageError("save_pruned needs a model returned by materialize() (no pruning record found)")
    if not base and is_hf_model(model):
        base = hf_base_record(model)  # the pruned copy keeps the dense config, as it is now
    base = base or meta.get("base") or getattr(model, BASE_ATTR, None)
    if not base or "name" not in base:
        raise UsageError(
            "save_pruned cannot tell how to rebuild the base model: create it with "
            "nas_headprune.models.factory.create_model(name, **kwargs) or pass base={'name':..., 'kwargs':...}"
        )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "nas_headprune_version": __version__,
        "base": {"name": base["name"], "kwargs": base.get("kwargs", {})},
        "input_size": meta["input_size"],
        "skip_unsupported": bool(meta.get("skipped")),
        "architecture": meta["architecture"],
        "scaled": meta.get("scaled", []),
    }
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    atomic_write_text(out / ARCH_FILE, json.dumps(record, indent=2) + "\n")
    return out


def read_record(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / ARCH_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a saved pruned model: {ARCH_FILE} is missing")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a nas-headprune pruned model (format tag missing)")
    if record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {record.get('format_version')!r}; this version reads {FORMAT_VERSION}"
        )
    for key in ("base", "input_size", "architecture"):
        if key not in record:
            raise CheckpointError(f"{path} lacks the field {key!r}")
    _check_record_types(record, path)
    return record


def _check_record_types(record: dict[str, Any], path: Path) -> None:
    """Raise :class:`CheckpointError` naming the first field of ``record`` whose type is wrong."""

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."

    base = record["base"]
    problems = []
    if not isinstance(base, dict) or not isinstance(base.get("name"), str):
        problems.append(f"'base' must be {{'name': str, 'kwargs': {{...}}}}, not {short(base)}")
    elif not isinstance(base.get("kwargs", {}), dict):
        problems.append(
            f"'base.kwargs' must be a mapping of constructor arguments, not {short(base['kwargs'])}"
        )
    size = record["input_size"]
    if not isinstance(size, list) or not size or not all(is_int(n) and n > 0 for n in size):
        problems.append(
            f"'input_size' must be a list of positive integers such as [3, 224, 224], not {short(size)}"
        )
    arch = record["architecture"]
    if not isinstance(arch, dict) or not all(isinstance(k, str) and is_int(v) for k, v in arch.items()):
        problems.append(f"'architecture' must map dimension labels to integer widths, not {short(arch)}")
    scaled = record.get("scaled", [])
    if not isinstance(scaled, list) or not all(isinstance(label, str) for label in scaled):
        problems.append(f"'scaled' must be a list of dimension labels, not {short(scaled)}")
    if not isinstance(record.get("skip_unsupported", False), bool):
        problems.append(f"'skip_unsupported' must be true or false, not {record['skip_unsupported']!r}")
    if problems:
        raise CheckpointError(f"{path} is damaged: {problems[0]}")


def load_pruned(directory: str | os.PathLike, map_location: str = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_pruned`; the round trip is bit-exact."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from nas_headprune.evaluator.materialize import materialize
    from nas_headprune.models.factory import create_model, example_inputs_for
    from nas_headprune.space.build import build_space

    record = read_record(directory)
    base = record["base"]
    try:
        model = create_model(base["name"], **base.get("kwargs", {}))
    except (TypeError, ValueError) as exc:  # UsageError (an unknown name) is a ValueError too
        raise CheckpointError(f"cannot rebuild base model {base['name']!r} from {directory}: {exc}") from exc
    try:
        size = tuple(record["input_size"])
        space = build_space(
            model,
            size,
            example_inputs=example_inputs_for(model, size),
            skip_unsupported=record.get("skip_unsupported", False),
        )
    # an input size the model cannot run on: timm checks image sizes with assert, torch raises RuntimeError
    except (AssertionError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"cannot rebuild the search space of {base['name']!r} from {Path(directory) / ARCH_FILE} "
            f"(input_size {record['input_size']}): {exc}"
        ) from exc
    if any(str(label).endswith(":heads") for label in record["architecture"]):
        space = space.with_heads()  # saved from a search that could drop whole heads
    if any(width == 0 for width in record["architecture"].values()):
        try:  # saved with sublayers dropped whole (space.drop_sublayers)
            space = space.with_drops(model)
        except ArchitectureError as exc:
            raise CheckpointError(
                f"architecture in {Path(directory) / ARCH_FILE} drops a layer whole that cannot be dropped: {exc}"
            ) from exc
    try:
        selection = space.first_channels(record["architecture"])
    except ArchitectureError as exc:
        raise CheckpointError(
            f"architecture in {Path(directory) / ARCH_FILE} does not fit model {base['name']!r}: {exc}"
        ) from exc
    import torch

    scaled = record.get("scaled", [])
    unknown = [label for label in scaled if label not in space.dims]
    if unknown:
        raise CheckpointError(
            f"{Path(directory) / ARCH_FILE} names scales for unknown dimension {unknown[0]!r}"
        )
    # placeholder scales of 1 recreate explicit scale parameters; the weights file fills them in
    ones = {label: torch.ones(space.dims[label].heads, space.dims[label].max_width) for label in scaled}
    pruned = materialize(model, space, selection, scales=ones or None)
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        tensors = load_file(str(path), device=map_location)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    expected = pruned.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        if wrong:
            parts.append(f"shape mismatch {wrong[:3]}")
        raise CheckpointError(f"{path} does not match architecture in {ARCH_FILE}: " + "; ".join(parts))
    pruned.load_state_dict(tensors, strict=True)
    return pruned.to(map_location)
