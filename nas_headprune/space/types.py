"""The value types of a search space: dimension labels, :class:`DimSpec`, :class:`Slot` (and
:func:`slot_positions`, where a channel sits in a parameter), :class:`LayerSpace`,
:class:`Architecture`, :class:`Selection` and :class:`MaskSet`.

An :class:`Architecture` is a flat mapping ``{dimension label: width}``; a :class:`Selection` names
the kept channel indices (see :mod:`nas_headprune.space`). This module imports nothing above the
errors: the adapter interface, the space and its build sit on top of it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nas_headprune.errors import ArchitectureError

if TYPE_CHECKING:
    import torch

    from nas_headprune.space.adapter import SpaceAdapter

ATTENTION_KINDS = ("qk", "v")
#: suffix of a MaskSet entry holding per-channel factors on the queries only (reweight scales)
QUERY_SCALE = "@q"
MLP_KINDS = ("hidden",)

#: the dimension kind of a head count (whole-head pruning, :meth:`HeadSpace.with_heads`)
HEADS = "heads"

#: ``LayerSpace.meta`` keys of a layer that may be dropped whole (:meth:`HeadSpace.with_drops`): the
#: module path of the norm whose output only this layer reads (``None`` when there is none), and its
#: parameter count, counted with the layer while it stays
DROP_NORM = "drop_norm"
DROP_NORM_PARAMS = "drop_norm_params"


def dim_label(layer: str, kind: str) -> str:
    """The stable label of one dimension: ``"<module path>:<kind>"``."""
    return f"{layer}:{kind}"


def split_label(label: str) -> tuple[str, str]:
    layer, sep, kind = label.rpartition(":")
    if not sep:
        raise ArchitectureError(f"{label!r} is not a dimension label (expected '<module path>:<kind>')")
    return layer, kind


@dataclass(frozen=True)
class DimSpec:
    """One searchable width.

    ``heads`` is the number of heads that share the width (1 for an MLP); ``max_width`` the dense
    per-head width; widths run from ``min_width`` to ``max_width`` in multiples of ``step`` (the dense
    width is always allowed). Widths count the dimension's units, which are single channels except
    where the adapter couples several rows into one unit: EVA's rotary query/key pairs, so its
    ``:qk`` widths (and ``min_width`` and ``step``) count pairs of channels.

    ``zero`` also allows width 0, below ``min_width``: the whole sublayer is dropped (0 heads of an
    attention layer, 0 hidden units of an MLP; :meth:`HeadSpace.with_drops`).
    """

    label: str
    kind: str
    heads: int
    max_width: int
    min_width: int = 1
    step: int = 1
    zero: bool = False

    def allowed(self) -> list[int]:
        values = [w for w in range(self.min_width, self.max_width + 1) if w % self.step == 0]
        if self.max_width not in values:
            values.append(self.max_width)
        return [0, *(w for w in values if w > 0)] if self.zero else values

    def check(self, width: object) -> int:
        if isinstance(width, bool) or not isinstance(width, int):
            raise ArchitectureError(f"{self.label}: width must be an integer, got {width!r}")
        if width == 0 and self.zero:
            return width
        if not self.min_width <= width <= self.max_width:
            raise ArchitectureError(
                f"{self.label} = {width} is outside the allowed range "
                f"[{self.min_width}, {self.max_width}]{' or 0 (dropped)' if self.zero else ''} "
                f"(per-head width, step {self.step})"
            )
        if width % self.step and width != self.max_width:
            raise ArchitectureError(f"{self.label} = {width} is not a multiple of the width step {self.step}")
        return width


@dataclass(frozen=True)
class Slot:
    """Where a dimension's channels live in one parameter tensor.

    Channel ``j`` of head ``h`` sits at index ``offset + h * head_stride + j * channel_stride``
    along axis ``axis`` of the parameter ``param`` (a name relative to the layer module).
    ``head_stride = 0`` means every head shares that tensor slice (one kernel per channel shared by
    all heads); the pruned tensor then holds one entry per kept (head, channel).

    ``channel_stride`` (default 1: a head's channels are contiguous) lets one unit of a dimension
    span several rows: a unit made of ``k`` rows is ``k`` slots on the same parameter, one per
    member. A rotary pair ``j`` of an interleaved layout, rows ``2j`` and ``2j + 1`` of a head, is
    the two slots ``offset`` and ``offset + 1`` with ``channel_stride=2``; the half-split pair
    ``(j, j + d/2)`` is the slots ``offset`` and ``offset + d/2`` with stride 1. Surgery gathers
    the kept rows slot by slot, in offset order, so a pruned tensor holds the first members of
    all kept units (head by head), then the second members, and so on.
    """

    param: str
    axis: int
    offset: int
    head_stride: int
    channel_stride: int = 1


def slot_positions(
    idx: torch.Tensor,
    offset: int,
    head_stride: int,
    channel_stride: int = 1,
    head_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Where channels ``idx`` (``(H, w)`` per head, or ``(m,)`` for an MLP) sit along a slot's axis:
    the rule of :class:`Slot`, ``offset + h * head_stride + j * channel_stride``, same shape as
    ``idx``. ``head_ids`` (optional) are the dense heads of ``idx``'s rows (by default 0..H-1), for
    layers that dropped whole heads."""
    import torch

    if idx.dim() == 1:  # MLP hidden units
        return idx * channel_stride + offset
    heads = torch.arange(idx.shape[0]) if head_ids is None else head_ids
    return offset + heads.unsqueeze(1) * head_stride + idx * channel_stride  # (H, w)


@dataclass(frozen=True)
class LayerSpace:
    """A prunable layer: its dimensions, its static shape facts and the adapter that owns it."""

    label: str
    family: str
    kind: str  # "attention" or "mlp"
    dims: dict[str, DimSpec]
    meta: dict[str, Any]
    adapter: SpaceAdapter = field(repr=False, compare=False)

    def dense_widths(self) -> dict[str, int]:
        return {k: d.max_width for k, d in self.dims.items()}

    def droppable(self) -> bool:
        """Whether this layer may be dropped whole (a dimension allows width 0)."""
        return any(d.zero for d in self.dims.values())

    def dropped(self, widths: Mapping[str, Any]) -> bool:
        """Whether ``widths`` drop this layer whole: a dimension that allows 0 is at 0 (0 heads, 0
        hidden units). The layer is then a constant (:mod:`nas_headprune.space.dropped`)."""
        return any(d.zero and bool(widths.get(k, d.max_width) == 0) for k, d in self.dims.items())

    def macs(self, widths: Mapping[str, Any]) -> Any:
        """Per-image MACs of this layer at ``widths`` (ints, floats or tensors); 0 when dropped."""
        if self.dropped(widths):
            return 0
        return self.adapter.macs(self, widths)

    def params(self, widths: Mapping[str, Any]) -> Any:
        """Parameters of this layer at ``widths``; a layer that may be dropped also counts the norm
        that only it reads (:data:`DROP_NORM`) while it stays."""
        count = self.adapter.params(self, widths)
        norm = self.meta.get(DROP_NORM_PARAMS, 0)
        if norm and not self.dropped(widths):
            count = count + norm
        return count

    def head_channel_dims(self) -> list[DimSpec]:
        """The channel dimensions whose rows are the heads this layer's ``heads`` dimension counts
        (``qk`` and ``v``); empty when the layer has no ``heads`` dimension."""
        heads = self.dims.get(HEADS)
        if heads is None:
            return []
        return [d for k, d in self.dims.items() if k != HEADS and d.heads == heads.max_width]


class Architecture(Mapping[str, int]):
    """An immutable flat mapping ``{dimension label: width}``; compares and hashes by value."""

    __slots__ = ("_widths",)

    def __init__(self, widths: Mapping[str, int]) -> None:
        self._widths = dict(sorted(widths.items()))

    def __getitem__(self, key: str) -> int:
        return self._widths[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._widths)

    def __len__(self) -> int:
        return len(self._widths)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self._widths) == dict(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self._widths.items()))

    def __repr__(self) -> str:
        return f"Architecture({self._widths!r})"

    def to_dict(self) -> dict[str, int]:
        return dict(self._widths)

    def layer_widths(self, layer: str) -> dict[str, int]:
        prefix = layer + ":"
        return {k[len(prefix) :]: v for k, v in self._widths.items() if k.startswith(prefix)}

    def diff(self, other: Mapping[str, int]) -> dict[str, tuple[int | None, int | None]]:
        """Labels whose widths differ: ``{label: (self, other)}``."""
        keys = set(self) | set(other)
        return {k: (self.get(k), other.get(k)) for k in sorted(keys) if self.get(k) != other.get(k)}


