"""Space adapters for timm ``VisionTransformer`` blocks: fused-qkv ``Attention`` and ``Mlp``."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, cast

import torch
from einops import rearrange
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block
from torch import nn

from nas_headprune.evaluator.cost import mlp_macs
from nas_headprune.space import DimSpec, LayerSpace, Slot, dim_label
from nas_headprune.space.dropped import DroppedSublayer

from ._fused_qkv import (
    FusedQkvAdapter,
    attend,
    attention_path,
    attention_paths,
    install_sliced,
    new_linear,
    pruned_attention_kwargs,
    split_qkv,
)
from ._hidden_units import HiddenUnitsAdapter

#: the norm whose output only a timm ``Block``'s sublayer reads, by the sublayer's attribute
_BLOCK_NORMS = {"attn": "norm1", "mlp": "norm2"}


def block_norm(modules: Mapping[str, nn.Module], label: str) -> str | None:
    """``<block>.norm1`` for ``<block>.attn`` and ``<block>.norm2`` for ``<block>.mlp`` when the
    parent runs timm ``Block``'s forward (``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))``:
    each norm's output feeds its sublayer only); ``None`` for any other parent."""
    parent, _, attr = label.rpartition(".")
    block = modules.get(parent) if parent else None
    if (
        block is None
        or attr not in _BLOCK_NORMS
        or getattr(type(block), "forward", None) is not Block.forward
    ):
        return None
    norm = f"{parent}.{_BLOCK_NORMS[attr]}"
    return norm if norm in modules else None


class PrunedAttention(nn.Module):
    """Multi-head self-attention whose heads keep ``head_dim_qk`` query/key channels and
    ``head_dim_v`` value channels each. The softmax scale is the dense model's ``1/sqrt(d)``, kept
    on purpose: the pruned model computes exactly what the masked dense model computes.

    ``attn_paths`` records, per device type, which attention path the forward runs (see
    :func:`~nas_headprune.spaces._fused_qkv.attention_path`); it is chosen here, from the widths, so a
    saved and reloaded model runs the same path. ``fused_attn=False`` always runs the math path."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim_qk: int,
        head_dim_v: int,
        scale: float,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        out_dim: int | None = None,
        fused_attn: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim_qk = head_dim_qk
        self.head_dim_v = head_dim_v
        self.scale = scale
        self.fused_attn = fused_attn
        self.attn_paths = attention_paths(head_dim_qk, head_dim_v)
        self.qkv = nn.Linear(dim, num_heads * (2 * head_dim_qk + head_dim_v), bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * head_dim_v, out_dim or dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def attention_path(self, device_type: str) -> str:
        """The attention path the forward runs on ``device_type`` (``"cpu"``, ``"cuda"``, ...)."""
        if not self.fused_attn:
            return "math"
        known = self.attn_paths.get(device_type)
        return known or attention_path(device_type, self.head_dim_qk, self.head_dim_v)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        q, k, v = split_qkv(self.qkv(x), self.num_heads, self.head_dim_qk, self.head_dim_v)
        x = attend(
            q,
            k,
            v,
            self.scale,
            fused=self.fused_attn,
            dropout=self.attn_drop,
            bias=attn_mask,
            is_causal=is_causal,
            path=self.attention_path(x.device.type),
        )  # (B, H, N, d_v)
        x = rearrange(x, "b h n d -> b n (h d)")  # (B, N, H*d_v)
        return self.proj_drop(self.proj(x))


class TimmAttentionAdapter(FusedQkvAdapter):
    """timm ``Attention`` (ViT, DeiT, ...) and the project's ``PrunedAttention``."""

    name = "timm_attention"
    head_pruning = True
    sublayer_drop = True

    def claims(self, module: nn.Module) -> bool:
        return type(module) in (Attention, PrunedAttention)

    def check(self, module: nn.Module) -> str | None:
        if not isinstance(getattr(module, "q_norm", nn.Identity()), nn.Identity):
            return "qk_norm normalises each head's q/k over its channels, so removing one changes the rest"
        if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
            return "scale_norm normalises the attention output over all channels before proj"
        if getattr(module, "gate", None) is not None:
            return "gated attention output is not supported"
        return None

    def describe(self, label: str, module: nn.Module, tokens: int) -> LayerSpace:
        return LayerSpace(
            label,
            self.name,
            self.kind,
            self._dims(label, module),
            self._meta(module, tokens, kv_tokens=tokens),
            self,
        )

    def build_pruned(
        self, module: nn.Module, layer: LayerSpace, widths: dict[str, int], params: dict[str, torch.Tensor]
    ) -> nn.Module:
        qkv, proj = cast(nn.Linear, module.qkv), cast(nn.Linear, module.proj)
        new = PrunedAttention(
            **pruned_attention_kwargs(module, widths),
            proj_bias=proj.bias is not None,
            out_dim=proj.out_features,
        ).to(device=qkv.weight.device, dtype=qkv.weight.dtype)
        return install_sliced(new, module, params)

    def build_dropped(self, module: nn.Module, layer: LayerSpace) -> nn.Module:
        """0 heads: every value is masked, so the layer outputs ``proj_drop(proj.bias)``."""
        proj = cast(nn.Linear, module.proj)
        new = DroppedSublayer(proj.out_features, proj.bias, cast(nn.Dropout, module.proj_drop).p)
        return new.to(device=proj.weight.device, dtype=proj.weight.dtype)

    def drop_norm(self, modules: Mapping[str, nn.Module], label: str) -> str | None:
        return block_norm(modules, label)


