"""Space adapter for timm Swin V2 ``WindowAttention`` (scaled cosine window attention).

Swin V2 normalises every head's q and k to unit length over their channels before the product,
multiplies the cosine by a learned per-head logit scale and adds a per-head position bias that a
small MLP (``cpb_mlp``) computes from log-spaced relative coordinates. Heads are never removed, so
the logit scale and the bias MLP are kept whole. Query/key channels live in the q and k rows of the
bias-free ``qkv`` and in ``q_bias`` (keys have no bias), value channels in the v rows, ``v_bias``
and the ``proj`` columns.

Because of the normalisation, removing a q/k channel changes the length the others are divided by.
The masked model therefore multiplies q and k by the channel mask *before* normalising them: a
masked channel adds nothing to the norm, and the masked model equals the pruned one, which
normalises over the kept channels only. Query scales (reweighting) are applied at the same place,
so they fold into the q rows and ``q_bias``; value scales fold into the v rows and ``v_bias``.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import to_2tuple
from timm.models.swin_transformer_v2 import WindowAttention as WindowAttentionV2
from torch import nn

from nas_headprune.space import LayerSpace

from ._fused_qkv import head_widths, new_linear, split_qkv
from ._qv_bias import QvBiasQkvAdapter, counted_macs, mask_queries_keys, new_qv_biases, qv_bias_qkv


def _position_bias(mod: nn.Module) -> torch.Tensor:
    """``(1, H, M, M)`` continuous position bias of one window, ``16 * sigmoid(cpb_mlp(coords))``."""
    heads = cast(int, mod.num_heads)
    table = cast(nn.Module, mod.cpb_mlp)(mod.relative_coords_table).view(-1, heads)  # (L, H)
    win_h, win_w = cast("tuple[int, int]", mod.window_size)
    area = win_h * win_w
    bias = table[cast(torch.Tensor, mod.relative_position_index).view(-1)].view(area, area, -1)  # (M, M, H)
    return 16 * torch.sigmoid(rearrange(bias, "i j h -> 1 h i j"))  # (1, H, M, M)


def swinv2_window_attention(
    mod: nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    qk_mask: torch.Tensor | None = None,
    q_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Swin V2 window attention of a dense or pruned module on ``x`` ``(num_windows*B, M, C)``; the
    ``(H, d_qk)`` q/k channel masks and query scales are applied before the normalisation."""
    b_, n, _ = x.shape
    heads, d_qk, d_v = head_widths(mod)
    q, k, v = split_qkv(qv_bias_qkv(mod, x), heads, d_qk, d_v)  # (B_, H, M, d)
    q, k = mask_queries_keys(q, k, qk_mask, q_scale)
    attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)  # (B_, H, M, M) cosines
    logit_scale = torch.clamp(
        cast(torch.Tensor, mod.logit_scale), max=math.log(1.0 / 0.01)
    ).exp()  # (H, 1, 1)
    attn = attn * logit_scale + _position_bias(mod)
    if mask is not None:
        num_win = mask.shape[0]
        attn = attn.view(-1, num_win, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, n, n)
    attn = cast(nn.Dropout, mod.attn_drop)(attn.softmax(dim=-1))
    out = rearrange(attn @ v, "b h n d -> b n (h d)")  # (B_, M, H*d_v)
    return cast(nn.Dropout, mod.proj_drop)(cast(nn.Linear, mod.proj)(out))


