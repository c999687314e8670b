"""Space adapter for timm Swin ``WindowAttention`` (window softmax attention with a relative
position bias). The bias table is per head and heads are never removed, so it is kept whole.
The pruned module resizes its table like timm's (``set_window_size``), so ``set_input_size`` keeps
working on a pruned Swin."""

from __future__ import annotations

from typing import cast

import torch
from einops import rearrange
from timm.layers import resize_rel_pos_bias_table, to_2tuple
from timm.models.swin_transformer import WindowAttention, get_relative_position_index
from torch import nn

from nas_headprune.space import LayerSpace

from ._fused_qkv import FusedQkvAdapter, attend, install_sliced, pruned_attention_kwargs, split_qkv


class PrunedWindowAttention(nn.Module):
    """Window attention with per-head widths ``head_dim_qk`` / ``head_dim_v``; same call signature
    and masking rules as timm's ``WindowAttention``, with the dense model's softmax scale."""

    relative_position_index: torch.Tensor  # a buffer, registered in __init__

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim_qk: int,
        head_dim_v: int,
        window_size: tuple[int, int],
        scale: float,
        qkv_bias: bool = True,
        fused_attn: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim_qk = head_dim_qk
        self.head_dim_v = head_dim_v
        self.window_size = tuple(window_size)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.scale = scale
        self.fused_attn = fused_attn
        win_h, win_w = self.window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * win_h - 1) * (2 * win_w - 1), num_heads)
        )
        self.register_buffer(
            "relative_position_index", get_relative_position_index(win_h, win_w), persistent=False
        )
        self.qkv = nn.Linear(dim, num_heads * (2 * head_dim_qk + head_dim_v), bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * head_dim_v, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _rel_pos_bias(self) -> torch.Tensor:
        area = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (M*M, H)
        return rearrange(bias.view(area, area, -1), "i j h -> 1 h i j")  # (1, H, M, M)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b_, n, _ = x.shape  # (num_windows*B, M, C)
        heads = self.num_heads
        q, k, v = split_qkv(self.qkv(x), heads, self.head_dim_qk, self.head_dim_v)
        bias = self._rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            win_mask = mask.view(1, num_win, 1, n, n).expand(b_ // num_win, -1, heads, -1, -1)
            bias = bias + win_mask.reshape(-1, heads, n, n)  # (num_windows*B, H, M, M)
        x = attend(
            q, k, v, self.scale, fused=self.fused_attn, dropout=self.attn_drop, bias=bias
        )  # (B_, H, M, d_v)
        x = rearrange(x, "b h n d -> b n (h d)")  # (B_, M, H*d_v)
        return self.proj_drop(self.proj(x))

    def set_window_size(self, window_size: tuple[int, int] | int) -> None:
        """Resize the relative position table to a new window size by timm's interpolation and
        rebuild the index (``SwinTransformerBlock.set_input_size`` calls this)."""
        new = cast("tuple[int, int]", tuple(to_2tuple(window_size)))
        if new == self.window_size:
            return
        old = cast("tuple[int, int]", self.window_size)
        self.window_size = new
        win_h, win_w = new
        self.window_area = win_h * win_w
        table = self.relative_position_bias_table
        with torch.no_grad():
            self.relative_position_bias_table = nn.Parameter(
                resize_rel_pos_bias_table(
                    table,
                    new_window_size=new,
                    new_bias_shape=((2 * win_h - 1) * (2 * win_w - 1), self.num_heads),
                    old_window_size=old,
                ),
                requires_grad=table.requires_grad,
            )
        self.register_buffer(
            "relative_position_index",
            get_relative_position_index(win_h, win_w, device=table.device),
            persistent=False,
        )


class TimmWindowAttentionAdapter(FusedQkvAdapter):
    """timm Swin ``WindowAttention`` and the project's ``PrunedWindowAttention``."""

    name = "timm_window_attention"

    def claims(self, module: nn.Module) -> bool:
        return type(module) in (WindowAttention, PrunedWindowAttention)

    def describe(self, label: str, module: nn.Module, tokens: int) -> LayerSpace:
        meta = self._meta(module, tokens, kv_tokens=cast(int, module.window_area))
        meta["window_size"] = list(cast("tuple[int, int]", module.window_size))
        return LayerSpace(label, self.name, self.kind, self._dims(label, module), meta, self)

    def build_pruned(
        self, module: nn.Module, layer: LayerSpace, widths: dict[str, int], params: dict[str, torch.Tensor]
    ) -> nn.Module:
        qkv = cast(nn.Linear, module.qkv)
        win_h, win_w = cast("tuple[int, int]", module.window_size)
        new = PrunedWindowAttention(**pruned_attention_kwargs(module, widths), window_size=(win_h, win_w)).to(
            device=qkv.weight.device, dtype=qkv.weight.dtype
        )
        with torch.no_grad():
            new.relative_position_bias_table.copy_(cast(nn.Parameter, module.relative_position_bias_table))
        return install_sliced(new, module, params)
