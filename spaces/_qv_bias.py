"""Shared pieces of adapters for fused-qkv attention with separate query and value biases.

Layout (BEiT ``Attention``, Swin V2 ``WindowAttention``, and the pruned modules built for them): a
bias-free ``qkv`` Linear whose rows are ``(3, H, d)`` -- q, then k, then v -- plus ``q_bias``
``(H, d_qk)`` and ``v_bias`` ``(H, d_v)`` parameters; keys have no bias of their own (``k_bias`` is a
zero buffer). The forward computes ``qkv`` with ``F.linear(x, qkv.weight, cat(q_bias, k_bias,
v_bias))``, so the ``qkv`` submodule itself is never called when the biases exist and a forward hook
on it cannot mask the queries and keys. The adapters therefore mask q/k channels through a masked
forward installed on the module while masks are active (:func:`install_masked_forward`); value
channels are masked at the input of ``proj``, as for timm ``Attention``. For the same reason the
channel activations the adapters hand over (``watch_channels``) are recomputed from the module's
input, biases included.
"""

from __future__ import annotations

import types
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.hooks import RemovableHandle

from nas_headprune.space import QUERY_SCALE, ChannelSink, LayerSpace, MaskSet, Slot

from ._fused_qkv import FusedQkvAdapter

# name of the per-module ordered dict of active ``(qk label, MaskSet)`` entries
_ACTIVE = "_nas_headprune_qk_masks"


def counted_macs(fn: Callable[[], Any]) -> int:
    """MACs FlopCounterMode counts for ``fn()`` (a width-independent part of a layer, such as the
    MLP that turns relative coordinates into a position bias)."""
    with torch.enable_grad(), FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops()) // 2


