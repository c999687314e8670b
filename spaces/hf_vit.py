"""Space adapters for Hugging Face ``transformers`` ViT (``ViTModel``; the ``hf`` extra).

``ViTAttention`` has separate ``q_proj``, ``k_proj``, ``v_proj`` Linears and an output ``o_proj``;
``ViTMLP`` is ``fc1 -> activation -> fc2``. The pruned attention follows the model's attention
implementation at every call (``"eager"``: plain matmuls; otherwise the fused kernel), keeps the
dense softmax scale and returns ``(output, None)``. Nothing here imports ``transformers``.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from einops import rearrange
from torch import nn

from nas_headprune.space import LayerSpace

from ._fused_qkv import attend, new_linear
from ._split_qkv import SplitQkvAdapter, split_heads
from .hf_bert import fused_for, is_hf_class
from .timm_vit import TimmMlpAdapter

_VIT = "transformers.models.vit.modeling_vit"


class PrunedHfAttention(nn.Module):
    """Hugging Face ViT attention with per-head widths ``head_dim_qk`` / ``head_dim_v``."""

    def __init__(
        self,
        config: Any,
        hidden: int,
        num_heads: int,
        head_dim_qk: int,
        head_dim_v: int,
        scale: float,
        qkv_bias: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.config = config
        self.num_attention_heads = num_heads
        self.head_dim_qk = head_dim_qk
        self.head_dim_v = head_dim_v
        self.scaling = scale
        self.q_proj = nn.Linear(hidden, num_heads * head_dim_qk, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, num_heads * head_dim_qk, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, num_heads * head_dim_v, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim_v, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, None]:
        heads = self.num_attention_heads
        q = split_heads(self.q_proj(hidden_states), heads)  # (B, H, N, d_qk)
        k = split_heads(self.k_proj(hidden_states), heads)  # (B, H, N, d_qk)
        v = split_heads(self.v_proj(hidden_states), heads)  # (B, H, N, d_v)
        out = attend(
            q, k, v, self.scaling, fused=fused_for(self.config), dropout=self.dropout, bias=attention_mask
        )  # (B, H, N, d_v)
        return self.o_proj(rearrange(out, "b h n d -> b n (h d)")), None


class HfViTAttentionAdapter(SplitQkvAdapter):
    """Hugging Face ``ViTAttention`` and the project's pruned version."""

    name = "hf_vit_attention"
    q_name, k_name, v_name, out_name = "q_proj", "k_proj", "v_proj", "o_proj"

    def claims(self, module: nn.Module) -> bool:
        return type(module) is PrunedHfAttention or is_hf_class(module, _VIT, "ViTAttention")

    def head_widths(self, module: nn.Module) -> tuple[int, int, int]:
        heads = cast(int, module.num_attention_heads)
        d_qk = getattr(module, "head_dim_qk", None)
        if d_qk is None:
            d = cast(int, module.head_dim)
            return heads, d, d
        return heads, d_qk, cast(int, module.head_dim_v)

    def describe(self, label: str, module: nn.Module, tokens: int) -> LayerSpace:
        return self._describe(label, module, tokens, q_tokens=tokens, kv_tokens=tokens)

    def build_pruned(
        self, module: nn.Module, layer: LayerSpace, widths: dict[str, int], params: dict[str, torch.Tensor]
    ) -> nn.Module:
        heads, _, _ = self.head_widths(module)
        q, o = cast(nn.Linear, module.q_proj), cast(nn.Linear, module.o_proj)
        dropout = getattr(module, "attention_dropout", 0.0)
        new = PrunedHfAttention(
            module.config,
            q.in_features,
            heads,
            widths["qk"],
            widths["v"],
            float(cast(float, module.scaling)),
            qkv_bias=q.bias is not None,
            dropout=float(cast(float, dropout)),
        ).to(device=q.weight.device, dtype=q.weight.dtype)
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(new, name, new_linear(params[f"{name}.weight"], params.get(f"{name}.bias")))
        new.o_proj = new_linear(params["o_proj.weight"], o.bias)
        new.train(module.training)
        return new


class HfViTMlpAdapter(TimmMlpAdapter):
    """Hugging Face ``ViTMLP`` (``fc1 -> activation -> fc2``): the hidden units are prunable."""

    name = "hf_vit_mlp"

    def claims(self, module: nn.Module) -> bool:
        return is_hf_class(module, _VIT, "ViTMLP")

    def check(self, module: nn.Module) -> str | None:
        if not (isinstance(module.fc1, nn.Linear) and isinstance(module.fc2, nn.Linear)):
            return "fc1 and fc2 must be Linears"
        return None