class Selection(Mapping[str, "torch.Tensor"]):
    """Kept channel indices per dimension label.

    Attention dimensions map to a long tensor ``(H, width)`` (row h: the channels head h keeps,
    sorted, distinct); MLP dimensions to a long tensor ``(width,)``. Use :meth:`HeadSpace.selection`
    or :meth:`HeadSpace.selection_from_masks` to build one that is checked against its space.
    """

    __slots__ = ("_idx",)

    def __init__(self, indices: Mapping[str, torch.Tensor]) -> None:
        self._idx = dict(sorted(indices.items()))

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._idx[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._idx)

    def __len__(self) -> int:
        return len(self._idx)

    def architecture(self) -> Architecture:
        return Architecture({k: int(v.shape[-1]) for k, v in self._idx.items()})

    def to_lists(self) -> dict[str, list]:
        return {k: v.tolist() for k, v in self._idx.items()}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Selection):
            return NotImplemented
        import torch

        return self._idx.keys() == other._idx.keys() and all(
            torch.equal(self._idx[k], other._idx[k]) for k in self._idx
        )

    __hash__ = None  # type: ignore[assignment]


class MaskSet(dict):
    """``{dimension label: mask tensor}``, read by the installed hooks at every forward.

    Attention masks are ``(H, d)``; MLP masks ``(m,)``. Values may be hard (0/1) or soft, and may
    require grad. A label that is absent is not masked. Update entries in place between steps.
    An entry ``"<layer>:qk@q"`` (``(H, d)``) multiplies the queries only: the reweight scales of the
    similarity_indicator strategy. (A value scale needs no entry of its own: multiplying the value
    mask by it is the same computation.)
    """
