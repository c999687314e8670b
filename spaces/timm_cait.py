"""Space adapters for timm CaiT (``timm.models.cait``): ``TalkingHeadAttn`` and ``ClassAttn``.

``TalkingHeadAttn`` is fused-qkv softmax attention whose attention logits and weights are mixed
across heads by two ``H x H`` Linears, ``proj_l`` (before the softmax) and ``proj_w`` (after).
Channel pruning keeps every head and only narrows each head's q/k and v channels, so the
head-mixing layers are kept whole: the logits of head ``h`` are still the sum over its kept q.k
channels, which ``proj_l`` mixes exactly as before. They cost ``2 * N * N * H * H`` MACs at any
width. This class has no fused path.

``ClassAttn`` (also used by XCiT) has separate ``q``, ``k``, ``v`` Linears: the query comes from
the class token only, keys and values from all ``N`` tokens, so one query attends over ``N`` keys.

Reweight scales fold exactly in both: query scales into the kept query rows (the logits are linear
in each q channel, before any head mixing), value scales into the kept value rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from einops import rearrange
from timm.models.cait import ClassAttn, TalkingHeadAttn
from torch import nn

from nas_headprune.space import LayerSpace

from ._fused_qkv import FusedQkvAdapter, attend, head_widths, new_linear, split_qkv
from ._split_qkv import SplitQkvAdapter, split_heads


class PrunedTalkingHeadAttn(nn.Module):
    """Talking-heads attention with per-head widths ``head_dim_qk`` / ``head_dim_v``; ``proj_l`` and
    ``proj_w`` (``H x H``) are the dense module's."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim_qk: int,
        head_dim_v: int,
        scale: float,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim_qk = head_dim_qk
        self.head_dim_v = head_dim_v
        self.scale = scale
        self.qkv = nn.Linear(dim, num_heads * (2 * head_dim_qk + head_dim_v), bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * head_dim_v, dim)
        self.proj_l = nn.Linear(num_heads, num_heads)
        self.proj_w = nn.Linear(num_heads, num_heads)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = split_qkv(self.qkv(x), self.num_heads, self.head_dim_qk, self.head_dim_v)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
        attn = rearrange(self.proj_l(rearrange(attn, "b h i j -> b i j h")), "b i j h -> b h i j")
        attn = attn.softmax(dim=-1)
        attn = rearrange(self.proj_w(rearrange(attn, "b h i j -> b i j h")), "b i j h -> b h i j")
        attn = self.attn_drop(attn)
        out = rearrange(attn @ v, "b h n d -> b n (h d)")  # (B, N, H*d_v)
        return self.proj_drop(self.proj(out))


class TalkingHeadAttnAdapter(FusedQkvAdapter):
    """timm CaiT ``TalkingHeadAttn`` and the project's pruned version."""

    name = "timm_talking_head_attention"

    def claims(self, module: nn.Module) -> bool:
        return type(module) in (TalkingHeadAttn, PrunedTalkingHeadAttn)

    def describe(self, label: str, module: nn.Module, tokens: int) -> LayerSpace:
        return LayerSpace(
            label,
            self.name,
            self.kind,
            self._dims(label, module),
            self._meta(module, tokens, kv_tokens=tokens),
            self,
        )

    def macs(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        n, heads = layer.meta["tokens"], layer.dims["qk"].heads
        return super().macs(layer, widths) + 2 * n * n * heads * heads  # proj_l and proj_w

    def build_pruned(
        self, module: nn.Module, layer: LayerSpace, widths: dict[str, int], params: dict[str, torch.Tensor]
    ) -> nn.Module:
        heads, _, _ = head_widths(module)
        qkv, proj = cast(nn.Linear, module.qkv), cast(nn.Linear, module.proj)
        new = PrunedTalkingHeadAttn(
            dim=qkv.in_features,
            num_heads=heads,
            head_dim_qk=widths["qk"],
            head_dim_v=widths["v"],
            scale=float(cast(float, module.scale)),
            qkv_bias=qkv.bias is not None,
            attn_drop=cast(nn.Dropout, module.attn_drop).p,
            proj_drop=cast(nn.Dropout, module.proj_drop).p,
        ).to(device=qkv.weight.device, dtype=qkv.weight.dtype)
        new.qkv = new_linear(params["qkv.weight"], params.get("qkv.bias"))
        new.proj = new_linear(params["proj.weight"], proj.bias)
        with torch.no_grad():
            for name in ("proj_l", "proj_w"):
                cast(nn.Module, getattr(new, name)).load_state_dict(
                    cast(nn.Module, getattr(module, name)).state_dict()
                )
        new.train(module.training)
        return new


class PrunedClassAttn(nn.Module):
    """Class attention (the class token's query against every token) with per-head widths."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim_qk: int,
        head_dim_v: int,
        scale: float,
        qkv_bias: bool = False,
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
        self.q = nn.Linear(dim, num_heads * head_dim_qk, bias=qkv_bias)
        self.k = nn.Linear(dim, num_heads * head_dim_qk, bias=qkv_bias)
        self.v = nn.Linear(dim, num_heads * head_dim_v, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * head_dim_v, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = self.num_heads
        q = split_heads(self.q(x[:, :1]), heads)  # (B, H, 1, d_qk)
        k = split_heads(self.k(x), heads)  # (B, H, N, d_qk)
        v = split_heads(self.v(x), heads)  # (B, H, N, d_v)
        out = attend(q, k, v, self.scale, fused=self.fused_attn, dropout=self.attn_drop)  # (B, H, 1, d_v)
        out = rearrange(out, "b h n d -> b n (h d)")  # (B, 1, H*d_v)
        return self.proj_drop(self.proj(out))


class ClassAttnAdapter(SplitQkvAdapter):
    """timm CaiT / XCiT ``ClassAttn`` and the project's pruned version."""

    name = "timm_class_attention"

    def claims(self, module: nn.Module) -> bool:
        return type(module) in (ClassAttn, PrunedClassAttn)

    def head_widths(self, module: nn.Module) -> tuple[int, int, int]:
        heads = cast(int, module.num_heads)
        d_qk = getattr(module, "head_dim_qk", None)
        if d_qk is None:
            d = cast(nn.Linear, module.q).out_features // heads
            return heads, d, d
        return heads, d_qk, cast(int, module.head_dim_v)

    def describe(self, label: str, module: nn.Module, tokens: int) -> LayerSpace:
        return self._describe(label, module, tokens, q_tokens=1, kv_tokens=tokens)

    def build_pruned(
        self, module: nn.Module, layer: LayerSpace, widths: dict[str, int], params: dict[str, torch.Tensor]
    ) -> nn.Module:
        heads, _, _ = self.head_widths(module)
        q, proj = cast(nn.Linear, module.q), cast(nn.Linear, module.proj)
        new = PrunedClassAttn(
            dim=q.in_features,
            num_heads=heads,
            head_dim_qk=widths["qk"],
            head_dim_v=widths["v"],
            scale=float(cast(float, module.scale)),
            qkv_bias=q.bias is not None,
            fused_attn=bool(module.fused_attn),
            attn_drop=cast(nn.Dropout, module.attn_drop).p,
            proj_drop=cast(nn.Dropout, module.proj_drop).p,
        ).to(device=q.weight.device, dtype=q.weight.dtype)
        for name in ("q", "k", "v"):
            setattr(new, name, new_linear(params[f"{name}.weight"], params.get(f"{name}.bias")))
        new.proj = new_linear(params["proj.weight"], proj.bias)
        new.train(module.training)
        return new