class TimmMlpAdapter(HiddenUnitsAdapter):
    """timm ``Mlp`` (fc1 -> act -> fc2): the hidden units are prunable."""

    name = "timm_mlp"
    kind = "mlp"
    sublayer_drop = True

    def claims(self, module: nn.Module) -> bool:
        return type(module) is Mlp

    def check(self, module: nn.Module) -> str | None:
        if not isinstance(module.fc1, nn.Linear):
            return "use_conv Mlp (1x1 convolutions) is not supported"
        if not isinstance(module.norm, nn.Identity):
            return "a norm over the hidden units couples them"
        return None

    def input_dim(self, module: nn.Module) -> int:
        return cast(nn.Linear, module.fc1).in_features

    def describe(self, label: str, module: nn.Module, tokens: int) -> LayerSpace:
        fc1, fc2 = cast(nn.Linear, module.fc1), cast(nn.Linear, module.fc2)
        hidden = fc1.out_features
        dense = sum(p.numel() for p in (fc1.weight, fc1.bias, fc2.weight, fc2.bias) if p is not None)
        meta = {
            "tokens": tokens,
            "in_dim": fc1.in_features,
            "out_dim": fc2.out_features,
            "fc1_bias": fc1.bias is not None,
            "fc2_bias": fc2.bias is not None,
            "extra_params": sum(p.numel() for p in module.parameters()) - dense,
        }
        dims = {"hidden": DimSpec(dim_label(label, "hidden"), "hidden", 1, hidden)}
        return LayerSpace(label, self.name, self.kind, dims, meta, self)

    def coupling(self, layer: LayerSpace) -> dict[str, list[Slot]]:
        slots = [Slot("fc1.weight", 0, 0, 0), Slot("fc2.weight", 1, 0, 0)]
        if layer.meta["fc1_bias"]:
            slots.append(Slot("fc1.bias", 0, 0, 0))
        return {"hidden": slots}

    def build_pruned(
        self, module: nn.Module, layer: LayerSpace, widths: dict[str, int], params: dict[str, torch.Tensor]
    ) -> nn.Module:
        fc1, fc2 = cast(nn.Linear, module.fc1), cast(nn.Linear, module.fc2)
        module.fc1 = module.fc2 = nn.Identity()
        try:
            new = copy.deepcopy(module)  # keeps act / dropout settings, without copying the weights
        finally:
            module.fc1, module.fc2 = fc1, fc2
        new.fc1 = new_linear(params["fc1.weight"], params.get("fc1.bias"))
        new.fc2 = new_linear(params["fc2.weight"], fc2.bias)
        return new

    def build_dropped(self, module: nn.Module, layer: LayerSpace) -> nn.Module:
        """0 hidden units: the mask zeroes ``fc2``'s whole input (after the activation), so the layer
        outputs ``drop2(fc2.bias)`` whatever the activation gives at 0."""
        fc2 = cast(nn.Linear, module.fc2)
        drop = module.drop2.p if isinstance(module.drop2, nn.Dropout) else 0.0
        new = DroppedSublayer(fc2.out_features, fc2.bias, drop)
        return new.to(device=fc2.weight.device, dtype=fc2.weight.dtype)

    def drop_norm(self, modules: Mapping[str, nn.Module], label: str) -> str | None:
        return block_norm(modules, label)

    def macs(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        m = layer.meta
        return mlp_macs(m["tokens"], m["in_dim"], widths["hidden"], m["out_dim"])

    def params(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        m = layer.meta
        h = widths["hidden"]
        count = m["in_dim"] * h + h * m["out_dim"] + m["extra_params"]
        if m["fc1_bias"]:
            count = count + h
        if m["fc2_bias"]:
            count = count + m["out_dim"]
        return count
