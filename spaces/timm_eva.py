"""Space adapter for timm ``EvaAttention`` (EVA, EVA02, DINOv3 and the other ``timm.models.eva``
models built with ``attn_type="eva"``).

Value channels are pruned per head, exactly as for timm ``Attention``: the v rows of ``qkv`` (or
``v_proj``), ``v_bias``, the ``proj`` columns and, in gated attention, the rows of ``gate`` (the
gate multiplies each value channel of the output).

Query/key channels are pruned in rotary pairs. The models pass a rotary position embedding
(``rope``) to the module at every call; ``apply_rot_embed_cat`` rotates q/k channels in pairs, each
pair by its own frequency:

* interleaved layout (``rotate_half=False``; EVA02 and every model without ``rope_rotate_half``):
  channels ``2j`` and ``2j + 1`` of a head form pair ``j``; sin/cos are laid out
  ``[f0, f0, f1, f1, ...]`` and ``rot(x) = [-x1, x0, -x3, x2, ...]``;
* half-split layout (``rotate_half=True``; DINOv3, LingBot): channels ``j`` and ``j + d/2`` form
  pair ``j``; sin/cos are ``[f0, f1, ..., f0, f1, ...]`` and ``rot(x) = [-x_{d/2:}, x_{:d/2}]``.

The ``:qk`` dimension therefore counts pairs: ``max_width = head_dim / 2``, and its widths,
``min_width`` and width step are numbers of pairs. Each head keeps the same number of pairs and
chooses its own; a pair is kept or removed whole, in q and k alike. In the coupling a pair is two
slots per projection: offsets ``0`` and ``1`` with ``channel_stride=2`` (interleaved), offsets
``0`` and ``d/2`` (half-split). The pruned module (:class:`PrunedEvaAttention`) lays its ``2w``
kept channels out in the same layout, keeps each head's kept pair indices in the buffer
``kept_pairs`` ``(H, w)`` (saved with the weights) and, at every call, gathers the matching sin/cos
columns of ``rope`` per head, so every kept pair turns by its own frequency. Masks and query scales
are one factor per pair, which multiplies both channels alike and so commutes with the rotation (a
factor that differs between the two channels of a pair would not, and is refused when folded).
Called without a ``rope`` the pairs are plain channels removed two at a time, which is exact too.

Per-head ``q_norm`` / ``k_norm`` (``qk_norm``) normalise over all channels of a head, so removing a
pair would change the mean and variance the others are normalised with. With them (and for an odd
head width, which has no pairs) a head's q/k block is one unit, always kept: the ``:qk`` dimension
has width 1 per head, its mask multiplies the head's q and k after the norms, and a query scale
cannot fold into the q rows (the norm would undo it).

Refused: a ``norm`` between the attention and ``proj`` (EVA02's sub-LN, ``scale_attn_inner``) is a
LayerNorm over all value channels of a token, so removing one changes the mean and variance the
others are normalised with.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, cast

import torch
from einops import rearrange
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

from ._fused_qkv import new_linear
from ._pruned_eva import PrunedEvaAttention, head_major, pair_major, per_channel
from ._qv_bias import qv_bias_qkv


def _widths(module: nn.Module) -> tuple[int, int, int]:
    """``(H, d, d_v)`` of a dense or pruned module: heads, q/k width, value width."""
    heads, d = cast(int, module.num_heads), cast(int, module.head_dim)
    return heads, d, cast(int, getattr(module, "head_dim_v", d))


def _pairs(layer: LayerSpace) -> bool:
    """Whether the layer's ``:qk`` units are rotary pairs (else one unit per head, kept whole)."""
    return bool(layer.meta["qk_unit"] == "pair")


