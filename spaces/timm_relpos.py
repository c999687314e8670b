"""Space adapter for timm ``RelPosAttention`` (``vit_relpos_*``, ``vit_srelpos_*``).

It is timm ``Attention`` (one fused ``qkv`` Linear with an optional bias) plus a ``rel_pos`` module
(``RelPosBias``: a table with one column per head; ``RelPosMlp``: a small MLP from log-spaced
relative coordinates to one value per head) that adds a per-head bias to the attention logits. The
``srelpos`` models compute one such bias outside the blocks and pass it in (``shared_rel_pos``).
Heads are never removed, so the bias is untouched by channel pruning; the pruned module keeps the
dense module's ``rel_pos`` whole. Masks are the fused-qkv hooks of timm ``Attention``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, cast

import torch
from einops import rearrange
from timm.models.vision_transformer_relpos import RelPosAttention
from torch import nn

from nas_headprune.space import LayerSpace

from ._fused_qkv import FusedQkvAdapter, attend, head_widths, new_linear, split_qkv
from ._qv_bias import counted_macs


class PrunedRelPosAttention(nn.Module):
    """``RelPosAttention`` whose heads keep ``head_dim_qk`` query/key channels and ``head_dim_v``
    value channels each, with the dense module's ``rel_pos`` and softmax scale."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim_qk: int,
        head_dim_v: int,
        scale: float,
        rel_pos: nn.Module | None,
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
        self.qkv = nn.Linear(dim, num_heads * (2 * head_dim_qk + head_dim_v), bias=qkv_bias)
        self.rel_pos = rel_pos
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * head_dim_v, out_dim or dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = split_qkv(self.qkv(x), self.num_heads, self.head_dim_qk, self.head_dim_v)
        # as timm: the module's own bias when it has one (both attention paths), else the shared one
        bias = (
            cast(Any, self.rel_pos).get_bias() if self.rel_pos is not None else shared_rel_pos
        )  # (1, H, N, N)
        out = attend(
            q, k, v, self.scale, fused=self.fused_attn, dropout=self.attn_drop, bias=bias
        )  # (B, H, N, d_v)
        out = rearrange(out, "b h n d -> b n (h d)")  # (B, N, H*d_v)
        return self.proj_drop(self.proj(out))


class TimmRelPosAttentionAdapter(FusedQkvAdapter):
    """timm ``RelPosAttention`` and the project's ``PrunedRelPosAttention``."""

    name = "timm_relpos_attention"

    def claims(self, module: nn.Module) -> bool:
        return type(module) in (RelPosAttention, PrunedRelPosAttention)

    def check(self, module: nn.Module) -> str | None:
        if not isinstance(getattr(module, "q_norm", nn.Identity()), nn.Identity):
            return "qk_norm normalises each head's q/k over its channels, so removing one changes the rest"
        return None

    def describe(self, label: str, module: nn.Module, tokens: int) -> LayerSpace:
        meta = self._meta(module, tokens, kv_tokens=tokens)
        rel_pos = cast("nn.Module | None", module.rel_pos)
        # the bias generator (RelPosMlp's MLP) runs once per call, whatever the widths
        meta["extra_macs"] = counted_macs(cast(Any, rel_pos).get_bias) if rel_pos is not None else 0
        return LayerSpace(label, self.name, self.kind, self._dims(label, module), meta, self)

    def macs(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        return super().macs(layer, widths) + layer.meta["extra_macs"]

    def build_pruned(
        self, module: nn.Module, layer: LayerSpace, widths: dict[str, int], params: dict[str, torch.Tensor]
    ) -> nn.Module:
        heads, _, _ = head_widths(module)
        qkv, proj = cast(nn.Linear, module.qkv), cast(nn.Linear, module.proj)
        rel_pos = cast("nn.Module | None", module.rel_pos)
        new = PrunedRelPosAttention(
            dim=qkv.in_features,
            num_heads=heads,
            head_dim_qk=widths["qk"],
            head_dim_v=widths["v"],
            scale=float(cast(float, module.scale)),
            rel_pos=copy.deepcopy(rel_pos),
            qkv_bias=qkv.bias is not None,
            proj_bias=proj.bias is not None,
            out_dim=proj.out_features,
            fused_attn=bool(module.fused_attn),
            attn_drop=cast(nn.Dropout, module.attn_drop).p,
            proj_drop=cast(nn.Dropout, module.proj_drop).p,
        ).to(device=qkv.weight.device, dtype=qkv.weight.dtype)
        new.qkv = new_linear(params["qkv.weight"], params.get("qkv.bias"))
        new.proj = new_linear(params["proj.weight"], proj.bias)
        new.train(module.training)
        return new
