"""Build models by name and remember how, so a pruned model can be rebuilt from its base."""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from nas_headprune.errors import UnknownNameError

BASE_ATTR = "nas_headprune_base"
#: prefix of Hugging Face model names: ``hf:BertModel``, ``hf:ViTModel``
HF_PREFIX = "hf:"

# model-name prefixes provided by this project's own modules (registered with timm on import)
_PROJECT_MODELS = {"flatten_": "nas_headprune.models.flatten"}


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` that records ``{"name", "kwargs"}`` on the model.

    Names of this project's own models (``flatten_*``) are registered with timm first. Pretrained
    weights are never fetched from a hub here: load a checkpoint yourself.

    ``hf:<ModelClass>`` builds a Hugging Face ``transformers`` model (the ``hf`` extra) with random
    weights from its config: ``create_model("hf:BertModel", hidden_size=64, ...)`` is
    ``BertModel(BertConfig(hidden_size=64, ...))`` (``attn_implementation`` included). The record is
    :func:`hf_base_record` of the result: the full config, so the model can be rebuilt.
    """
    if name.startswith(HF_PREFIX):
        return _create_hf(name, kwargs)
    import timm

    for prefix, module in _PROJECT_MODELS.items():
        if name.startswith(prefix):
            importlib.import_module(module)
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise UnknownNameError(f"unknown model {name!r}{hint}")
    model = timm.create_model(name, pretrained=False, **kwargs)
    setattr(model, BASE_ATTR, {"name": name, "kwargs": dict(kwargs)})
    return model


# ------------------------------------------------------------------------------ Hugging Face
def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face ``transformers`` model (without importing transformers)."""
    return type(model).__module__.startswith("transformers.") and hasattr(model, "config")


def hf_base_record(model: nn.Module) -> dict[str, Any]:
    """``{"name": "hf:<ModelClass>", "kwargs": {config}}`` of a Hugging Face model, from its config
    (plus its attention implementation), so :func:`create_model` rebuilds the same architecture."""
    config: Any = model.config
    kwargs = {k: v for k, v in config.to_dict().items() if k != "transformers_version"}
    implementation = getattr(config, "_attn_implementation", None)
    if implementation:
        kwargs["attn_implementation"] = implementation
    return {"name": f"{HF_PREFIX}{type(model).__name__}", "kwargs": kwargs}


def example_inputs_for(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, Any] | None:
    """Example inputs that a blank image cannot replace, for rebuilding a space: token ids (zeros)
    and a full attention mask of length ``input_size[-1]`` for a Hugging Face model whose main input
    is ``input_ids``; ``None`` (a blank image of ``input_size``) for every other model."""
    if not is_hf_model(model) or getattr(model, "main_input_name", None) != "input_ids":
        return None
    import torch

    length = int(input_size[-1])
    return {
        "input_ids": torch.zeros(1, length, dtype=torch.long),
        "attention_mask": torch.ones(1, length, dtype=torch.long),
    }


def _create_hf(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import transformers
    except ImportError as exc:
        raise UnknownNameError(
            f"{name!r} is a Hugging Face model: install the extra with pip install 'nas-headprune[hf]' ({exc})"
        ) from exc
    cls = getattr(transformers, name[len(HF_PREFIX) :], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise UnknownNameError(
            f"unknown model {name!r}: transformers has no model class {name[len(HF_PREFIX) :]!r}"
        )
    config_class: Any = cls.config_class  # a PreTrainedConfig subclass
    model = cls(config_class(**kwargs))
    setattr(model, BASE_ATTR, hf_base_record(model))
    return model