def qv_bias_qkv(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(B, N, H*(2*d_qk+d_v))`` projections of ``x``, with the q and v biases, as timm computes them."""
    qkv = cast(nn.Linear, mod.qkv)
    q_bias = cast("torch.Tensor | None", mod.q_bias)
    if q_bias is None:
        return qkv(x)
    bias = torch.cat((q_bias, cast(torch.Tensor, mod.k_bias), cast(torch.Tensor, mod.v_bias)))
    if mod.qkv_bias_separate:
        return qkv(x) + bias
    return F.linear(x, qkv.weight, bias)


def mask_queries_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    qk_mask: torch.Tensor | None,
    q_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k ``(B, H, N, d)`` times the ``(H, d)`` channel mask; q also times the query scales."""
    heads, width = q.shape[1], q.shape[-1]
    if qk_mask is not None:
        m = qk_mask.to(q.dtype).reshape(1, heads, 1, width)  # (1, H, 1, d)
        q, k = q * m, k * m
    if q_scale is not None:
        q = q * q_scale.to(q.dtype).reshape(1, heads, 1, width)
    return q, k


def _product(values: list[torch.Tensor]) -> torch.Tensor | None:
    out: torch.Tensor | None = None
    for v in values:
        out = v if out is None else out * v
    return out


def install_masked_forward(
    module: nn.Module,
    qk_label: str,
    masks: MaskSet,
    forward: Callable[..., torch.Tensor],
) -> RemovableHandle:
    """Route ``module``'s calls through ``forward(module, *args, qk_mask=..., q_scale=..., **kwargs)``
    while ``masks`` is installed.

    The masked forward is an instance attribute that shadows the class's own ``forward`` (so hooks
    still run); it multiplies the masks of every active :class:`MaskSet` (nested ``apply_masks``)
    and calls the class's forward when none is active. The returned handle removes this entry;
    :func:`remove_masked_forward` drops the instance attribute once no entry is left.
    """
    active = module.__dict__.get(_ACTIVE)
    if active is None:
        active = OrderedDict()
        module.__dict__[_ACTIVE] = active

        def masked(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
            entries = list(cast("OrderedDict[int, tuple[str, MaskSet]]", self.__dict__[_ACTIVE]).values())
            if not entries:
                return type(self).forward(self, *args, **kwargs)
            qk = _product([m[label] for label, m in entries if m.get(label) is not None])
            scale = _product(
                [m[label + QUERY_SCALE] for label, m in entries if m.get(label + QUERY_SCALE) is not None]
            )
            return forward(self, *args, qk_mask=qk, q_scale=scale, **kwargs)

        module.__dict__["forward"] = types.MethodType(masked, module)
    handle = RemovableHandle(active)
    active[handle.id] = (qk_label, masks)
    return handle


def remove_masked_forward(module: nn.Module) -> None:
    active = module.__dict__.get(_ACTIVE)
    if active is not None and not active:
        del module.__dict__[_ACTIVE]
        module.__dict__.pop("forward", None)


class QvBiasQkvAdapter(FusedQkvAdapter):
    """Coupling, masks, scale folding and cost of fused-qkv attention with ``q_bias`` / ``v_bias``.

    Subclasses give :meth:`masked_forward` (the module's computation with a q/k channel mask and
    query scales) and implement ``claims``, ``describe`` and ``build_pruned``.
    """

    def masked_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def _meta(self, module: nn.Module, tokens: int, kv_tokens: int) -> dict[str, Any]:
        meta = super()._meta(module, tokens, kv_tokens)
        q_bias = cast("torch.Tensor | None", module.q_bias)
        meta["qkv_bias"] = q_bias is not None
        if q_bias is not None:
            meta["extra_params"] -= q_bias.numel() + cast(torch.Tensor, module.v_bias).numel()
        return meta

    def coupling(self, layer: LayerSpace) -> dict[str, list[Slot]]:
        heads = layer.dims["qk"].heads
        d_qk, d_v = layer.dims["qk"].max_width, layer.dims["v"].max_width
        q0, k0, v0 = 0, heads * d_qk, 2 * heads * d_qk
        qk = [Slot("qkv.weight", 0, q0, d_qk), Slot("qkv.weight", 0, k0, d_qk)]
        v = [Slot("qkv.weight", 0, v0, d_v), Slot("proj.weight", 1, 0, d_v)]
        if layer.meta["qkv_bias"]:
            qk.append(Slot("q_bias", 0, 0, d_qk))
            v.append(Slot("v_bias", 0, 0, d_v))
        return {"qk": qk, "v": v}

    def watch_channels(
        self, module: nn.Module, layer: LayerSpace, sink: ChannelSink
    ) -> list[torch.utils.hooks.RemovableHandle] | None:
        """q, k and v with their biases, recomputed from the module's input as the forward computes
        them (:func:`qv_bias_qkv`): with biases the forward calls ``F.linear`` on ``qkv.weight`` and
        never the ``qkv`` submodule, so a hook on it would see nothing."""
        heads = layer.dims["qk"].heads
        d_qk, d_v = layer.dims["qk"].max_width, layer.dims["v"].max_width

        def read(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["x"]
            q, k, v = qv_bias_qkv(mod, x).split([heads * d_qk, heads * d_qk, heads * d_v], dim=-1)
            sink("qk", rearrange(q, "... (h d) -> ... h d", h=heads))  # (..., H, d_qk)
            sink("qk", rearrange(k, "... (h d) -> ... h d", h=heads))  # (..., H, d_qk)
            sink("v", rearrange(v, "... (h d) -> ... h d", h=heads))  # (..., H, d_v)

        return [module.register_forward_pre_hook(read, with_kwargs=True)]

    def install_masks(
        self, module: nn.Module, layer: LayerSpace, masks: MaskSet
    ) -> list[torch.utils.hooks.RemovableHandle]:
        v_label = layer.dims["v"].label
        heads, d_v = layer.dims["v"].heads, layer.dims["v"].max_width

        def mask_v(mod: nn.Module, args: tuple) -> tuple | None:
            m = masks.get(v_label)
            if m is None:
                return None
            x = args[0]
            return (x * m.to(x.dtype).reshape(heads * d_v), *args[1:])  # (H*d_v,) on (..., H*d_v)

        return [
            install_masked_forward(module, layer.dims["qk"].label, masks, self.masked_forward),
            cast(nn.Linear, module.proj).register_forward_pre_hook(mask_v),
        ]

    def remove_masks(self, module: nn.Module) -> None:
        remove_masked_forward(module)

    def fold_scales(
        self,
        layer: LayerSpace,
        widths: dict[str, int],
        params: dict[str, torch.Tensor],
        scales: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Query scales multiply the q rows of ``qkv`` and ``q_bias``, value scales the v rows and
        ``v_bias``: the masked model scales q (or v) right after the projection, bias included."""
        out = super().fold_scales(layer, widths, params, scales)
        for kind, name in (("qk", "q_bias"), ("v", "v_bias")):
            if kind in scales and name in out:
                t = out[name]
                out[name] = (t.double() * scales[kind].reshape(-1).to(t.device).double()).to(t.dtype)
        return out

    def params(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        m = layer.meta
        heads = layer.dims["qk"].heads
        rows = heads * (2 * widths["qk"] + widths["v"])
        count = m["embed_dim"] * rows + heads * widths["v"] * m["out_dim"] + m["extra_params"]
        if m["qkv_bias"]:
            count = count + heads * (widths["qk"] + widths["v"])
        if m["proj_bias"]:
            count = count + m["out_dim"]
        return count


def new_qv_biases(module: nn.Module, params: Mapping[str, torch.Tensor]) -> None:
    """Give a pruned ``module`` (whose ``q_bias``, ``k_bias`` and ``v_bias`` are registered as
    ``None``) its ``q_bias`` / ``k_bias`` (a zero buffer) / ``v_bias`` from the sliced ``params``;
    nothing when the dense module has no biases."""
    if "q_bias" not in params:
        return
    module.q_bias = nn.Parameter(params["q_bias"].detach().clone())
    module.register_buffer("k_bias", torch.zeros_like(params["q_bias"]), persistent=False)
    module.v_bias = nn.Parameter(params["v_bias"].detach().clone())
