"""Shared pieces of adapters for softmax attention with *separate* query, key and value projections.

Layouts handled (names relative to the attention module, set as class attributes of the adapter):

* three Linears, ``q``, ``k``, ``v`` (CaiT ``ClassAttn``, Hugging Face BERT ``self.query`` /
  ``self.key`` / ``self.value``, Hugging Face ViT ``q_proj`` / ``k_proj`` / ``v_proj``);
* a query Linear and one key/value Linear whose rows are ``(2, H, d)``, keys first (PVTv2's ``q``
  and ``kv``).

Rows of each projection are ``(H, d)``; the output projection's columns are ``(H, d_v)``. A pruned
module keeps ``H`` heads with a query/key width ``d_qk`` and a value width ``d_v``; a shared
key/value Linear keeps its rows as ``[k (H, d_qk), v (H, d_v)]``.

Query and key tokens may differ: ``q_tokens`` queries attend over ``kv_tokens`` keys (one class
token over all tokens in ``ClassAttn``; a spatially reduced key/value map in PVTv2).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, cast

import torch
from einops import rearrange
from torch import nn

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


def _linear(module: nn.Module, path: str) -> nn.Linear:
    return cast(nn.Linear, module.get_submodule(path))


def _flat(mask: torch.Tensor, heads: int, width: int, like: torch.Tensor) -> torch.Tensor:
    return rearrange(mask.to(like.dtype).reshape(heads, width), "h d -> (h d)")  # (H*width,)


class SplitQkvAdapter(SpaceAdapter):
    """Coupling, masks, scale folding and cost of attention with separate q / k / v projections.

    Subclasses set the projection paths and implement ``claims``, ``head_widths``, ``describe``
    (usually through :meth:`_describe`) and ``build_pruned``.
    """

    kind = "attention"
    q_name: ClassVar[str] = "q"
    k_name: ClassVar[str] = "k"
    v_name: ClassVar[str] = "v"  # equal to k_name: one Linear holds k rows, then v rows
    out_name: ClassVar[str] = "proj"

    def head_widths(self, module: nn.Module) -> tuple[int, int, int]:
        """``(H, d_qk, d_v)`` of a dense or pruned module."""
        raise NotImplementedError

    @property
    def shared_kv(self) -> bool:
        return self.k_name == self.v_name

    def input_dim(self, module: nn.Module) -> int:
        return _linear(module, self.q_name).in_features

    def _projections(self, module: nn.Module) -> list[nn.Linear]:
        names = dict.fromkeys([self.q_name, self.k_name, self.v_name, self.out_name])
        return [_linear(module, n) for n in names]

    def _describe(
        self, label: str, module: nn.Module, tokens: int, q_tokens: int, kv_tokens: int, **extra: Any
    ) -> LayerSpace:
        heads, d_qk, d_v = self.head_widths(module)
        q, k, v, out = (_linear(module, n) for n in (self.q_name, self.k_name, self.v_name, self.out_name))
        dense = sum(
            t.numel() for lin in self._projections(module) for t in (lin.weight, lin.bias) if t is not None
        )
        meta = {
            "attention": self.attention_kind,
            "tokens": tokens,
            "q_tokens": q_tokens,
            "kv_tokens": kv_tokens,
            "embed_dim": q.in_features,
            "out_dim": out.out_features,
            "q_bias": q.bias is not None,
            "k_bias": k.bias is not None,
            "v_bias": v.bias is not None,
            "out_bias": out.bias is not None,
            # parameters the widths do not touch (norms, a spatial-reduction conv)
            "extra_params": sum(p.numel() for p in module.parameters()) - dense,
            # MACs of the module that the widths do not touch (a spatial-reduction conv)
            "extra_macs": 0,
            **extra,
        }
        dims = {
            "qk": DimSpec(dim_label(label, "qk"), "qk", heads, d_qk),
            "v": DimSpec(dim_label(label, "v"), "v", heads, d_v),
        }
        return LayerSpace(label, self.name, self.kind, dims, meta, self)

    # -------------------------------------------------------------------------------- coupling
    def _offsets(self, layer: LayerSpace) -> tuple[int, int]:
        """Row offsets of the keys and the values in their Linears."""
        heads, d_qk = layer.dims["qk"].heads, layer.dims["qk"].max_width
        return 0, (heads * d_qk if self.shared_kv else 0)

    def coupling(self, layer: LayerSpace) -> dict[str, list[Slot]]:
        d_qk, d_v = layer.dims["qk"].max_width, layer.dims["v"].max_width
        k0, v0 = self._offsets(layer)
        m = layer.meta
        qk = [Slot(f"{self.q_name}.weight", 0, 0, d_qk), Slot(f"{self.k_name}.weight", 0, k0, d_qk)]
        v = [Slot(f"{self.v_name}.weight", 0, v0, d_v), Slot(f"{self.out_name}.weight", 1, 0, d_v)]
        if m["q_bias"]:
            qk.append(Slot(f"{self.q_name}.bias", 0, 0, d_qk))
        if m["k_bias"]:
            qk.append(Slot(f"{self.k_name}.bias", 0, k0, d_qk))
        if m["v_bias"]:
            v.append(Slot(f"{self.v_name}.bias", 0, v0, d_v))
        return {"qk": qk, "v": v}

    # ----------------------------------------------------------------------------- activations
    def watch_channels(
        self, module: nn.Module, layer: LayerSpace, sink: ChannelSink
    ) -> list[torch.utils.hooks.RemovableHandle] | None:
        """Queries, keys and values as their Linears give them (hooks on their outputs)."""
        heads = layer.dims["qk"].heads
        d_qk, d_v = layer.dims["qk"].max_width, layer.dims["v"].max_width

        def read(*kinds: str):
            widths = [d_qk if kind == "qk" else d_v for kind in kinds]

            def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
                for kind, part in zip(kinds, out.split([heads * w for w in widths], dim=-1), strict=True):
                    sink(kind, rearrange(part, "... (h d) -> ... h d", h=heads))  # (..., H, d)

            return hook

        handles = [_linear(module, self.q_name).register_forward_hook(read("qk"))]
        if self.shared_kv:  # one Linear: key rows, then value rows
            handles.append(_linear(module, self.k_name).register_forward_hook(read("qk", "v")))
        else:
            handles.append(_linear(module, self.k_name).register_forward_hook(read("qk")))
            handles.append(_linear(module, self.v_name).register_forward_hook(read("v")))
        return handles

    # ----------------------------------------------------------------------------------- masks
    def install_masks(
        self, module: nn.Module, layer: LayerSpace, masks: MaskSet
    ) -> list[torch.utils.hooks.RemovableHandle]:
        qk_label, v_label = layer.dims["qk"].label, layer.dims["v"].label
        heads = layer.dims["qk"].heads
        d_qk, d_v = layer.dims["qk"].max_width, layer.dims["v"].max_width
        shared = self.shared_kv

        def mask_q(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            m = masks.get(qk_label)
            q_scale = masks.get(qk_label + QUERY_SCALE)
            if m is not None:
                out = out * _flat(m, heads, d_qk, out)
            if q_scale is not None:
                out = out * _flat(q_scale, heads, d_qk, out)
            return out if m is not None or q_scale is not None else None

        def mask_k(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            m = masks.get(qk_label)
            if m is None:
                return None
            if not shared:
                return out * _flat(m, heads, d_qk, out)
            k, v = out.split([heads * d_qk, heads * d_v], dim=-1)  # (..., H*d_qk), (..., H*d_v)
            return torch.cat([k * _flat(m, heads, d_qk, out), v], dim=-1)

        def mask_v(mod: nn.Module, args: tuple) -> tuple | None:
            m = masks.get(v_label)
            if m is None:
                return None
            x = args[0]  # the attention output, (..., H*d_v)
            return (x * _flat(m, heads, d_v, x), *args[1:])

        return [
            _linear(module, self.q_name).register_forward_hook(mask_q),
            _linear(module, self.k_name).register_forward_hook(mask_k),
            _linear(module, self.out_name).register_forward_pre_hook(mask_v),
        ]

    # ------------------------------------------------------------------------------ reweight
    def fold_scales(
        self,
        layer: LayerSpace,
        widths: dict[str, int],
        params: dict[str, torch.Tensor],
        scales: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Query scales multiply the kept query rows (the softmax sees q.k, so scaling q_j scales that
        channel's term), value scales the kept value rows: both exact."""
        heads = layer.dims["qk"].heads
        out = dict(params)
        v_start = heads * widths["qk"] if self.shared_kv else 0
        for kind, name, start, width in (
            ("qk", self.q_name, 0, widths["qk"]),
            ("v", self.v_name, v_start, widths["v"]),
        ):
            if kind not in scales:
                continue
            factor = scales[kind].reshape(-1).double()  # (H*width,)
            for pname in (f"{name}.weight", f"{name}.bias"):
                if pname not in out:
                    continue
                t = out[pname]
                rows = torch.ones(t.shape[0], dtype=torch.float64)
                rows[start : start + heads * width] = factor
                rows = rows.to(t.device).view(-1, *([1] * (t.dim() - 1)))
                out[pname] = (t.double() * rows).to(t.dtype)
        return out

    # ---------------------------------------------------------------------------------- cost
    def macs(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        m = layer.meta
        heads = layer.dims["qk"].heads
        d_qk, d_v = widths["qk"], widths["v"]
        nq, nk, c = m["q_tokens"], m["kv_tokens"], m["embed_dim"]
        projections = nq * c * heads * d_qk + nk * c * heads * (d_qk + d_v) + nq * heads * d_v * m["out_dim"]
        attention = heads * nq * nk * (d_qk + d_v)
        return projections + attention + m["extra_macs"]

    def params(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        m = layer.meta
        heads = layer.dims["qk"].heads
        rows_qk, rows_v = heads * widths["qk"], heads * widths["v"]
        count = m["embed_dim"] * (2 * rows_qk + rows_v) + rows_v * m["out_dim"] + m["extra_params"]
        count = count + rows_qk * (int(m["q_bias"]) + int(m["k_bias"])) + rows_v * int(m["v_bias"])
        if m["out_bias"]:
            count = count + m["out_dim"]
        return count


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, H*d)`` -> ``(B, H, N, d)``."""
    return rearrange(x, "b n (h d) -> b h n d", h=heads)