class PrunedWindowAttentionV2(nn.Module):
    """Swin V2 window attention whose heads keep ``head_dim_qk`` query/key channels and
    ``head_dim_v`` value channels each; same call signature, logit scale and position-bias MLP as
    the dense module, and ``set_window_size`` for ``SwinTransformerV2.set_input_size``."""

    q_bias: nn.Parameter | None
    k_bias: torch.Tensor | None
    v_bias: nn.Parameter | None
    relative_coords_table: torch.Tensor
    relative_position_index: torch.Tensor

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim_qk: int,
        head_dim_v: int,
        window_size: tuple[int, int],
        pretrained_window_size: tuple[int, int] = (0, 0),
        cpb_hidden: int = 512,
        qkv_bias_separate: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim_qk = head_dim_qk
        self.head_dim_v = head_dim_v
        self.window_size = tuple(window_size)
        self.pretrained_window_size = tuple(pretrained_window_size)
        self.qkv_bias_separate = qkv_bias_separate
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10)))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, cpb_hidden, bias=True),
            nn.ReLU(inplace=True),
            nn.Linear(cpb_hidden, num_heads, bias=False),
        )
        self.qkv = nn.Linear(dim, num_heads * (2 * head_dim_qk + head_dim_v), bias=False)
        # set by the adapter when the dense module has them (k_bias: a zero buffer)
        self.register_parameter("q_bias", None)
        self.register_buffer("k_bias", None, persistent=False)
        self.register_parameter("v_bias", None)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * head_dim_v, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._set_tables()

    def _set_tables(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        # timm's own computation of the log-spaced coordinates and the pair-wise index
        table, index = WindowAttentionV2._make_pair_wise_relative_positions(
            cast(Any, self), device=device, dtype=dtype
        )
        self.register_buffer("relative_coords_table", table, persistent=False)
        self.register_buffer("relative_position_index", index, persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return swinv2_window_attention(self, x, mask)

    def set_window_size(self, window_size: tuple[int, int] | int) -> None:
        """Regenerate the relative coordinates and index for a new window size (the bias MLP is
        unchanged), as timm's module does."""
        new = tuple(to_2tuple(window_size))
        if new != self.window_size:
            self.window_size = new
            self._set_tables(self.relative_coords_table.device, self.relative_coords_table.dtype)


class TimmWindowAttentionV2Adapter(QvBiasQkvAdapter):
    """timm Swin V2 ``WindowAttention`` and the project's ``PrunedWindowAttentionV2``."""

    name = "timm_window_attention_v2"

    def claims(self, module: nn.Module) -> bool:
        return type(module) in (WindowAttentionV2, PrunedWindowAttentionV2)

    def masked_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        return swinv2_window_attention(module, *args, **kwargs)

    def describe(self, label: str, module: nn.Module, tokens: int) -> LayerSpace:
        win_h, win_w = cast("tuple[int, int]", module.window_size)
        meta = self._meta(module, tokens, kv_tokens=win_h * win_w)
        meta["attention"] = "cosine"
        meta["window_size"] = [win_h, win_w]
        # the position-bias MLP runs once per call, over the relative coordinates of one window
        meta["extra_macs"] = counted_macs(
            lambda: cast(nn.Module, module.cpb_mlp)(module.relative_coords_table)
        )
        return LayerSpace(label, self.name, self.kind, self._dims(label, module), meta, self)

    def macs(self, layer: LayerSpace, widths: Any) -> Any:
        return super().macs(layer, widths) + layer.meta["extra_macs"]

    def build_pruned(
        self, module: nn.Module, layer: LayerSpace, widths: dict[str, int], params: dict[str, torch.Tensor]
    ) -> nn.Module:
        heads, _, _ = head_widths(module)
        qkv, proj = cast(nn.Linear, module.qkv), cast(nn.Linear, module.proj)
        cpb = cast(nn.Sequential, module.cpb_mlp)
        new = PrunedWindowAttentionV2(
            dim=qkv.in_features,
            num_heads=heads,
            head_dim_qk=widths["qk"],
            head_dim_v=widths["v"],
            window_size=cast("tuple[int, int]", tuple(cast("tuple[int, int]", module.window_size))),
            pretrained_window_size=cast("tuple[int, int]", module.pretrained_window_size),
            cpb_hidden=cast(nn.Linear, cpb[0]).out_features,
            qkv_bias_separate=bool(module.qkv_bias_separate),
            attn_drop=cast(nn.Dropout, module.attn_drop).p,
            proj_drop=cast(nn.Dropout, module.proj_drop).p,
        ).to(device=qkv.weight.device, dtype=qkv.weight.dtype)
        new.qkv = new_linear(params["qkv.weight"], None)
        new.proj = new_linear(params["proj.weight"], proj.bias)
        new_qv_biases(new, params)
        with torch.no_grad():
            new.logit_scale.copy_(cast(nn.Parameter, module.logit_scale))
        new.cpb_mlp.load_state_dict(cpb.state_dict())
        # the dense module's own tables (same window size, same values), on its device and dtype
        new.register_buffer(
            "relative_coords_table",
            cast(torch.Tensor, module.relative_coords_table).clone(),
            persistent=False,
        )
        new.register_buffer(
            "relative_position_index",
            cast(torch.Tensor, module.relative_position_index).clone(),
            persistent=False,
        )
        new.train(module.training)
        return new
