"""Space adapters for timm PVTv2 (``timm.models.pvt_v2``): spatial-reduction ``Attention`` and
``MlpWithDepthwiseConv``.

PVTv2 attention has a query Linear ``q`` (rows ``(H, d)``) and one key/value Linear ``kv`` (rows
``(2, H, d)``, keys first). The keys and values are computed from a spatially reduced copy of the
input: a strided conv ``sr`` and a ``norm`` (or, in the ``linear_attn`` variant, an adaptive pool
to 7x7, a 1x1 conv, the norm and a GELU). That reduction works on the embedding channels, which
channel pruning of q/k/v never touches, so it is kept whole. Its cost depends on the feature-map
size passed to the forward, which the adapter reads from the call (``call_facts``).

``MlpWithDepthwiseConv`` is ``fc1 -> (ReLU) -> 3x3 depthwise conv -> GELU -> fc2``: a hidden unit
is a row of ``fc1``, its own depthwise kernel and bias, and a column of ``fc2``.

Both paths of the attention (fused and unfused) keep the dense model's softmax scale. Reweight
scales fold exactly: query scales into the kept ``q`` rows, value scales into the kept v rows of
``kv``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, cast

import torch
from einops import rearrange
from timm.models.pvt_v2 import Attention as PvtAttention
from timm.models.pvt_v2 import MlpWithDepthwiseConv
from torch import nn

from nas_headprune.space import DimSpec, LayerSpace, Slot, dim_label

from ._fused_qkv import attend, new_linear
from ._hidden_units import HiddenUnitsAdapter
from ._split_qkv import SplitQkvAdapter, split_heads


class PrunedSpatialReductionAttention(nn.Module):
    """PVTv2 attention whose heads keep ``head_dim_qk`` query/key and ``head_dim_v`` value channels.

    ``sr``, ``norm``, ``pool`` and ``act`` are the dense module's (they act on the embedding
    channels); ``forward(x, feat_size)`` has the dense module's signature.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim_qk: int,
        head_dim_v: int,
        scale: float,
        qkv_bias: bool = True,
        fused_attn: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim_qk = head_dim_qk
        self.head_dim_v = head_dim_v
        self.scale = scale
        self.fused_attn = fused_attn
        self.q = nn.Linear(dim, num_heads * head_dim_qk, bias=qkv_bias)
        self.kv = nn.Linear(dim, num_heads * (head_dim_qk + head_dim_v), bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * head_dim_v, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.pool: nn.Module | None = None
        self.sr: nn.Module | None = None
        self.norm: nn.Module | None = None
        self.act: nn.Module | None = None

    def forward(self, x: torch.Tensor, feat_size: list[int]) -> torch.Tensor:
        b, n, c = x.shape  # (B, N, C)
        height, width = feat_size
        heads = self.num_heads
        q = split_heads(self.q(x), heads)  # (B, H, N, d_qk)
        if self.pool is not None or self.sr is not None:
            grid = rearrange(x, "b (y x) c -> b c y x", y=height, x=width)  # (B, C, h, w)
            if self.pool is not None:
                grid = self.pool(grid)  # (B, C, 7, 7)
            assert self.sr is not None and self.norm is not None  # built with the reduction
            x = rearrange(self.sr(grid), "b c y x -> b (y x) c")  # (B, N_kv, C)
            x = self.norm(x)
            if self.act is not None:
                x = self.act(x)
        k, v = self.kv(x).split([heads * self.head_dim_qk, heads * self.head_dim_v], dim=-1)
        k, v = split_heads(k, heads), split_heads(v, heads)  # (B, H, N_kv, d_qk), (B, H, N_kv, d_v)
        out = attend(q, k, v, self.scale, fused=self.fused_attn, dropout=self.attn_drop)  # (B, H, N, d_v)
        out = rearrange(out, "b h n d -> b n (h d)")  # (B, N, H*d_v)
        return self.proj_drop(self.proj(out))


def _conv_tokens(conv: nn.Conv2d, height: int, width: int) -> tuple[int, int]:
    """Output size of ``conv`` on a ``height x width`` map."""
    out = []
    for size, k, s, p, d in zip(
        (height, width),
        conv.kernel_size,
        conv.stride,
        cast("tuple[int, int]", conv.padding),
        conv.dilation,
        strict=True,
    ):
        out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return out[0], out[1]


class PvtAttentionAdapter(SplitQkvAdapter):
    """timm PVTv2 ``Attention`` (spatial reduction) and the project's pruned version."""

    name = "timm_pvt_attention"
    q_name, k_name, v_name, out_name = "q", "kv", "kv", "proj"

    def claims(self, module: nn.Module) -> bool:
        return type(module) in (PvtAttention, PrunedSpatialReductionAttention)

    def check(self, module: nn.Module) -> str | None:
        sr = getattr(module, "sr", None)
        if sr is not None and (not isinstance(sr, nn.Conv2d) or isinstance(sr.padding, str)):
            return "a spatial reduction other than a Conv2d with numeric padding is not supported"
        return None

    def head_widths(self, module: nn.Module) -> tuple[int, int, int]:
        heads = cast(int, module.num_heads)
        d_qk = getattr(module, "head_dim_qk", None)
        if d_qk is None:
            d = cast(int, module.head_dim)
            return heads, d, d
        return heads, d_qk, cast(int, module.head_dim_v)

    def call_facts(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The key/value token count and the MACs of the spatial reduction, from the feature-map
        size the block passes to the forward."""
        x = args[0] if args else kwargs["x"]
        height, width = (args[1] if len(args) > 1 else kwargs["feat_size"])[:2]
        channels = x.shape[-1]
        pool, sr = getattr(module, "pool", None), getattr(module, "sr", None)
        if pool is not None:
            size = cast(nn.AdaptiveAvgPool2d, pool).output_size
            height, width = (size, size) if isinstance(size, int) else size  # type: ignore[misc]
        if sr is None:
            return {"kv_tokens": int(height * width), "extra_macs": 0}
        conv = cast(nn.Conv2d, sr)
        out_h, out_w = _conv_tokens(conv, int(height), int(width))
        kh, kw = conv.kernel_size
        conv_macs = out_h * out_w * conv.out_channels * (channels // conv.groups) * kh * kw
        return {"kv_tokens": out_h * out_w, "extra_macs": conv_macs}

    def describe(self, label: str, module: nn.Module, tokens: int) -> LayerSpace:
        # kv_tokens and extra_macs are replaced by call_facts once the layer has been called
        return self._describe(label, module, tokens, q_tokens=tokens, kv_tokens=tokens)

    def build_pruned(
        self, module: nn.Module, layer: LayerSpace, widths: dict[str, int], params: dict[str, torch.Tensor]
    ) -> nn.Module:
        heads, _, _ = self.head_widths(module)
        q, kv, proj = (cast(nn.Linear, getattr(module, n)) for n in ("q", "kv", "proj"))
        new = PrunedSpatialReductionAttention(
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
        new.q = new_linear(params["q.weight"], params.get("q.bias"))
        new.kv = new_linear(params["kv.weight"], params.get("kv.bias"))
        new.proj = new_linear(params["proj.weight"], proj.bias)
        for name in ("pool", "sr", "norm", "act"):
            sub = getattr(module, name, None)
            setattr(new, name, copy.deepcopy(sub) if sub is not None else None)
        new.train(module.training)
        return new


class PvtMlpAdapter(HiddenUnitsAdapter):
    """timm PVTv2 ``MlpWithDepthwiseConv``: ``fc1`` rows, the depthwise conv's channels and ``fc2``
    columns are the hidden units."""

    name = "timm_pvt_mlp"
    kind = "mlp"

    def claims(self, module: nn.Module) -> bool:
        return type(module) is MlpWithDepthwiseConv

    def check(self, module: nn.Module) -> str | None:
        conv = cast(nn.Conv2d, module.dwconv)
        hidden = cast(nn.Linear, module.fc1).out_features
        k = conv.kernel_size
        same = conv.stride == (1, 1) and conv.padding == (k[0] // 2, k[1] // 2) and conv.dilation == (1, 1)
        if conv.groups != hidden or conv.out_channels != hidden or not same:
            return "the hidden conv must be depthwise with stride 1 and 'same' padding"
        return None

    def input_dim(self, module: nn.Module) -> int:
        return cast(nn.Linear, module.fc1).in_features

    def describe(self, label: str, module: nn.Module, tokens: int) -> LayerSpace:
        fc1, fc2 = cast(nn.Linear, module.fc1), cast(nn.Linear, module.fc2)
        conv = cast(nn.Conv2d, module.dwconv)
        kh, kw = conv.kernel_size
        own = [fc1.weight, fc1.bias, conv.weight, conv.bias, fc2.weight, fc2.bias]
        meta = {
            "tokens": tokens,
            "in_dim": fc1.in_features,
            "out_dim": fc2.out_features,
            "kernel_area": kh * kw,
            "fc1_bias": fc1.bias is not None,
            "conv_bias": conv.bias is not None,
            "fc2_bias": fc2.bias is not None,
            "extra_params": sum(p.numel() for p in module.parameters())
            - sum(p.numel() for p in own if p is not None),
        }
        dims = {"hidden": DimSpec(dim_label(label, "hidden"), "hidden", 1, fc1.out_features)}
        return LayerSpace(label, self.name, self.kind, dims, meta, self)

    def coupling(self, layer: LayerSpace) -> dict[str, list[Slot]]:
        slots = [Slot("fc1.weight", 0, 0, 0), Slot("dwconv.weight", 0, 0, 0), Slot("fc2.weight", 1, 0, 0)]
        if layer.meta["fc1_bias"]:
            slots.append(Slot("fc1.bias", 0, 0, 0))
        if layer.meta["conv_bias"]:
            slots.append(Slot("dwconv.bias", 0, 0, 0))
        return {"hidden": slots}

    def build_pruned(
        self, module: nn.Module, layer: LayerSpace, widths: dict[str, int], params: dict[str, torch.Tensor]
    ) -> nn.Module:
        fc1, conv, fc2 = module.fc1, cast(nn.Conv2d, module.dwconv), cast(nn.Linear, module.fc2)
        module.fc1 = module.dwconv = module.fc2 = nn.Identity()
        try:
            new = copy.deepcopy(module)  # keeps act / relu / dropout, without copying the weights
        finally:
            module.fc1, module.dwconv, module.fc2 = fc1, conv, fc2
        hidden = widths["hidden"]
        new.fc1 = new_linear(params["fc1.weight"], params.get("fc1.bias"))
        dw = nn.Conv2d(
            hidden,
            hidden,
            cast("tuple[int, int]", conv.kernel_size),
            cast("tuple[int, int]", conv.stride),
            cast("tuple[int, int]", conv.padding),
            groups=hidden,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            dw.weight.copy_(params["dwconv.weight"])
            if dw.bias is not None:
                dw.bias.copy_(params["dwconv.bias"])
        new.dwconv = dw
        new.fc2 = new_linear(params["fc2.weight"], fc2.bias)
        return new

    def macs(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        m = layer.meta
        h = widths["hidden"]
        # fc1, the depthwise conv ("same" padding: one output per token) and fc2
        return m["tokens"] * (m["in_dim"] * h + h * m["kernel_area"] + h * m["out_dim"])

    def params(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        m = layer.meta
        h = widths["hidden"]
        count = m["in_dim"] * h + h * m["kernel_area"] + h * m["out_dim"] + m["extra_params"]
        count = count + h * (int(m["fc1_bias"]) + int(m["conv_bias"]))
        if m["fc2_bias"]:
            count = count + m["out_dim"]
        return count
