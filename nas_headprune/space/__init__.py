"""Head-balanced search spaces.

A model's search space is a set of prunable layers. Each layer has one or more *dimensions*, and
every dimension has a stable label, ``"<module path>:<kind>"``:

* an attention layer has ``:qk`` (query/key channels per head) and ``:v`` (value channels per head);
* an MLP layer has ``:hidden`` (hidden units).

An :class:`Architecture` is a flat mapping ``{dimension label: width}``. For attention the width is
the per-head width, shared by every head of the layer, so head balance is a property of the type:
there is no way to write an unbalanced architecture. A :class:`Selection` goes one step further and
names the kept channel indices: per head for attention (a ``(H, width)`` index tensor, so each head
keeps its own channels but all keep the same number) and a ``(width,)`` vector for MLPs.

Spaces are built by :func:`nas_headprune.space.build.build_space`, which asks the registered space
adapters (entry point group ``nas_headprune.spaces``) which modules they can prune. The package, from
the bottom up: :mod:`~nas_headprune.space.types` (the value types), :mod:`~nas_headprune.space.adapter`
(the adapter interface), :mod:`~nas_headprune.space.headspace` (:class:`HeadSpace` and its masks)
and :mod:`~nas_headprune.space.build` (the build, above the plugin registry). Importing the package
imports the first three only, nothing of the plugins; ``build_space`` is re-exported lazily.
"""

from __future__ import annotations

from typing import Any

from nas_headprune.space.adapter import ChannelSink, SpaceAdapter
from nas_headprune.space.headspace import HeadSpace, MaskHandle
from nas_headprune.space.types import (
    ATTENTION_KINDS,
    DROP_NORM,
    DROP_NORM_PARAMS,
    HEADS,
    MLP_KINDS,
    QUERY_SCALE,
    Architecture,
    DimSpec,
    LayerSpace,
    MaskSet,
    Selection,
    Slot,
    dim_label,
    slot_positions,
    split_label,
)

__all__ = [
    "ATTENTION_KINDS",
    "DROP_NORM",
    "DROP_NORM_PARAMS",
    "HEADS",
    "MLP_KINDS",
    "QUERY_SCALE",
    "Architecture",
    "ChannelSink",
    "DimSpec",
    "HeadSpace",
    "LayerSpace",
    "MaskHandle",
    "MaskSet",
    "Selection",
    "Slot",
    "SpaceAdapter",
    "build_space",
    "dim_label",
    "slot_positions",
    "split_label",
]


def __getattr__(name: str) -> Any:
    """``build_space`` lives in :mod:`nas_headprune.space.build`; this keeps the import path
    ``nas_headprune.space.build_space`` working (a lazy re-export, so importing the package imports
    nothing of the plugin registry)."""
    if name == "build_space":
        from nas_headprune.space.build import build_space

        return build_space
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
