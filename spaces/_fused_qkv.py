"""Shared pieces of adapters for softmax attention with a fused ``qkv`` projection.

Parameter layout (timm ``Attention`` and ``WindowAttention``, and the pruned modules built here):
``qkv.weight`` rows are ``(3, H, d)`` -- q, then k, then v -- and ``proj.weight`` columns are
``(H, d)``. A pruned module keeps ``H`` heads with a query/key width ``d_qk`` and a value width
``d_v`` that may differ; its ``qkv`` rows are ``[q (H, d_qk), k (H, d_qk), v (H, d_v)]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils._python_dispatch import _len_torch_dispatch_stack

from nas_headprune.evaluator.cost import softmax_attention_macs
from nas_headprune.space import (
    HEADS,
    QUERY_SCALE,
    ChannelSink,
    DimSpec,
    LayerSpace,
    MaskSet,
    Slot,
    SpaceAdapter,
    dim_label,
)


def head_widths(module: nn.Module) -> tuple[int, int, int]:
    """``(H, d_qk, d_v)`` of a dense timm module or a pruned one."""
    heads = cast(int, module.num_heads)
    d_qk: int | None = getattr(module, "head_dim_qk", None)
    d_v: int | None = getattr(module, "head_dim_v", None)
    if d_qk is None:
        d_qk = d_v = cast(nn.Linear, module.qkv).out_features // (3 * heads)
    assert d_v is not None  # a pruned module sets both widths
    return heads, d_qk, d_v


class FusedQkvAdapter(SpaceAdapter):
    """Common coupling, masks and cost for fused-qkv softmax attention."""

    kind = "attention"

    def input_dim(self, module: nn.Module) -> int:
        return cast(nn.Linear, module.qkv).in_features

    def _meta(self, module: nn.Module, tokens: int, kv_tokens: int) -> dict[str, Any]:
        heads, d_qk, d_v = head_widths(module)
        qkv, proj = cast(nn.Linear, module.qkv), cast(nn.Linear, module.proj)
        dense_params = (
            qkv.weight.numel()
            + (qkv.bias.numel() if qkv.bias is not None else 0)
            + proj.weight.numel()
            + (proj.bias.numel() if proj.bias is not None else 0)
        )
        return {
            "attention": "softmax",
            "tokens": tokens,
            "kv_tokens": kv_tokens,
            "embed_dim": qkv.in_features,
            "out_dim": proj.out_features,
            "qkv_bias": qkv.bias is not None,
            "proj_bias": proj.bias is not None,
            # parameters the widths do not touch (e.g. a relative position bias table)
            "extra_params": sum(p.numel() for p in module.parameters()) - dense_params,
        }

    def _dims(self, label: str, module: nn.Module) -> dict[str, DimSpec]:
        heads, d_qk, d_v = head_widths(module)
        return {
            "qk": DimSpec(dim_label(label, "qk"), "qk", heads, d_qk),
            "v": DimSpec(dim_label(label, "v"), "v", heads, d_v),
        }

    def coupling(self, layer: LayerSpace) -> dict[str, list[Slot]]:
        heads = layer.dims["qk"].heads
        d_qk, d_v = layer.dims["qk"].max_width, layer.dims["v"].max_width
        q0, k0, v0 = 0, heads * d_qk, 2 * heads * d_qk
        qk = [Slot("qkv.weight", 0, q0, d_qk), Slot("qkv.weight", 0, k0, d_qk)]
        v = [Slot("qkv.weight", 0, v0, d_v), Slot("proj.weight", 1, 0, d_v)]
        if layer.meta["qkv_bias"]:
            qk += [Slot("qkv.bias", 0, q0, d_qk), Slot("qkv.bias", 0, k0, d_qk)]
            v.append(Slot("qkv.bias", 0, v0, d_v))
        return {"qk": qk, "v": v}

    def watch_channels(
        self, module: nn.Module, layer: LayerSpace, sink: ChannelSink
    ) -> list[torch.utils.hooks.RemovableHandle] | None:
        """q, k and v as the ``qkv`` Linear gives them: a hook on its output (the module's forward
        calls ``qkv(x)``; adapters whose module bypasses it override this)."""
        heads = layer.dims["qk"].heads
        d_qk, d_v = layer.dims["qk"].max_width, layer.dims["v"].max_width

        def read(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            q, k, v = out.split([heads * d_qk, heads * d_qk, heads * d_v], dim=-1)
            sink("qk", rearrange(q, "... (h d) -> ... h d", h=heads))  # (..., H, d_qk)
            sink("qk", rearrange(k, "... (h d) -> ... h d", h=heads))  # (..., H, d_qk)
            sink("v", rearrange(v, "... (h d) -> ... h d", h=heads))  # (..., H, d_v)

        return [cast(nn.Linear, module.qkv).register_forward_hook(read)]

    def install_masks(
        self, module: nn.Module, layer: LayerSpace, masks: MaskSet
    ) -> list[torch.utils.hooks.RemovableHandle]:
        qk_label, v_label = layer.dims["qk"].label, layer.dims["v"].label
        head_dim = layer.dims.get(HEADS)
        heads_label = head_dim.label if head_dim is not None else None
        heads = layer.dims["qk"].heads
        d_qk, d_v = layer.dims["qk"].max_width, layer.dims["v"].max_width

        def mask_qk(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            m = masks.get(qk_label)
            q_scale = masks.get(qk_label + QUERY_SCALE)
            if m is None and q_scale is None:
                return None
            q, k, v = out.split([heads * d_qk, heads * d_qk, heads * d_v], dim=-1)
            if m is not None:
                flat = rearrange(m.to(out.dtype).reshape(heads, d_qk), "h d -> (h d)")  # (H*d_qk,)
                q, k = q * flat, k * flat
            if q_scale is not None:
                q = q * rearrange(q_scale.to(out.dtype).reshape(heads, d_qk), "h d -> (h d)")
            return torch.cat([q, k, v], dim=-1)

        def mask_v(mod: nn.Module, args: tuple) -> tuple | None:
            m = masks.get(v_label)
            keep = masks.get(heads_label) if heads_label is not None else None
            if m is None and keep is None:
                return None
            x = args[0]
            per_head = torch.ones(heads, d_v, dtype=x.dtype, device=x.device) if m is None else m.to(x.dtype)
            if keep is not None:  # a dropped head's values are zero, so its output is zero
                per_head = per_head.reshape(heads, d_v) * keep.to(x.dtype).reshape(heads, 1)
            flat = rearrange(per_head.reshape(heads, d_v), "h d -> (h d)")  # (H*d_v,)
            return (x * flat, *args[1:])

        return [
            cast(nn.Linear, module.qkv).register_forward_hook(mask_qk),
            cast(nn.Linear, module.proj).register_forward_pre_hook(mask_v),
        ]

    def fold_scales(
        self,
        layer: LayerSpace,
        widths: dict[str, int],
        params: dict[str, torch.Tensor],
        scales: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Fold per-kept-channel scales into the sliced rows: ``qk`` scales the query rows only (the
        softmax sees q.k, so scaling q_j scales that channel's term), ``v`` scales the value rows."""
        heads = widths.get(HEADS, layer.dims["qk"].heads)
        w_qk, w_v = widths["qk"], widths["v"]
        row_scale = torch.ones(heads * (2 * w_qk + w_v), dtype=torch.float64)
        if "qk" in scales:
            row_scale[: heads * w_qk] = scales["qk"].reshape(-1).double()
        if "v" in scales:
            row_scale[2 * heads * w_qk :] = scales["v"].reshape(-1).double()
        out = dict(params)
        for name in ("qkv.weight", "qkv.bias"):
            if name in out:
                t = out[name]
                factor = row_scale.to(t.device).view(-1, *([1] * (t.dim() - 1)))
                out[name] = (t.double() * factor).to(t.dtype)
        return out

    def macs(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        m = layer.meta
        return softmax_attention_macs(
            m["tokens"],
            m["kv_tokens"],
            m["embed_dim"],
            m["out_dim"],
            widths.get(HEADS, layer.dims["qk"].heads),
            widths["qk"],
            widths["v"],
        )

    def params(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        m = layer.meta
        heads = widths.get(HEADS, layer.dims["qk"].heads)
        rows = heads * (2 * widths["qk"] + widths["v"])
        count = m["embed_dim"] * rows + heads * widths["v"] * m["out_dim"] + m["extra_params"]
        if m["qkv_bias"]:
            count = count + rows
        if m["proj_bias"]:
            count = count + m["out_dim"]
        return count


def split_qkv(
    qkv: torch.Tensor, heads: int, d_qk: int, d_v: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, N, H*(2*d_qk+d_v))`` -> q, k ``(B, H, N, d_qk)`` and v ``(B, H, N, d_v)``."""
    q, k, v = qkv.split([heads * d_qk, heads * d_qk, heads * d_v], dim=-1)
    q = rearrange(q, "b n (h d) -> b h n d", h=heads)  # (B, H, N, d_qk)
    k = rearrange(k, "b n (h d) -> b h n d", h=heads)  # (B, H, N, d_qk)
    v = rearrange(v, "b n (h d) -> b h n d", h=heads)  # (B, H, N, d_v)
    return q, k, v


def pruned_attention_kwargs(module: nn.Module, widths: Mapping[str, int]) -> dict[str, Any]:
    """The constructor arguments every pruned fused-qkv attention module takes from its dense one:
    input width, heads (fewer when whole heads were dropped), per-head widths, the dense softmax
    scale, the qkv bias, the attention path flag and the dropouts."""
    heads, _, _ = head_widths(module)
    qkv = cast(nn.Linear, module.qkv)
    return {
        "dim": qkv.in_features,
        "num_heads": widths.get(HEADS, heads),
        "head_dim_qk": widths["qk"],
        "head_dim_v": widths["v"],
        "scale": float(cast(float, module.scale)),
        "qkv_bias": qkv.bias is not None,
        "fused_attn": bool(module.fused_attn),
        "attn_drop": cast(nn.Dropout, module.attn_drop).p,
        "proj_drop": cast(nn.Dropout, module.proj_drop).p,
    }


def install_sliced(new: nn.Module, module: nn.Module, params: Mapping[str, torch.Tensor]) -> nn.Module:
    """``new`` holding the sliced ``qkv`` and ``proj`` of ``params``, in ``module``'s train/eval mode."""
    new.qkv = new_linear(params["qkv.weight"], params.get("qkv.bias"))
    new.proj = new_linear(params["proj.weight"], cast(nn.Linear, module.proj).bias)
    new.train(module.training)
    return new


def new_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


#: the ways :func:`attend` can compute softmax attention (docs/speed.md)
ATTENTION_PATHS = ("sdpa", "sdpa_padded", "math")
#: device types a pruned module records a path for
PATH_DEVICES = ("cpu", "cuda")


def attention_path(device_type: str, d_qk: int, d_v: int, fused: bool = True) -> str:
    """The path :func:`attend` takes for head widths ``d_qk`` / ``d_v`` on ``device_type``.

    The choice follows the measurements of ``benchmarks/bench_attention_paths.py`` (docs/speed.md):

    - ``"math"``: the module asked for unfused attention (timm's ``fused_attn=False``);
    - ``"sdpa"``: ``scaled_dot_product_attention`` as is. Equal widths on every device; unequal
      widths on CUDA, whose memory-efficient kernel takes a value width of its own;
    - ``"sdpa_padded"``: unequal widths on the CPU, where the fused kernel needs one head width and
      otherwise falls back to a path about twice as slow as the plain matmuls: the narrower of q/k and
      v is zero-padded to the wider width (zeros add nothing to q.k, and padded value columns are
      cut from the output), with the dense model's scale passed explicitly.
    """
    if not fused:
        return "math"
    if d_qk != d_v and device_type == "cpu":
        return "sdpa_padded"
    return "sdpa"


def attention_paths(d_qk: int, d_v: int, fused: bool = True) -> dict[str, str]:
    """:func:`attention_path` for every device type in :data:`PATH_DEVICES`."""
    return {device: attention_path(device, d_qk, d_v, fused) for device in PATH_DEVICES}


def _counted() -> bool:
    """Whether a dispatch mode (FlopCounterMode, the activation tracer) sees the ops. Never while
    ``torch.compile`` traces: the compiled graph keeps the padded path, without a graph break."""
    if torch.compiler.is_compiling():
        return False
    return _len_torch_dispatch_stack() > 0


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    fused: bool,
    dropout: nn.Dropout,
    bias: torch.Tensor | None = None,
    is_causal: bool = False,
    path: str | None = None,
) -> torch.Tensor:
    """Softmax attention of q, k ``(B, H, N, d_qk)`` and v ``(B, H, N, d_v)`` -> ``(B, H, N, d_v)``.

    ``bias`` is an additive (or boolean keep-) mask broadcastable to ``(B, H, N, N)``. ``path`` is
    one of :data:`ATTENTION_PATHS`; ``None`` chooses by :func:`attention_path` for q's device. All
    paths compute the same function with the given ``scale``.

    Under a dispatch mode (a MACs count, the activation tracer of ``build_space``) the padded path
    runs as the math path instead, so what is counted is the attention of the kept widths, not the
    zeros of the padding (docs/speed.md gives what the padding adds).
    """
    d_qk, d_v = q.shape[-1], v.shape[-1]
    if path is None:
        path = attention_path(q.device.type, d_qk, d_v, fused)
    if path == "sdpa_padded" and _counted():
        path = "math"
    if path == "sdpa_padded":
        if d_v < d_qk:
            v = F.pad(v, (0, d_qk - d_v))  # (B, H, N, d_qk), zero columns
        elif d_qk < d_v:
            q = F.pad(q, (0, d_v - d_qk))  # (B, H, N, d_v), zero channels add nothing to q.k
            k = F.pad(k, (0, d_v - d_qk))  # (B, H, N, d_v)
    if path in ("sdpa", "sdpa_padded"):
        p = dropout.p if dropout.training else 0.0
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=p, is_causal=is_causal, scale=scale
        )  # (B, H, N, max(d_qk, d_v)) when padded
        return out[..., :d_v] if path == "sdpa_padded" else out
    if path != "math":
        raise ValueError(f"unknown attention path {path!r}; choose one of {ATTENTION_PATHS}")
    attn = (q * scale) @ k.transpose(-2, -1)  # (B, H, N, N)
    if is_causal:
        n = attn.shape[-1]
        attn = attn + attn.new_full((n, n), float("-inf")).triu_(1)
    elif bias is not None:
        attn = attn.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else attn + bias
    return dropout(attn.softmax(dim=-1)) @ v  # (B, H, N, d_v)