def _qk_width(layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
    """Query/key channels per head at ``widths``: two per kept pair, or the whole head."""
    return 2 * widths["qk"] if _pairs(layer) else layer.meta["head_dim"]


class TimmEvaAttentionAdapter(SpaceAdapter):
    """timm ``EvaAttention`` and the project's ``PrunedEvaAttention``: query/key channels in rotary
    pairs (or whole heads with q/k norms), value channels one by one, per head."""

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
        qk_norm = not (isinstance(module.q_norm, nn.Identity) and isinstance(module.k_norm, nn.Identity))
        pairs = not qk_norm and d % 2 == 0
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
            # "pair": q/k widths count rotary pairs; "head": one unit per head, always kept
            "qk_unit": "pair" if pairs else "head",
            "rotate_half": bool(getattr(module, "rotate_half", False)),
            # the head width the rotary embedding is built for (a pruned module's dense width)
            "rope_dim": cast("int | None", getattr(module, "rope_dim", None)) or d,
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
            "qk_norm": qk_norm,
            "extra_params": 0,
        }
        dims = {
            "qk": DimSpec(dim_label(label, "qk"), "qk", heads, d // 2 if pairs else 1),
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

        def units(param: str, start: int) -> list[Slot]:
            """Slots of the q/k units of one projection whose rows start at ``start``."""
            if not _pairs(layer):  # the head's block is one unit: a slot per channel c, at c + h*d
                return [Slot(param, 0, start + c, d) for c in range(d)]
            if m["rotate_half"]:  # pair j: rows j and j + d/2 of the head
                return [Slot(param, 0, start, d), Slot(param, 0, start + d // 2, d)]
            return [Slot(param, 0, start, d, 2), Slot(param, 0, start + 1, d, 2)]  # rows 2j, 2j + 1

        if m["qkv_fused"]:
            qk += units("qkv.weight", 0) + units("qkv.weight", heads * d)
            if m["q_bias"]:
                qk += units("q_bias", 0)
            v.append(Slot("qkv.weight", 0, 2 * heads * d, d_v))
            if m["v_bias"]:
                v.append(Slot("v_bias", 0, 0, d_v))
        else:
            for proj, has_bias in (("q_proj", m["q_bias"]), ("k_proj", m["k_bias"])):
                qk += units(f"{proj}.weight", 0)
                if has_bias:
                    qk += units(f"{proj}.bias", 0)
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
        ``F.linear`` on ``qkv.weight`` and never the ``qkv`` submodule).

        Rotary pairs: the queries and the keys as the projections give them (what ``q_norm`` and
        ``k_norm``, identities here, return), before the rotation. The two channels of a pair are
        handed over as two readings of the pair, ``(B, N, 2, H, w)``, so a Gram matrix entry is the
        inner product of two pairs' activations over tokens and both members. A ``:qk`` dimension
        of whole heads has width 1 and needs none."""
        heads, d, d_v = layer.dims["v"].heads, layer.meta["head_dim"], layer.dims["v"].max_width
        handles: list[torch.utils.hooks.RemovableHandle] = []
        if _pairs(layer):
            pattern = "b h n (m w) -> b n m h w" if layer.meta["rotate_half"] else "b h n (w m) -> b n m h w"

            def read_qk(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
                sink("qk", rearrange(out, pattern, m=2))  # (B, N, 2, H, w)

            handles += [
                cast(nn.Module, module.q_norm).register_forward_hook(read_qk),
                cast(nn.Module, module.k_norm).register_forward_hook(read_qk),
            ]
        if not layer.meta["qkv_fused"]:

            def read_v(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
                sink("v", rearrange(out, "... (h d) -> ... h d", h=heads))  # (..., H, d_v)

            return [*handles, cast(nn.Linear, module.v_proj).register_forward_hook(read_v)]

        def read_qkv(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["x"]
            v = qv_bias_qkv(mod, x)[..., 2 * heads * d :]  # (..., H*d_v)
            sink("v", rearrange(v, "... (h d) -> ... h d", h=heads, d=d_v))  # (..., H, d_v)

        return [*handles, module.register_forward_pre_hook(read_qkv, with_kwargs=True)]

    # ------------------------------------------------------------------------ masks
    def install_masks(
        self, module: nn.Module, layer: LayerSpace, masks: MaskSet
    ) -> list[torch.utils.hooks.RemovableHandle]:
        qk_label, v_label = layer.dims["qk"].label, layer.dims["v"].label
        heads, d_v = layer.dims["v"].heads, layer.dims["v"].max_width
        pairs, half = _pairs(layer), bool(layer.meta["rotate_half"])

        def per_head(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            t = t.to(like.dtype).reshape(heads, -1)  # (H, w) pairs or (H, 1) whole heads
            if pairs:  # the pair's factor on both its channels: (1, H, 1, d) on (B, H, N, d)
                return per_channel(t, half).reshape(1, heads, 1, -1)
            return t.reshape(1, heads, 1, 1)  # a factor per head on (B, H, N, d)

        # after the q/k norms (modules, nn.Identity when absent), before the rotary embedding: a
        # factor per head, or per pair on both of its channels, commutes with the rotation
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
        """A query scale multiplies the q rows and bias of its unit, a value scale the value rows
        and bias; with q/k norms the query scale comes after the norm and cannot fold.

        A rotary pair's scale, ``(H, w)``, multiplies both of its q rows, which commutes with the
        rotation. A scale per channel of each kept pair, ``(H, w, 2)``, folds only when the two
        channels of every pair get the same factor: otherwise the rotation mixes a scaled channel
        with one scaled differently, which no scaling of the q rows reproduces, and it raises
        :class:`ArchitectureError`."""
        m = layer.meta
        heads, d = layer.dims["v"].heads, _qk_width(layer, widths)
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
            s = scales["qk"]
            if _pairs(layer):
                if s.dim() == 3:  # (H, w, 2): a factor per channel of each kept pair
                    if not torch.equal(s[..., 0], s[..., 1]):
                        raise ArchitectureError(
                            f"{layer.label}: query scales that differ between the two channels of "
                            "a rotary pair do not commute with the rotation, so they cannot be "
                            "folded into the q rows (one factor per pair can)"
                        )
                    s = s[..., 0]
                per_row = s.reshape(1, -1).expand(2, -1).reshape(-1)  # (2*H*w,) in (m, h, w) order
            else:
                per_row = s.reshape(1, heads).expand(d, heads).reshape(-1)  # (d*H,) in (c, h) order
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
        self,
        module: nn.Module,
        layer: LayerSpace,
        widths: dict[str, int],
        params: dict[str, torch.Tensor],
        *,
        kept: Mapping[str, torch.Tensor] | None = None,
    ) -> nn.Module:
        """The pruned module; with rotary pairs it needs ``kept["qk"]``, the kept pairs ``(H, w)``
        (``materialize`` passes it), unless every pair is kept."""
        m = layer.meta
        heads = layer.dims["v"].heads
        d = _qk_width(layer, widths)
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
            rope_dim=m["rope_dim"] if _pairs(layer) else None,
        ).to(device=proj.weight.device, dtype=proj.weight.dtype)

        def arrange(t: torch.Tensor) -> torch.Tensor:  # sliced q/k rows to the module's order
            return pair_major(t, heads, m["rotate_half"]) if _pairs(layer) else head_major(t, heads)

        if _pairs(layer):
            new.kept_pairs = self._kept_pairs(module, layer, widths, kept).to(proj.weight.device)
        if m["qkv_fused"]:
            w = params["qkv.weight"]
            q, k, v = w[: heads * d], w[heads * d : 2 * heads * d], w[2 * heads * d :]
            new.qkv = new_linear(torch.cat([arrange(q), arrange(k), v]), None)
            if "q_bias" in params:
                new.q_bias = nn.Parameter(arrange(params["q_bias"]))
                new.register_buffer("k_bias", torch.zeros_like(params["q_bias"]), persistent=False)
                new.v_bias = nn.Parameter(params["v_bias"].clone())
        else:
            for name in ("q_proj", "k_proj"):
                bias = params.get(f"{name}.bias")
                lin = new_linear(arrange(params[f"{name}.weight"]), None if bias is None else arrange(bias))
                setattr(new, name, lin)
            new.v_proj = new_linear(params["v_proj.weight"], params.get("v_proj.bias"))
        new.q_norm = copy.deepcopy(cast(nn.Module, module.q_norm))
        new.k_norm = copy.deepcopy(cast(nn.Module, module.k_norm))
        if m["gate"]:
            new.gate = new_linear(params["gate.weight"], params.get("gate.bias"))
        new.proj = new_linear(params["proj.weight"], proj.bias)
        new.train(module.training)
        return new

    @staticmethod
    def _kept_pairs(
        module: nn.Module,
        layer: LayerSpace,
        widths: Mapping[str, int],
        kept: Mapping[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        """``(H, w)``: the dense rotary pair of each pair the new module keeps (composed with the
        pairs ``module`` already keeps, when it is a pruned module itself)."""
        spec = layer.dims["qk"]
        held = cast("torch.Tensor | None", getattr(module, "kept_pairs", None))  # (H, W) or None
        base = held.cpu() if held is not None else torch.arange(spec.max_width).repeat(spec.heads, 1)
        if kept is not None and "qk" in kept:
            index = kept["qk"].detach().cpu().long().reshape(spec.heads, widths["qk"])  # (H, w)
        elif widths["qk"] == spec.max_width:
            index = torch.arange(spec.max_width).repeat(spec.heads, 1)
        else:
            raise ArchitectureError(
                f"{layer.label}: a module keeping {widths['qk']} of {spec.max_width} rotary pairs per "
                "head must know which ones; pass the kept indices (materialize passes kept=)"
            )
        return torch.gather(base, 1, index)  # (H, w)

    # ------------------------------------------------------------------------- cost
    def macs(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        """q/k/v projections, q.k^T and attn.v (two q/k channels per kept rotary pair, or the dense
        width), proj and the gate. The rotation itself is elementwise: no MACs."""
        m = layer.meta
        heads, d, n, c = layer.dims["v"].heads, _qk_width(layer, widths), m["tokens"], m["embed_dim"]
        w_v = widths["v"]
        total = n * c * heads * (2 * d + w_v) + heads * n * m["kv_tokens"] * (d + w_v)
        total = total + n * heads * w_v * m["out_dim"]
        if m["gate"]:
            total = total + n * c * heads * w_v
        return total

    def params(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        m = layer.meta
        heads, d, c = layer.dims["v"].heads, _qk_width(layer, widths), m["embed_dim"]
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
