"""Space adapter for FLatten's focused linear attention (:mod:`nas_headprune.models.flatten`).

Query/key channels live in the q and k rows of ``qkv``, the positional encoding and the learnable
scale (and ``q_gamma`` when present); value channels in the v rows of ``qkv``, the ``proj`` columns
and the depthwise conv. The dense module shares one conv kernel per channel across heads; once
heads keep different channels the pruned module holds one kernel per kept (head, channel).

Masks go through the module's own ``qk_mask`` / ``v_mask`` attributes, which it applies after the
ReLU and the scale division, before the focusing function's norms, so a masked channel contributes
nothing anywhere. Reweight scales: value scales fold exactly into the ``proj`` columns (they
multiply the attention output plus the conv output, conv bias included); query scales cannot be
folded through the focusing nonlinearity and stay as the pruned module's ``q_gamma``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from einops import rearrange
from torch import nn

from nas_headprune.evaluator.cost import linear_attention_macs
from nas_headprune.models.flatten import FocusedLinearAttention
from nas_headprune.space import (
    QUERY_SCALE,
    ChannelSink,
    DimSpec,
    LayerSpace,
    MaskSet,
    Slot,
    SpaceAdapter,
    dim_label,
)

from ._fused_qkv import new_linear


class FocusedLinearAttentionAdapter(SpaceAdapter):
    name = "flatten_linear_attention"
    kind = "attention"
    attention_kind = "linear"

    def claims(self, module: nn.Module) -> bool:
        return type(module) is FocusedLinearAttention

    def input_dim(self, module: nn.Module) -> int:
        return cast(FocusedLinearAttention, module).qkv.in_features

    def describe(self, label: str, module: nn.Module, tokens: int) -> LayerSpace:
        attn = cast(FocusedLinearAttention, module)
        heads, d_qk, d_v = attn.num_heads, attn.head_dim_qk, attn.head_dim_v
        k = attn.kernel_size
        meta = {
            "attention": self.attention_kind,
            "tokens": tokens,
            "grid_tokens": attn.grid_size[0] * attn.grid_size[1],
            "num_prefix_tokens": attn.num_prefix_tokens,
            "embed_dim": attn.qkv.in_features,
            "out_dim": attn.proj.out_features,
            "qkv_bias": attn.qkv.bias is not None,
            "kernel_size": k,
            "dwc_kernels": attn.dwc_kernels,
            "dense_widths": [d_qk, d_v],
            "q_gamma": attn.q_gamma is not None,
        }
        dims = {
            "qk": DimSpec(dim_label(label, "qk"), "qk", heads, d_qk),
            "v": DimSpec(dim_label(label, "v"), "v", heads, d_v),
        }
        return LayerSpace(label, self.name, self.kind, dims, meta, self)

    def coupling(self, layer: LayerSpace) -> dict[str, list[Slot]]:
        heads = layer.dims["qk"].heads
        d_qk, d_v = layer.dims["qk"].max_width, layer.dims["v"].max_width
        q0, k0, v0 = 0, heads * d_qk, 2 * heads * d_qk
        dwc_stride = 0 if layer.meta["dwc_kernels"] == "shared" else d_v
        qk = [
            Slot("qkv.weight", 0, q0, d_qk),
            Slot("qkv.weight", 0, k0, d_qk),
            Slot("positional_encoding", 2, 0, d_qk),
            Slot("scale", 2, 0, d_qk),
        ]
        v = [
            Slot("qkv.weight", 0, v0, d_v),
            Slot("proj.weight", 1, 0, d_v),
            Slot("dwc.weight", 0, 0, dwc_stride),
            Slot("dwc.bias", 0, 0, dwc_stride),
        ]
        if layer.meta["qkv_bias"]:
            qk += [Slot("qkv.bias", 0, q0, d_qk), Slot("qkv.bias", 0, k0, d_qk)]
            v.append(Slot("qkv.bias", 0, v0, d_v))
        if layer.meta["q_gamma"]:
            qk.append(Slot("q_gamma", 0, 0, d_qk))
        return {"qk": qk, "v": v}

    def install_masks(
        self, module: nn.Module, layer: LayerSpace, masks: MaskSet
    ) -> list[torch.utils.hooks.RemovableHandle]:
        qk_label, v_label = layer.dims["qk"].label, layer.dims["v"].label
        heads, d_qk = layer.dims["qk"].heads, layer.dims["qk"].max_width

        def set_masks(mod: FocusedLinearAttention, args: tuple) -> None:
            mod.qk_mask = masks.get(qk_label)
            mod.v_mask = masks.get(v_label)

        def scale_queries(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            q_scale = masks.get(qk_label + QUERY_SCALE)
            if q_scale is None:
                return None
            flat = rearrange(q_scale.to(out.dtype).reshape(heads, d_qk), "h d -> (h d)")  # (H*d_qk,)
            q, rest = out.split([heads * d_qk, out.shape[-1] - heads * d_qk], dim=-1)
            return torch.cat([q * flat, rest], dim=-1)

        attn = cast(FocusedLinearAttention, module)
        return [
            attn.register_forward_pre_hook(set_masks),
            attn.qkv.register_forward_hook(scale_queries),
        ]

    def watch_channels(
        self, module: nn.Module, layer: LayerSpace, sink: ChannelSink
    ) -> list[torch.utils.hooks.RemovableHandle] | None:
        """q, k and v as the ``qkv`` Linear gives them (before the ReLU, the scale and the focusing
        function): a hook on its output."""
        heads = layer.dims["qk"].heads
        d_qk, d_v = layer.dims["qk"].max_width, layer.dims["v"].max_width

        def read(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            q, k, v = out.split([heads * d_qk, heads * d_qk, heads * d_v], dim=-1)
            sink("qk", rearrange(q, "... (h d) -> ... h d", h=heads))  # (..., H, d_qk)
            sink("qk", rearrange(k, "... (h d) -> ... h d", h=heads))  # (..., H, d_qk)
            sink("v", rearrange(v, "... (h d) -> ... h d", h=heads))  # (..., H, d_v)

        return [cast(FocusedLinearAttention, module).qkv.register_forward_hook(read)]

    def focused_features(
        self, module: nn.Module, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """phi(Q), phi(K) ``(B, H, N, d_qk)`` of ``module`` on its input ``x`` (the first argument
        of its forward; for the attention-difference initialisation of the similarity_indicator
        strategy)."""
        x = args[0] if args else kwargs["x"]
        phi_q, phi_k, _ = cast(FocusedLinearAttention, module).features(x)
        return phi_q, phi_k

    def remove_masks(self, module: nn.Module) -> None:
        attn = cast(FocusedLinearAttention, module)
        attn.qk_mask = None
        attn.v_mask = None

    def fold_scales(
        self,
        layer: LayerSpace,
        widths: dict[str, int],
        params: dict[str, torch.Tensor],
        scales: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        out = dict(params)
        if "v" in scales:
            w = out["proj.weight"]  # (C_out, H*w_v)
            factor = scales["v"].reshape(1, -1).to(device=w.device, dtype=torch.float64)
            out["proj.weight"] = (w.double() * factor).to(w.dtype)
        if "qk" in scales:
            q_scale = scales["qk"].reshape(-1).to(out["qkv.weight"].dtype)
            existing = out.get("q_gamma")
            out["q_gamma"] = q_scale if existing is None else existing * q_scale
        return out

    def build_pruned(
        self, module: nn.Module, layer: LayerSpace, widths: dict[str, int], params: dict[str, torch.Tensor]
    ) -> nn.Module:
        attn = cast(FocusedLinearAttention, module)
        dense_v = widths["v"] == layer.dims["v"].max_width
        keep_shared = dense_v and attn.dwc_kernels == "shared"  # dense v: every head keeps 0..d-1
        new = FocusedLinearAttention(
            dim=attn.qkv.in_features,
            num_heads=attn.num_heads,
            grid_size=attn.grid_size,
            qkv_bias=attn.qkv.bias is not None,
            focusing_factor=attn.focusing_factor,
            kernel_size=attn.kernel_size,
            proj_drop=attn.proj_drop.p,
            head_dim_qk=widths["qk"],
            head_dim_v=widths["v"],
            dwc_kernels="shared" if keep_shared else "per_channel",
            num_prefix_tokens=attn.num_prefix_tokens,
        ).to(device=attn.qkv.weight.device, dtype=attn.qkv.weight.dtype)
        new.qkv = new_linear(params["qkv.weight"], params.get("qkv.bias"))
        new.proj = new_linear(params["proj.weight"], attn.proj.bias)
        with torch.no_grad():
            new.positional_encoding.copy_(params["positional_encoding"])
            new.scale.copy_(params["scale"])
            if keep_shared:
                new.dwc.load_state_dict(attn.dwc.state_dict())
            else:
                assert new.dwc.bias is not None  # the depthwise conv is built with a bias
                new.dwc.weight.copy_(params["dwc.weight"])
                new.dwc.bias.copy_(params["dwc.bias"])
            if params.get("q_gamma") is not None:
                new.enable_q_gamma().copy_(params["q_gamma"])
        return new

    def macs(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        m = layer.meta
        return linear_attention_macs(
            m["tokens"],
            m["embed_dim"],
            m["out_dim"],
            layer.dims["qk"].heads,
            widths["qk"],
            widths["v"],
            m["kernel_size"],
            dwc_tokens=m["grid_tokens"],
        )

    def params(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        m = layer.meta
        heads = layer.dims["qk"].heads
        w_qk, w_v = widths["qk"], widths["v"]
        k2 = m["kernel_size"] ** 2
        rows = heads * (2 * w_qk + w_v)
        count = m["embed_dim"] * rows + heads * w_v * m["out_dim"] + m["out_dim"]
        count = count + m["tokens"] * heads * w_qk + heads * w_qk  # positional encoding, scale
        if m["qkv_bias"]:
            count = count + rows
        if m["q_gamma"]:
            count = count + heads * w_qk
        dense_v = layer.dims["v"].max_width
        if m["dwc_kernels"] == "shared" and _is_dense(w_v, dense_v):
            count = count + dense_v * (k2 + 1)
        else:
            count = count + heads * w_v * (k2 + 1)
        return count


def _is_dense(width: Any, dense: int) -> bool:
    try:
        return bool(width == dense)
    except RuntimeError:  # a tensor with several elements: not a plain width
        return False
