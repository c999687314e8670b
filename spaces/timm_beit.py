"""Space adapter for BEiT's own attention (:class:`timm.models.beit.Attention`).

BEiT attention is fused-qkv softmax attention with separate query and value biases (keys have
none) and, optionally, a relative position bias table with one column per head. Heads are never
removed, so the table is kept whole; q/k and v channels are pruned per head as for timm
``Attention``. A bias shared by all blocks (``Beit.rel_pos_bias``) is computed outside the module
and passed in; it is unaffected too.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from einops import rearrange
from timm.layers import resize_rel_pos_bias_table, to_2tuple
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import gen_relative_position_index
from torch import nn

from nas_headprune.space import LayerSpace

from ._fused_qkv import attend, head_widths, new_linear, split_qkv
from ._qv_bias import QvBiasQkvAdapter, mask_queries_keys, new_qv_biases, qv_bias_qkv


def _rel_pos_bias(mod: nn.Module) -> torch.Tensor | None:
    """``(1, H, N, N)`` bias of the module's own table (class token included), or ``None``."""
    table = cast("torch.Tensor | None", mod.relative_position_bias_table)
    if table is None:
        return None
    win_h, win_w = cast("tuple[int, int]", mod.window_size)
    n = win_h * win_w + 1
    bias = table[cast(torch.Tensor, mod.relative_position_index).view(-1)].view(n, n, -1)  # (N, N, H)
    return rearrange(bias, "i j h -> 1 h i j")  # (1, H, N, N)


def beit_attention(
    mod: nn.Module,
    x: torch.Tensor,
    shared_rel_pos_bias: torch.Tensor | None = None,
    *,
    qk_mask: torch.Tensor | None = None,
    q_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """BEiT attention of a dense or pruned module on ``x`` ``(B, N, C)``, with optional ``(H, d_qk)``
    q/k channel masks and query scales applied right after the projections."""
    heads, d_qk, d_v = head_widths(mod)
    q, k, v = split_qkv(qv_bias_qkv(mod, x), heads, d_qk, d_v)  # (B, H, N, d)
    q, k = mask_queries_keys(q, k, qk_mask, q_scale)
    bias = _rel_pos_bias(mod)
    if shared_rel_pos_bias is not None:
        bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
    out = attend(
        q,
        k,
        v,
        cast(float, mod.scale),
        fused=bool(mod.fused_attn),
        dropout=cast(nn.Dropout, mod.attn_drop),
        bias=bias,
    )  # (B, H, N, d_v)
    out = rearrange(out, "b h n d -> b n (h d)")  # (B, N, H*d_v)
    return cast(nn.Dropout, mod.proj_drop)(cast(nn.Linear, mod.proj)(out))


class PrunedBeitAttention(nn.Module):
    """BEiT attention whose heads keep ``head_dim_qk`` query/key channels and ``head_dim_v`` value
    channels each; same call signature, biases and relative position table as the dense module,
    and the dense model's softmax scale."""

    q_bias: nn.Parameter | None
    k_bias: torch.Tensor | None
    v_bias: nn.Parameter | None
    relative_position_bias_table: nn.Parameter | None
    relative_position_index: torch.Tensor | None

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim_qk: int,
        head_dim_v: int,
        scale: float,
        window_size: tuple[int, int] | None = None,
        qkv_bias_separate: bool = False,
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
        self.qkv_bias_separate = qkv_bias_separate
        self.qkv = nn.Linear(dim, num_heads * (2 * head_dim_qk + head_dim_v), bias=False)
        # set by the adapter when the dense module has them (k_bias: a zero buffer)
        self.register_parameter("q_bias", None)
        self.register_buffer("k_bias", None, persistent=False)
        self.register_parameter("v_bias", None)
        self.window_size: tuple[int, int] | None = (
            cast("tuple[int, int]", tuple(window_size)) if window_size else None
        )
        if self.window_size:
            win_h, win_w = self.window_size
            distances = (2 * win_h - 1) * (2 * win_w - 1) + 3
            self.relative_position_bias_table = nn.Parameter(torch.zeros(distances, num_heads))
            self.register_buffer(
                "relative_position_index", gen_relative_position_index(self.window_size), persistent=False
            )
        else:
            self.relative_position_bias_table = None
            self.relative_position_index = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * head_dim_v, out_dim or dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        return beit_attention(self, x, shared_rel_pos_bias)

    def set_window_size(self, window_size: tuple[int, int] | int) -> None:
        """Resize the relative position table to a new patch grid, as timm's module does
        (``Beit.set_input_size`` calls this)."""
        if self.window_size is None or self.relative_position_bias_table is None:
            return
        new = cast("tuple[int, int]", tuple(to_2tuple(window_size)))
        if new == self.window_size:
            return
        old, self.window_size = self.window_size, new
        distances = (2 * new[0] - 1) * (2 * new[1] - 1) + 3
        table = self.relative_position_bias_table
        with torch.no_grad():
            self.relative_position_bias_table = nn.Parameter(
                resize_rel_pos_bias_table(
                    table,
                    new_window_size=new,
                    new_bias_shape=(distances, self.num_heads),
                    old_window_size=old,
                ),
                requires_grad=table.requires_grad,
            )
        self.register_buffer(
            "relative_position_index",
            gen_relative_position_index(new, device=table.device),
            persistent=False,
        )


class BeitAttentionAdapter(QvBiasQkvAdapter):
    """BEiT ``Attention`` (``beit_*``) and the project's ``PrunedBeitAttention``."""

    name = "timm_beit_attention"

    def claims(self, module: nn.Module) -> bool:
        return type(module) in (BeitAttention, PrunedBeitAttention)

    def masked_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        return beit_attention(module, *args, **kwargs)

    def describe(self, label: str, module: nn.Module, tokens: int) -> LayerSpace:
        meta = self._meta(module, tokens, kv_tokens=tokens)
        return LayerSpace(label, self.name, self.kind, self._dims(label, module), meta, self)

    def build_pruned(
        self, module: nn.Module, layer: LayerSpace, widths: dict[str, int], params: dict[str, torch.Tensor]
    ) -> nn.Module:
        heads, _, _ = head_widths(module)
        qkv, proj = cast(nn.Linear, module.qkv), cast(nn.Linear, module.proj)
        window = cast("tuple[int, int] | None", module.window_size)
        new = PrunedBeitAttention(
            dim=qkv.in_features,
            num_heads=heads,
            head_dim_qk=widths["qk"],
            head_dim_v=widths["v"],
            scale=float(cast(float, module.scale)),
            window_size=cast("tuple[int, int]", tuple(window)) if window else None,
            qkv_bias_separate=bool(module.qkv_bias_separate),
            out_dim=proj.out_features,
            fused_attn=bool(module.fused_attn),
            attn_drop=cast(nn.Dropout, module.attn_drop).p,
            proj_drop=cast(nn.Dropout, module.proj_drop).p,
        ).to(device=qkv.weight.device, dtype=qkv.weight.dtype)
        new.qkv = new_linear(params["qkv.weight"], None)
        new.proj = new_linear(params["proj.weight"], proj.bias)
        new_qv_biases(new, params)
        table = cast("nn.Parameter | None", module.relative_position_bias_table)
        if table is not None:
            assert new.relative_position_bias_table is not None  # built from the same window size
            with torch.no_grad():
                new.relative_position_bias_table.copy_(table)
        new.train(module.training)
        return new
