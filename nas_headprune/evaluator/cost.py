"""Analytic MACs and parameter counts (METHOD.md section 4).

The cost of an architecture is the fixed part of the model (patch embedding, head, patch merging,
anything left dense) plus each prunable layer's own formula, evaluated at the layer's widths. The
formulas are plain arithmetic, so they accept ints, floats or tensors: with soft (straight-through)
kept counts the MACs are differentiable, which the similarity_indicator strategy uses as a loss.
Per image, batch 1; ``flops = 2 * macs`` everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nas_headprune.space import HeadSpace, split_label


def softmax_attention_macs(
    tokens: int, kv_tokens: int, embed_dim: int, out_dim: int, heads: int, d_qk: Any, d_v: Any
) -> Any:
    """qkv and proj projections plus q.k^T and attn.v over ``kv_tokens`` keys per query."""
    projections = tokens * embed_dim * heads * (2 * d_qk + d_v) + tokens * heads * d_v * out_dim
    attention = heads * tokens * kv_tokens * (d_qk + d_v)
    return projections + attention


def linear_attention_macs(
    tokens: int,
    embed_dim: int,
    out_dim: int,
    heads: int,
    d_qk: Any,
    d_v: Any,
    kernel_size: int,
    dwc_tokens: int | None = None,
) -> Any:
    """Focused linear attention: projections, phi(K)^T V and phi(Q)(KV), normaliser, depthwise conv.

    ``dwc_tokens`` is the number of tokens on the spatial grid the depthwise conv runs over (all
    tokens by default; a class token has no grid position and no conv term).
    """
    projections = tokens * embed_dim * heads * (2 * d_qk + d_v) + tokens * heads * d_v * out_dim
    products = 2 * heads * tokens * d_qk * d_v
    normaliser = heads * tokens * d_qk
    grid = tokens if dwc_tokens is None else dwc_tokens
    dwc = grid * heads * d_v * kernel_size * kernel_size
    return projections + products + normaliser + dwc


def mlp_macs(tokens: int, in_dim: int, hidden: Any, out_dim: int) -> Any:
    return tokens * in_dim * hidden + tokens * hidden * out_dim


@dataclass
class CostReport:
    """MACs and parameters of one architecture: totals and per layer."""

    macs: Any
    params: Any
    fixed_macs: int
    fixed_params: int
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def flops(self) -> Any:
        return 2 * self.macs

    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            return float(v) if hasattr(v, "item") else v

        return {
            "macs": plain(self.macs),
            "flops": plain(self.flops),
            "params": plain(self.params),
            "fixed_macs": self.fixed_macs,
            "fixed_params": self.fixed_params,
            "layers": {k: {kk: plain(vv) for kk, vv in v.items()} for k, v in self.layers.items()},
        }


def analytic_cost(
    space: HeadSpace, arch: Mapping[str, Any] | None = None, *, validate: bool = False
) -> CostReport:
    """MACs and parameters of ``space`` at ``arch`` (dense when ``None``).

    ``arch`` values may be tensors (soft kept counts) for a differentiable cost; ``validate=True``
    checks an integer architecture against the space first.
    """
    if arch is None:
        arch = space.dense()
    elif validate:
        arch = space.validate(arch)
    per_layer: dict[str, dict[str, Any]] = {}
    widths: dict[str, dict[str, Any]] = {name: {} for name in space.layers}
    for label, value in arch.items():
        layer_name, kind = split_label(label)
        if layer_name not in widths:
            space.layer_of(label)  # raises with the known labels
        widths[layer_name][kind] = value
    total_macs: Any = space.fixed_macs
    total_params: Any = space.fixed_params
    for name, layer in space.layers.items():
        w = {**layer.dense_widths(), **widths[name]}
        macs = layer.macs(w)
        params = layer.params(w)
        per_layer[name] = {"macs": macs, "params": params}
        total_macs = total_macs + macs
        total_params = total_params + params
    return CostReport(total_macs, total_params, space.fixed_macs, space.fixed_params, per_layer)
