"""Space adapter for timm ``EvaAttention`` (EVA, EVA02, DINOv3 and the other ``timm.models.eva``
models built with ``attn_type="eva"``).

Value channels are pruned per head, exactly as for timm ``Attention``: the v rows of ``qkv`` (or
``v_proj``), ``v_bias``, the ``proj`` columns and, in gated attention, the rows of ``gate`` (the
gate multiplies each value channel of the output). Query/key channels are kept: the ``:qk``
dimension of a layer is one unit per head, the head's whole q/k block, whose only width is 1 (the
block is always kept). Its mask multiplies the head's q and k, so strategies can still score and
scale it, and a query scale folds into the q rows.

Why q/k stay whole. The models pass a rotary position embedding (``rope``) to the module at every
call. ``apply_rot_embed_cat`` rotates q/k channels in pairs, each pair by its own frequency:

* interleaved layout (``rotate_half=False``; EVA02 and every model without ``rope_rotate_half``):
  channels ``2j`` and ``2j + 1`` of a head form pair ``j``; sin/cos are laid out
  ``[f0, f0, f1, f1, ...]`` and ``rot(x) = [-x1, x0, -x3, x2, ...]``;
* half-split layout (``rotate_half=True``; DINOv3, LingBot): channels ``j`` and ``j + d/2`` form
  pair ``j``; sin/cos are ``[f0, f1, ..., f0, f1, ...]`` and ``rot(x) = [-x_{d/2:}, x_{:d/2}]``.

Pruning q/k exactly therefore means keeping or removing whole pairs, and the pruned module must
know which pair each kept one was, to rotate it by that pair's frequency. The search-space core
cannot express either today: a coupling :class:`~nas_headprune.space.Slot` addresses channel ``j``
of head ``h`` at ``offset + h * head_stride + j``, which reaches the half-split pair ``(j, j +
d/2)`` with two slots but not the interleaved pair ``(2j, 2j + 1)``; and ``build_pruned`` receives
the sliced parameters but not the kept indices, while the frequencies live outside the module's
parameters. (A width ``step`` of 2 would not hold either: strategies replace the step of every
dimension with their own ``width_step``.) The module cannot tell whether it will be given a
``rope`` at all, so EVA without rotary embeddings keeps q/k whole too.

Refused: a ``norm`` between the attention and ``proj`` (EVA02's sub-LN, ``scale_attn_inner``) is a
LayerNorm over all value channels of a token, so removing one changes the mean and variance the
others are normalised with. Per-head ``q_norm`` / ``k_norm`` are fine, since q/k channels are kept
(but a query scale then cannot fold into the q rows: the norm would undo it).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, cast

import torch
from einops import rearrange
from timm.layers import apply_rot_embed_cat
from timm.models.eva import EvaAttention
from torch import nn

from nas_headprune.errors import ArchitectureError
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

from ._fused_qkv import attend, new_linear
from ._qv_bias import qv_bias_qkv


class PrunedEvaAttention(nn.Module):
    """``EvaAttention`` whose heads keep all ``head_dim`` query/key channels and ``head_dim_v``
    value channels each; same call signature (``rope``, ``attn_mask``, ``is_causal``), projections
    (fused ``qkv`` with ``q_bias`` / ``v_bias``, or ``q_proj`` / ``k_proj`` / ``v_proj``), q/k norms
    and gate as the dense module, and the dense model's softmax scale."""

    q_bias: nn.Parameter | None
    k_bias: torch.Tensor | None
    v_bias: nn.Parameter | None

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        head_dim_v: int,
        scale: float,
        qkv_fused: bool = True,
        qkv_bias_separate: bool = False,
        num_prefix_tokens: int = 1,
        rotate_half: bool = False,
        fused_attn: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.head_dim_v = head_dim_v
        self.scale = scale
        self.qkv_bias_separate = qkv_bias_separate
        self.num_prefix_tokens = num_prefix_tokens
        self.rotate_half = rotate_half
        self.fused_attn = fused_attn
        # projections, biases, norms and gate are set by the adapter from the dense module
        self.qkv: nn.Linear | None = None
        self.q_proj: nn.Linear | None = None
        self.k_proj: nn.Linear | None = None
        self.v_proj: nn.Linear | None = None
        self.register_parameter("q_bias", None)
        self.register_buffer("k_bias", None, persistent=False)
        self.register_parameter("v_bias", None)
        if qkv_fused:
            self.qkv = nn.Linear(dim, num_heads * (2 * head_dim + head_dim_v), bias=False)
        else:
            self.q_proj = nn.Linear(dim, num_heads * head_dim)
            self.k_proj = nn.Linear(dim, num_heads * head_dim, bias=False)
            self.v_proj = nn.Linear(dim, num_heads * head_dim_v)
        self.q_norm: nn.Module = nn.Identity()
        self.k_norm: nn.Module = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.gate: nn.Linear | None = None
        self.proj = nn.Linear(num_heads * head_dim_v, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        heads = self.num_heads
        gate = self.gate(x).sigmoid() if self.gate is not None else None  # (B, N, H*d_v)
        if self.qkv is not None:
            q, k, v = qv_bias_qkv(self, x).split(
                [heads * self.head_dim, heads * self.head_dim, heads * self.head_dim_v], dim=-1
            )
        else:
            assert self.q_proj is not None and self.k_proj is not None and self.v_proj is not None
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = rearrange(q, "b n (h d) -> b h n d", h=heads)  # (B, H, N, d)
        k = rearrange(k, "b n (h d) -> b h n d", h=heads)  # (B, H, N, d)
        v = rearrange(v, "b n (h d) -> b h n d", h=heads)  # (B, H, N, d_v)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # rotary embedding on every token after the prefix tokens, as timm
            npt = self.num_prefix_tokens
            q = torch.cat(
                [q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=self.rotate_half)], dim=2
            )
            k = torch.cat(
                [k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=self.rotate_half)], dim=2
            )
            q, k = q.type_as(v), k.type_as(v)
        out = attend(
            q,
            k,
            v,
            self.scale,
            fused=self.fused_attn,
            dropout=self.attn_drop,
            bias=attn_mask,
            is_causal=is_causal,
        )  # (B, H, N, d_v)
        out = rearrange(out, "b h n d -> b n (h d)")  # (B, N, H*d_v)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


