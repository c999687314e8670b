"""The search space of one model, :class:`HeadSpace`: its prunable layers, the architectures and
selections it allows, its coupling graph, and the mask hooks it installs (:class:`MaskHandle`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from nas_headprune.errors import ArchitectureError
from nas_headprune.space.types import (
    DROP_NORM,
    DROP_NORM_PARAMS,
    HEADS,
    Architecture,
    DimSpec,
    LayerSpace,
    MaskSet,
    Selection,
    dim_label,
    split_label,
)

if TYPE_CHECKING:
    import networkx as nx
    import torch
    from torch import nn

log = logging.getLogger(__name__)


@dataclass
class HeadSpace:
    """The search space of one model: its prunable layers in module order."""

    layers: dict[str, LayerSpace]
    input_size: tuple[int, ...]
    fixed_macs: int
    fixed_params: int
    skipped: dict[str, str] = field(default_factory=dict)

    # ----------------------------------------------------------------- dimensions
    @property
    def dims(self) -> dict[str, DimSpec]:
        return {d.label: d for layer in self.layers.values() for d in layer.dims.values()}

    def dense(self) -> Architecture:
        return Architecture({label: d.max_width for label, d in self.dims.items()})

    def smallest(self) -> Architecture:
        """Every dimension at its smallest allowed width (the cheapest architecture of the space)."""
        return Architecture({label: d.allowed()[0] for label, d in self.dims.items()})

    def layer_of(self, label: str) -> LayerSpace:
        layer, _ = split_label(label)
        if layer not in self.layers:
            raise ArchitectureError(self._unknown(label))
        return self.layers[layer]

    def per_head(self, label: str) -> bool:
        """Whether a dimension's units are per head (attention, ``(H, d)``; a head count is one group
        of ``H``: ``(1, H)``) or one row of units (an MLP's hidden units, ``(m,)``)."""
        return self.layer_of(label).kind != "mlp"

    def shape(self, label: str) -> tuple[int, ...]:
        """The shape of a dimension's scores, masks and dense selection: ``(H, d)`` or ``(m,)``."""
        d = self.dims[label]
        return (d.heads, d.max_width) if self.per_head(label) else (d.max_width,)

    def _unknown(self, label: str) -> str:
        known = list(self.dims)
        shown = ", ".join(known[:6]) + (f", ... ({len(known)} in all)" if len(known) > 6 else "")
        return f"unknown layer label {label!r}; this space has: {shown}"

    def with_step(self, step: int, min_width: int | None = None, *, min_steps: int = 1) -> HeadSpace:
        """A copy whose widths are multiples of ``step`` (e.g. 8 for GPU speed). A dimension whose
        dense width is under ``min_steps`` steps keeps step 1 (with ``min_steps=2`` a head of 8
        channels under step 8 can still be narrowed)."""
        if step < 1:
            raise ArchitectureError(f"width step must be >= 1, got {step}")
        layers = {}
        for name, layer in self.layers.items():
            dims = {}
            for k, d in layer.dims.items():
                if k == HEADS:  # a head count: widths steps and minimums are about channels
                    dims[k] = d
                    continue
                lo = max(min_width or d.min_width, 1)
                each = step if d.max_width >= min_steps * step else 1
                dims[k] = replace(d, min_width=min(lo, d.max_width), step=each)
            layers[name] = replace(layer, dims=dims)
        return HeadSpace(layers, self.input_size, self.fixed_macs, self.fixed_params, self.skipped)

    def with_heads(self) -> HeadSpace:
        """A copy in which every attention layer whose adapter supports it (``head_pruning``) may
        also drop whole heads: a ``<layer>:heads`` dimension, the number of heads kept (1 to ``H``),
        shaped as one group of ``H`` units (selections ``(1, h)``, masks and scores ``(1, H)``).
        Layers of other adapters keep all their heads (named in a warning)."""
        layers = {}
        without = set()
        for name, layer in self.layers.items():
            qk = layer.dims.get("qk")
            if layer.kind != "attention" or qk is None or HEADS in layer.dims:
                layers[name] = layer
                continue
            if not getattr(layer.adapter, "head_pruning", False):
                without.add(layer.family)
                layers[name] = layer
                continue
            dims = {**layer.dims, HEADS: DimSpec(dim_label(name, HEADS), HEADS, 1, qk.heads)}
            layers[name] = LayerSpace(layer.label, layer.family, layer.kind, dims, layer.meta, layer.adapter)
        if without:
            log.warning(
                "whole-head pruning is not supported by adapter(s) %s; their layers keep all heads",
                ", ".join(sorted(without)),
            )
        return HeadSpace(layers, self.input_size, self.fixed_macs, self.fixed_params, self.skipped)

    def with_drops(self, model: nn.Module) -> HeadSpace:
        """A copy in which every layer whose adapter supports it (``sublayer_drop``) may be dropped
        whole: an attention layer's ``heads`` dimension and an MLP's ``hidden`` dimension also allow
        0 (:attr:`DimSpec.zero`). A dropped layer becomes a constant (the masked layer's output with
        every unit masked, :class:`~nas_headprune.space.dropped.DroppedSublayer`), and the norm whose
        output only it reads (the adapter's :meth:`~SpaceAdapter.drop_norm`, e.g. ``norm1`` before a
        timm block's ``attn``) becomes ``nn.Identity``; that norm's parameters move from the fixed
        part to the layer (counted while it stays). ``model`` is the model the space was built from.

        Attention layers need their ``heads`` dimension (:meth:`with_heads` first): raises
        :class:`ArchitectureError` otherwise. Layers of other adapters are kept (named in a warning).
        """
        modules = dict(model.named_modules())
        layers = {}
        without = set()
        moved = 0
        for name, layer in self.layers.items():
            kind = HEADS if layer.kind == "attention" else "hidden"
            if layer.droppable():
                layers[name] = layer
                continue
            if not getattr(layer.adapter, "sublayer_drop", False) or layer.kind not in ("attention", "mlp"):
                without.add(layer.family)
                layers[name] = layer
                continue
            if kind not in layer.dims:
                raise ArchitectureError(
                    f"{name}: dropping an attention layer whole needs its head count; add whole-head "
                    "pruning first (HeadSpace.with_heads(), config space.prune_heads: true)"
                )
            if name not in modules:
                raise ArchitectureError(f"model has no module {name!r}: was the space built from it?")
            norm = layer.adapter.drop_norm(modules, name)
            norm_params = sum(p.numel() for p in modules[norm].parameters()) if norm is not None else 0
            moved += norm_params
            layers[name] = replace(
                layer,
                dims={**layer.dims, kind: replace(layer.dims[kind], zero=True)},
                meta={**layer.meta, DROP_NORM: norm, DROP_NORM_PARAMS: norm_params},
            )
        if without:
            log.warning(
                "dropping whole sublayers is not supported by adapter(s) %s; their layers are kept",
                ", ".join(sorted(without)),
            )
        return HeadSpace(layers, self.input_size, self.fixed_macs, self.fixed_params - moved, self.skipped)

    @property
    def has_drops(self) -> bool:
        """Whether any layer may be dropped whole (:meth:`with_drops`)."""
        return any(layer.droppable() for layer in self.layers.values())

    def without_heads(self) -> HeadSpace:
        """A copy without ``heads`` dimensions (channel widths only); the space itself when it has
        none."""
        if not self.has_heads:
            return self
        layers = {
            name: LayerSpace(
                layer.label,
                layer.family,
                layer.kind,
                {k: d for k, d in layer.dims.items() if k != HEADS},
                layer.meta,
                layer.adapter,
            )
            for name, layer in self.layers.items()
        }
        return HeadSpace(layers, self.input_size, self.fixed_macs, self.fixed_params, self.skipped)

    @property
    def has_heads(self) -> bool:
        """Whether any layer may drop whole heads (:meth:`with_heads`)."""
        return any(HEADS in layer.dims for layer in self.layers.values())

    # --------------------------------------------------------------- architecture
    def validate(self, arch: Mapping[str, object]) -> Architecture:
        """Check every label and width; return the architecture as an :class:`Architecture`.

        Raises :class:`ArchitectureError` naming the layer, the value and the allowed range.
        """
        dims = self.dims
        for label in arch:
            if label not in dims:
                raise ArchitectureError(self._unknown(label))
        missing = [label for label in dims if label not in arch]
        if missing:
            raise ArchitectureError(
                f"architecture is missing {len(missing)} dimension(s), first: {missing[0]!r}"
            )
        return Architecture({label: dims[label].check(arch[label]) for label in dims})

    def sample(self, rng: random.Random | int | None = None) -> Architecture:
        """A uniformly random architecture (each width drawn from its allowed values)."""
        if not isinstance(rng, random.Random):
            rng = random.Random(rng)
        return Architecture({label: rng.choice(d.allowed()) for label, d in self.dims.items()})

    # ------------------------------------------------------------------ selection
    def selection(self, indices: Mapping[str, Any]) -> Selection:
        """Build and check a selection from per-head index lists or tensors.

        Attention entries are ``H`` lists (or an ``(H, w)`` tensor) of channel indices; each head
        must keep the same number of distinct, in-range channels. MLP entries are one list.
        """
        import torch

        dims = self.dims
        out: dict[str, torch.Tensor] = {}
        for label in indices:
            if label not in dims:
                raise ArchitectureError(self._unknown(label))
        for label, d in dims.items():
            if label not in indices:
                raise ArchitectureError(f"selection is missing dimension {label!r}")
            raw = indices[label]
            if d.heads == 1 and not self.per_head(label):
                rows = [raw.tolist() if isinstance(raw, torch.Tensor) else list(raw)]
            else:
                rows = raw.tolist() if isinstance(raw, torch.Tensor) else [list(r) for r in raw]
                if len(rows) != d.heads:
                    raise ArchitectureError(
                        f"{label}: selection has {len(rows)} head rows, the layer has {d.heads} heads"
                    )
            counts = {len(r) for r in rows}
            if len(counts) != 1:
                per_head = ", ".join(f"head {h}: {len(r)}" for h, r in enumerate(rows))
                raise ArchitectureError(
                    f"{label}: unbalanced selection ({per_head}); every head of a layer must keep "
                    f"the same number of channels"
                )
            width = counts.pop()
            d.check(width)
            for h, r in enumerate(rows):
                bad = [i for i in r if not (isinstance(i, int) and 0 <= i < d.max_width)]
                if bad:
                    raise ArchitectureError(
                        f"{label}: head {h} index {bad[0]!r} is outside [0, {d.max_width - 1}]"
                    )
                if len(set(r)) != len(r):
                    raise ArchitectureError(f"{label}: head {h} repeats a channel index")
            t = torch.tensor([sorted(r) for r in rows], dtype=torch.long)
            out[label] = t if self.per_head(label) else t[0]
        return Selection(out)

    def first_channels(self, arch: Mapping[str, int]) -> Selection:
        """The selection that keeps the first ``width`` channels of every head (for rebuilding)."""
        import torch

        arch = self.validate(arch)
        out = {}
        for label, d in self.dims.items():
            idx = torch.arange(arch[label])
            out[label] = idx.repeat(d.heads, 1) if self.per_head(label) else idx
        return Selection(out)

    def selection_from_scores(self, scores: Mapping[str, torch.Tensor], arch: Mapping[str, int]) -> Selection:
        """Each head keeps its top-``width`` channels by score (ties broken by lower index)."""
        import torch

        arch = self.validate(arch)
        out = {}
        for label, d in self.dims.items():
            s = scores[label].detach().float()
            per_head = self.per_head(label)
            s2 = s.reshape(d.heads, d.max_width) if per_head else s.reshape(1, -1)
            # stable top-k: sort by (-score, index)
            order = torch.sort(-s2, dim=1, stable=True).indices[:, : arch[label]]  # (H, w)
            kept = torch.sort(order, dim=1).values
            out[label] = kept if per_head else kept[0]
        return Selection(out)

    def selection_from_masks(self, masks: Mapping[str, torch.Tensor]) -> Selection:
        """Hard 0/1 masks to a selection; raises on an unbalanced layer."""
        rows: dict[str, Any] = {}
        for label, d in self.dims.items():
            if label not in masks:
                raise ArchitectureError(f"masks are missing dimension {label!r}")
            m = masks[label].detach()
            if not self.per_head(label):
                rows[label] = m.reshape(-1).nonzero().flatten().tolist()
            else:
                m = m.reshape(d.heads, d.max_width)
                rows[label] = [m[h].nonzero().flatten().tolist() for h in range(d.heads)]
        return self.selection(rows)

    def masks_from_selection(self, selection: Selection) -> MaskSet:
        import torch

        out = MaskSet()
        for label in self.dims:
            idx = selection[label]
            m = torch.zeros(self.shape(label))
            if self.per_head(label):
                m.scatter_(1, idx, 1.0)
            else:
                m[idx] = 1.0
            out[label] = m
        return out

    # ----------------------------------------------------------------- coupling
    def coupling_graph(self) -> nx.DiGraph:
        """Which tensors move together: dimension nodes point to the parameter slices they own.

        Nodes: dimension labels (``kind="dim"``) and slots ``(layer, param, axis, offset)``
        (``kind="slot"``, with ``param`` the full parameter name, ``axis``, ``offset``,
        ``head_stride`` and ``channel_stride``: channel ``j`` of head ``h`` at ``offset + h *
        head_stride + j * channel_stride``, see :class:`Slot`). A ``qk`` dimension reaches the q and
        k rows of ``qkv``; a ``v`` dimension the v rows of ``qkv`` and the columns of ``proj``; a
        ``hidden`` dimension the rows of ``fc1`` and the columns of ``fc2``. Surgery and
        channel-norm scoring both walk this graph.
        """
        import networkx as nx

        g = nx.DiGraph()
        for layer in self.layers.values():
            for kind, slots in layer.adapter.coupling(layer).items():
                d = layer.dims[kind]
                g.add_node(d.label, kind="dim", layer=layer.label, heads=d.heads, width=d.max_width)
                for s in slots:
                    node = (layer.label, s.param, s.axis, s.offset)
                    g.add_node(
                        node,
                        kind="slot",
                        layer=layer.label,
                        param=f"{layer.label}.{s.param}",
                        local=s.param,
                        axis=s.axis,
                        offset=s.offset,
                        head_stride=s.head_stride,
                        channel_stride=s.channel_stride,
                    )
                    g.add_edge(d.label, node)
        return g

    # -------------------------------------------------------------------- masks
    def apply_masks(self, model: nn.Module, masks: MaskSet | None = None) -> MaskHandle:
        """Install mask hooks on ``model`` (the model this space was built from).

        Returns a handle whose ``masks`` (a :class:`MaskSet`) can be updated between forwards and
        whose ``remove()`` restores the plain model. Also usable as a context manager.
        """
        masks = masks if masks is not None else MaskSet()
        modules = dict(model.named_modules())
        handles = []
        for label, layer in self.layers.items():
            if label not in modules:
                raise ArchitectureError(f"model has no module {label!r}: was the space built from it?")
            handles.extend(layer.adapter.install_masks(modules[label], layer, masks))
        return MaskHandle(masks, handles, [(layer.adapter, modules[n]) for n, layer in self.layers.items()])


class MaskHandle:
    """Installed mask hooks; ``remove()`` or leave the ``with`` block to uninstall them."""

    def __init__(self, masks: MaskSet, handles: list, owners: list) -> None:
        self.masks = masks
        self._handles = handles
        self._owners = owners

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for adapter, module in self._owners:
            adapter.remove_masks(module)
        self._handles = []

    def __enter__(self) -> MaskHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
