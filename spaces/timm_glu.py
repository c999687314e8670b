"""Space adapters for timm's gated MLPs, ``GluMlp`` and ``SwiGLU`` (EVA02, SwiGLU ViTs).

A hidden unit ``j`` is a gate row and a value row of the first projection, multiplied together
after the activation, and column ``j`` of ``fc2``; the three are kept or removed together:

* ``GluMlp`` (and ``SwiGLUPacked``): one ``fc1`` with ``2m`` rows, chunked in two halves; unit ``j``
  is rows ``j`` and ``m + j`` (which half gates is ``gate_last``; both are sliced alike);
* ``SwiGLU``: ``fc1_g`` (gate) and ``fc1_x`` (value), unit ``j`` is row ``j`` of each.

Masks multiply the input of ``fc2`` (after the product), which is exact for any activation.
Refused: a ``norm`` over the hidden units (``scale_mlp``, EVA02's sub-LN in the MLP) normalises
each token over all of them, so removing one changes the mean and variance of the rest; and
``GluMlp`` with 1x1 convolutions (``use_conv``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, cast

import torch
from timm.layers import GluMlp, SwiGLU
from torch import nn

from nas_headprune.space import DimSpec, LayerSpace, Slot, dim_label

from ._fused_qkv import new_linear
from .timm_vit import TimmMlpAdapter

_NORM_REASON = "a norm over the hidden units (scale_mlp) couples them"


class _GatedMlpAdapter(TimmMlpAdapter):
    """Shared description and cost: ``gates`` input projections of ``hidden`` rows each."""

    #: names of the input projections, in the order their rows are stacked (one Linear for GluMlp)
    inputs: tuple[str, ...]

    def check(self, module: nn.Module) -> str | None:
        if not all(isinstance(module.get_submodule(name), nn.Linear) for name in self.inputs):
            return "use_conv GluMlp (1x1 convolutions) is not supported"
        if not isinstance(module.norm, nn.Identity):
            return _NORM_REASON
        return None

    def input_dim(self, module: nn.Module) -> int:
        return cast(nn.Linear, module.get_submodule(self.inputs[0])).in_features

    def hidden(self, module: nn.Module) -> int:
        return cast(nn.Linear, module.fc2).in_features

    def describe(self, label: str, module: nn.Module, tokens: int) -> LayerSpace:
        fc1 = cast(nn.Linear, module.get_submodule(self.inputs[0]))
        fc2 = cast(nn.Linear, module.fc2)
        meta: dict[str, Any] = {
            "tokens": tokens,
            "in_dim": fc1.in_features,
            "out_dim": fc2.out_features,
            "gated": True,
            "fc1_bias": fc1.bias is not None,
            "fc2_bias": fc2.bias is not None,
            "extra_params": 0,
        }
        dims = {"hidden": DimSpec(dim_label(label, "hidden"), "hidden", 1, self.hidden(module))}
        layer = LayerSpace(label, self.name, self.kind, dims, meta, self)
        meta["extra_params"] = sum(p.numel() for p in module.parameters()) - self.params(
            layer, layer.dense_widths()
        )
        return layer

    def macs(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        m = layer.meta
        h = widths["hidden"]
        return m["tokens"] * m["in_dim"] * 2 * h + m["tokens"] * h * m["out_dim"]

    def params(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        m = layer.meta
        h = widths["hidden"]
        count = m["in_dim"] * 2 * h + h * m["out_dim"] + m["extra_params"]
        if m["fc1_bias"]:
            count = count + 2 * h
        if m["fc2_bias"]:
            count = count + m["out_dim"]
        return count

    def build_pruned(
        self, module: nn.Module, layer: LayerSpace, widths: dict[str, int], params: dict[str, torch.Tensor]
    ) -> nn.Module:
        names = (*self.inputs, "fc2")
        linears = {name: module.get_submodule(name) for name in names}
        for name in names:
            setattr(module, name, nn.Identity())
        try:
            new = copy.deepcopy(module)  # keeps act / dropout / gate_last, without copying the weights
        finally:
            for name, lin in linears.items():
                setattr(module, name, lin)
        for name in self.inputs:
            setattr(new, name, new_linear(params[f"{name}.weight"], params.get(f"{name}.bias")))
        new.fc2 = new_linear(params["fc2.weight"], cast(nn.Linear, linears["fc2"]).bias)
        return new


class TimmGluMlpAdapter(_GatedMlpAdapter):
    """timm ``GluMlp`` / ``SwiGLUPacked``: ``fc1`` rows ``[first half (m), second half (m)]``."""

    name = "timm_glu_mlp"
    inputs = ("fc1",)

    def claims(self, module: nn.Module) -> bool:
        return type(module) is GluMlp

    def coupling(self, layer: LayerSpace) -> dict[str, list[Slot]]:
        m = layer.dims["hidden"].max_width
        slots = [Slot("fc1.weight", 0, 0, 0), Slot("fc1.weight", 0, m, 0), Slot("fc2.weight", 1, 0, 0)]
        if layer.meta["fc1_bias"]:
            slots += [Slot("fc1.bias", 0, 0, 0), Slot("fc1.bias", 0, m, 0)]
        return {"hidden": slots}


class TimmSwiGluAdapter(_GatedMlpAdapter):
    """timm ``SwiGLU``: gate rows in ``fc1_g``, value rows in ``fc1_x``."""

    name = "timm_swiglu"
    inputs = ("fc1_g", "fc1_x")

    def claims(self, module: nn.Module) -> bool:
        return type(module) is SwiGLU

    def coupling(self, layer: LayerSpace) -> dict[str, list[Slot]]:
        slots = [Slot("fc1_g.weight", 0, 0, 0), Slot("fc1_x.weight", 0, 0, 0), Slot("fc2.weight", 1, 0, 0)]
        if layer.meta["fc1_bias"]:
            slots += [Slot("fc1_g.bias", 0, 0, 0), Slot("fc1_x.bias", 0, 0, 0)]
        return {"hidden": slots}