def _widths(module: nn.Module) -> tuple[int, int, int]:
    """``(H, d, d_v)`` of a dense or pruned module: heads, q/k width, value width."""
    heads, d = cast(int, module.num_heads), cast(int, module.head_dim)
    return heads, d, cast(int, getattr(module, "head_dim_v", d))


def _head_major(t: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows gathered one slot per channel, ``(d, H)`` order, to the module's ``(H, d)`` order."""
    return rearrange(t, "(c h) ... -> (h c) ...", h=heads)


class TimmEvaAttentionAdapter(SpaceAdapter):
    """timm ``EvaAttention`` and the project's ``PrunedEvaAttention``: value channels per head."""

    name = "timm_eva_attention"
    kind = "attention"

    def claims(self, module: nn.Module) -> bool:
        return type(module) in (EvaAttention, PrunedEvaAttention)

    def check(self, module: nn.Module) -> str | None:
        if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
            return (
                "scale_attn_inner (sub-LN) normalises the attention output over all value channels "
                "before proj, so removing one changes the mean and variance of the rest"
            )
        return None

    def input_dim(self, module: nn.Module) -> int:
        proj = module.qkv if module.qkv is not None else module.q_proj
        return cast(nn.Linear, proj).in_features

    # ------------------------------------------------------------------ description
    def describe(self, label: str, module: nn.Module, tokens: int) -> LayerSpace:
        heads, d, d_v = _widths(module)
        fused = module.qkv is not None
        gate = cast("nn.Linear | None", module.gate)
        proj = cast(nn.Linear, module.proj)
        if fused:
            q_bias = module.q_bias is not None
            k_bias, v_bias = False, q_bias
        else:
            q_bias = cast(nn.Linear, module.q_proj).bias is not None
            k_bias = cast(nn.Linear, module.k_proj).bias is not None
            v_bias = cast(nn.Linear, module.v_proj).bias is not None
        meta: dict[str, Any] = {
            "attention": "softmax",
            "qk_unit": "head",  # q/k channels are kept: one unit per head, always kept
            "tokens": tokens,
            "kv_tokens": tokens,
            "embed_dim": self.input_dim(module),
            "out_dim": proj.out_features,
            "head_dim": d,
            "qkv_fused": fused,
            "q_bias": q_bias,
            "k_bias": k_bias,
            "v_bias": v_bias,
            "proj_bias": proj.bias is not None,
            "gate": gate is not None,
            "gate_bias": gate is not None and gate.bias is not None,
            "qk_norm": not (
                isinstance(module.q_norm, nn.Identity) and isinstance(module.k_norm, nn.Identity)
            ),
            "extra_params": 0,
        }
        dims = {
            "qk": DimSpec(dim_label(label, "qk"), "qk", heads, 1),
            "v": DimSpec(dim_label(label, "v"), "v", heads, d_v),
        }
        layer = LayerSpace(label, self.name, self.kind, dims, meta, self)
        # parameters the widths do not touch: the q/k norms
        meta["extra_params"] = sum(p.numel() for p in module.parameters()) - self.params(
            layer, layer.dense_widths()
        )
        return layer

    def coupling(self, layer: LayerSpace) -> dict[str, list[Slot]]:
        m = layer.meta
        heads, d, d_v = layer.dims["v"].heads, m["head_dim"], layer.dims["v"].max_width
        qk: list[Slot] = []
        v: list[Slot] = [Slot("proj.weight", 1, 0, d_v)]
        # the head's q/k block is one unit: one slot per channel c, at c + h * d
        if m["qkv_fused"]:
            qk += [Slot("qkv.weight", 0, c, d) for c in range(d)]
            qk += [Slot("qkv.weight", 0, heads * d + c, d) for c in range(d)]
            if m["q_bias"]:
                qk += [Slot("q_bias", 0, c, d) for c in range(d)]
            v.append(Slot("qkv.weight", 0, 2 * heads * d, d_v))
            if m["v_bias"]:
                v.append(Slot("v_bias", 0, 0, d_v))
        else:
            for proj, has_bias in (("q_proj", m["q_bias"]), ("k_proj", m["k_bias"])):
                qk += [Slot(f"{proj}.weight", 0, c, d) for c in range(d)]
                if has_bias:
                    qk += [Slot(f"{proj}.bias", 0, c, d) for c in range(d)]
            v.append(Slot("v_proj.weight", 0, 0, d_v))
            if m["v_bias"]:
                v.append(Slot("v_proj.bias", 0, 0, d_v))
        if m["gate"]:
            v.append(Slot("gate.weight", 0, 0, d_v))
            if m["gate_bias"]:
                v.append(Slot("gate.bias", 0, 0, d_v))
        return {"qk": qk, "v": v}

    # ------------------------------------------------------------------ activations
    def watch_channels(
        self, module: nn.Module, layer: LayerSpace, sink: ChannelSink
    ) -> list[torch.utils.hooks.RemovableHandle] | None:
        """The values as the projection gives them, bias included: from ``v_proj``'s output, or
        recomputed from the module's input for a fused ``qkv`` (with q/v biases the forward calls
        ``F.linear`` on ``qkv.weight`` and never the ``qkv`` submodule). The ``:qk`` dimension has
        width 1 (one unit per head) and needs none."""
        heads, d, d_v = layer.dims["v"].heads, layer.meta["head_dim"], layer.dims["v"].max_width
        if not layer.meta["qkv_fused"]:

            def read_v(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
                sink("v", rearrange(out, "... (h d) -> ... h d", h=heads))  # (..., H, d_v)

            return [cast(nn.Linear, module.v_proj).register_forward_hook(read_v)]

        def read_qkv(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["x"]
            v = qv_bias_qkv(mod, x)[..., 2 * heads * d :]  # (..., H*d_v)
            sink("v", rearrange(v, "... (h d) -> ... h d", h=heads, d=d_v))  # (..., H, d_v)

        return [module.register_forward_pre_hook(read_qkv, with_kwargs=True)]

    # ------------------------------------------------------------------------ masks
    def install_masks(
        self, module: nn.Module, layer: LayerSpace, masks: MaskSet
    ) -> list[torch.utils.hooks.RemovableHandle]:
        qk_label, v_label = layer.dims["qk"].label, layer.dims["v"].label
        heads, d_v = layer.dims["v"].heads, layer.dims["v"].max_width

        def per_head(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            return t.to(like.dtype).reshape(1, heads, 1, 1)  # a factor per head on (B, H, N, d)

        # after the q/k norms (modules, nn.Identity when absent), before the rotary embedding: a
        # per-head factor commutes with the rotation
        def mask_q(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            m, s = masks.get(qk_label), masks.get(qk_label + QUERY_SCALE)
            if m is None and s is None:
                return None
            if m is not None:
                out = out * per_head(m, out)
            return out * per_head(s, out) if s is not None else out

        def mask_k(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            m = masks.get(qk_label)
            return None if m is None else out * per_head(m, out)

        def mask_v(mod: nn.Module, args: tuple) -> tuple | None:
            m = masks.get(v_label)
            if m is None:
                return None
            x = args[0]
            return (x * m.to(x.dtype).reshape(heads * d_v), *args[1:])  # (H*d_v,) on (B, N, H*d_v)

        return [
            cast(nn.Module, module.q_norm).register_forward_hook(mask_q),
            cast(nn.Module, module.k_norm).register_forward_hook(mask_k),
            cast(nn.Linear, module.proj).register_forward_pre_hook(mask_v),
        ]

    # ---------------------------------------------------------------------- surgery
    def fold_scales(
        self,
        layer: LayerSpace,
        widths: dict[str, int],
        params: dict[str, torch.Tensor],
        scales: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """A query scale (one per head) multiplies the head's q rows and bias, a value scale the
        value rows and bias; with q/k norms the query scale comes after the norm and cannot fold."""
        m = layer.meta
        heads, d = layer.dims["v"].heads, m["head_dim"]
        out = dict(params)

        def scale_rows(name: str, factor: torch.Tensor, rows: slice = slice(None)) -> None:
            if name not in out:
                return
            t = out[name].clone()
            f = factor.to(t.device).double().view(-1, *([1] * (t.dim() - 1)))
            t[rows] = (t[rows].double() * f).to(t.dtype)
            out[name] = t

        if "qk" in scales:
            if m["qk_norm"]:
                raise ArchitectureError(
                    f"{layer.label}: a query scale acts after the per-head q norm, so it cannot be "
                    "folded into the q rows"
                )
            per_row = scales["qk"].reshape(1, heads).expand(d, heads).reshape(-1)  # (d*H,) in (c, h) order
            if m["qkv_fused"]:
                scale_rows("qkv.weight", per_row, slice(0, heads * d))
                scale_rows("q_bias", per_row)
            else:
                scale_rows("q_proj.weight", per_row)
                scale_rows("q_proj.bias", per_row)
        if "v" in scales:
            per_row = scales["v"].reshape(-1)  # (H*w_v,) in (h, w) order
            if m["qkv_fused"]:
                scale_rows("qkv.weight", per_row, slice(2 * heads * d, None))
                scale_rows("v_bias", per_row)
            else:
                scale_rows("v_proj.weight", per_row)
                scale_rows("v_proj.bias", per_row)
        return out

    def build_pruned(
        self, module: nn.Module, layer: LayerSpace, widths: dict[str, int], params: dict[str, torch.Tensor]
    ) -> nn.Module:
        m = layer.meta
        heads, d, _ = _widths(module)
        proj = cast(nn.Linear, module.proj)
        new = PrunedEvaAttention(
            dim=m["embed_dim"],
            num_heads=heads,
            head_dim=d,
            head_dim_v=widths["v"],
            scale=float(cast(float, module.scale)),
            qkv_fused=m["qkv_fused"],
            qkv_bias_separate=bool(module.qkv_bias_separate),
            num_prefix_tokens=cast(int, module.num_prefix_tokens),
            rotate_half=bool(getattr(module, "rotate_half", False)),
            fused_attn=bool(module.fused_attn),
            attn_drop=cast(nn.Dropout, module.attn_drop).p,
            proj_drop=cast(nn.Dropout, module.proj_drop).p,
        ).to(device=proj.weight.device, dtype=proj.weight.dtype)
        if m["qkv_fused"]:
            w = params["qkv.weight"]
            q, k, v = w[: heads * d], w[heads * d : 2 * heads * d], w[2 * heads * d :]
            new.qkv = new_linear(torch.cat([_head_major(q, heads), _head_major(k, heads), v]), None)
            if "q_bias" in params:
                new.q_bias = nn.Parameter(_head_major(params["q_bias"], heads))
                new.register_buffer("k_bias", torch.zeros_like(params["q_bias"]), persistent=False)
                new.v_bias = nn.Parameter(params["v_bias"].clone())
        else:
            for name in ("q_proj", "k_proj"):
                bias = params.get(f"{name}.bias")
                lin = new_linear(
                    _head_major(params[f"{name}.weight"], heads),
                    None if bias is None else _head_major(bias, heads),
                )
                setattr(new, name, lin)
            new.v_proj = new_linear(params["v_proj.weight"], params.get("v_proj.bias"))
        new.q_norm = copy.deepcopy(cast(nn.Module, module.q_norm))
        new.k_norm = copy.deepcopy(cast(nn.Module, module.k_norm))
        if m["gate"]:
            new.gate = new_linear(params["gate.weight"], params.get("gate.bias"))
        new.proj = new_linear(params["proj.weight"], proj.bias)
        new.train(module.training)
        return new

    # ------------------------------------------------------------------------- cost
    def macs(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        """q/k/v projections, q.k^T and attn.v (q/k at the dense width), proj and the gate."""
        m = layer.meta
        heads, d, n, c = layer.dims["v"].heads, m["head_dim"], m["tokens"], m["embed_dim"]
        w_v = widths["v"]
        total = n * c * heads * (2 * d + w_v) + heads * n * m["kv_tokens"] * (d + w_v)
        total = total + n * heads * w_v * m["out_dim"]
        if m["gate"]:
            total = total + n * c * heads * w_v
        return total

    def params(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        m = layer.meta
        heads, d, c = layer.dims["v"].heads, m["head_dim"], m["embed_dim"]
        v_rows = heads * widths["v"]
        count = c * heads * 2 * d + c * v_rows + v_rows * m["out_dim"] + m["extra_params"]
        count = count + heads * d * (int(m["q_bias"]) + int(m["k_bias"]))
        if m["v_bias"]:
            count = count + v_rows
        if m["proj_bias"]:
            count = count + m["out_dim"]
        if m["gate"]:
            count = count + c * v_rows + (v_rows if m["gate_bias"] else 0)
        return count
