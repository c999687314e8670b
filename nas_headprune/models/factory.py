"""Build models by name and remember how, so a pruned model can be rebuilt from its base."""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from nas_headprune.errors import UnknownNameError

BASE_ATTR = "nas_headprune_base"

# model-name prefixes provided by this project's own modules (registered with timm on import)
_PROJECT_MODELS = {"flatten_": "nas_headprune.models.flatten"}


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` that records ``{"name", "kwargs"}`` on the model.

    Names of this project's own models (``flatten_*``) are registered with timm first. Pretrained
    weights are never fetched from a hub here: load a checkpoint yourself.
    """
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
