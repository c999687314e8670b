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

Spaces are built by :func:`nas_headprune.build.build_space`, which asks the registered space
adapters (entry point group ``nas_headprune.spaces``) which modules they can prune; this module holds
the value types and the adapter interface only, and imports nothing of the plugins.
"""

from __future__ import annotations

import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from nas_headprune.errors import ArchitectureError

if TYPE_CHECKING:
    import networkx as nx
    import torch
    from torch import nn

log = logging.getLogger(__name__)

ATTENTION_KINDS = ("qk", "v")
#: suffix of a MaskSet entry holding per-channel factors on the queries only (reweight scales)
QUERY_SCALE = "@q"
MLP_KINDS = ("hidden",)
#: receives activations from the hooks of :meth:`SpaceAdapter.watch_channels`: ``sink(kind, z)``
ChannelSink = Callable[[str, "torch.Tensor"], None]


#: the dimension kind of a head count (whole-head pruning, :meth:`HeadSpace.with_heads`)
HEADS = "heads"


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
    """

    label: str
    kind: str
    heads: int
    max_width: int
    min_width: int = 1
    step: int = 1

    def allowed(self) -> list[int]:
        values = [w for w in range(self.min_width, self.max_width + 1) if w % self.step == 0]
        if self.max_width not in values:
            values.append(self.max_width)
        return values

    def check(self, width: object) -> int:
        if isinstance(width, bool) or not isinstance(width, int):
            raise ArchitectureError(f"{self.label}: width must be an integer, got {width!r}")
        if not self.min_width <= width <= self.max_width:
            raise ArchitectureError(
                f"{self.label} = {width} is outside the allowed range "
                f"[{self.min_width}, {self.max_width}] (per-head width, step {self.step})"
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

    def macs(self, widths: Mapping[str, Any]) -> Any:
        """Per-image MACs of this layer at ``widths`` (ints, floats or tensors)."""
        return self.adapter.macs(self, widths)

    def params(self, widths: Mapping[str, Any]) -> Any:
        return self.adapter.params(self, widths)


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


class SpaceAdapter(ABC):
    """Knows one family of prunable modules: how to describe, mask, couple and slice them.

    Adapters are found through the entry point group ``nas_headprune.spaces``. An adapter claims
    modules by type; for a claimed module, :meth:`check` returns ``None`` when the module can be
    pruned exactly, or a reason when it cannot (the layer is then refused or, on request, skipped).

    Besides the abstract methods, an adapter may declare capabilities that :func:`build_space` and
    strategies read; each has a working default:

    * :attr:`attention_kind`: ``"softmax"`` or ``"linear"`` (how the attention map is formed);
    * :meth:`focused_features`: the feature maps phi(Q), phi(K) of linear attention (``None``
      when the adapter cannot give them);
    * :meth:`watch_channels`: hooks that hand over the activations of every channel at each
      forward (``None`` when the adapter cannot);
    * :meth:`call_facts`: shape facts of the module's call that the token count does not give
      (a feature-map size passed as an argument), added to the layer's ``meta``;
    * :meth:`open_submodules`: submodules of a claimed module that other adapters may still claim
      (a feed-forward whose two linears sit beside the attention in one block);
    * :meth:`fold_scales`: reweight scales folded into the sliced weights (raises
      :class:`ArchitectureError` for a kind that cannot be folded, the default for every kind);
    * a keyword argument ``kept`` of :meth:`build_pruned`: an adapter whose ``build_pruned``
      declares it receives the kept unit indices, ``{kind: (H, w) or (m,) long tensor}`` (a
      module that must know which units it kept, such as EVA's rotary pairs); adapters that do not
      declare it are called without it.

    ``nas_headprune.testing.SpaceAdapterTestCase`` checks an adapter's properties in its author's
    own tests.
    """

    name: ClassVar[str]
    kind: ClassVar[str]  # "attention" or "mlp"
    #: How an attention layer forms its map: ``"softmax"`` (softmax of q.k, the default) or
    #: ``"linear"`` (kernelised attention, phi(Q) (phi(K)^T V); see :meth:`focused_features`).
    #: Strategies that treat the two differently read it (the similarity_indicator strategy
    #: initialises the indicators of linear-attention layers from their attention difference).
    #: Not used for MLP adapters.
    attention_kind: ClassVar[str] = "softmax"
    #: Whether a layer of this adapter may also drop whole heads (:meth:`HeadSpace.with_heads` adds
    #: a ``heads`` dimension): ``build_pruned`` then gets ``widths["heads"]`` and the sliced
    #: parameters of the kept heads only, ``macs``/``params`` a ``heads`` width, and the masks a
    #: ``(1, H)`` 0/1 head mask under the ``heads`` label (a dropped head's values are zeroed).
    head_pruning: ClassVar[bool] = False

    def focused_features(
        self, module: nn.Module, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """phi(Q), phi(K), each ``(B, H, N, d_qk)``, of a linear-attention ``module`` called with
        ``args`` / ``kwargs`` (exactly what its forward receives), or ``None`` when this adapter
        cannot compute them (the default; always ``None`` for softmax attention)."""
        return None

    def watch_channels(
        self, module: nn.Module, layer: LayerSpace, sink: ChannelSink
    ) -> list[torch.utils.hooks.RemovableHandle] | None:
        """Install hooks on ``module`` (the claimed layer ``layer``) that call ``sink(kind, z)`` with
        the activations of the channels of dimension ``kind`` at every forward; the caller removes
        the returned handles. ``None`` (the default) says this adapter cannot.

        ``z`` holds the channels on its last axes and tokens on all the others (images, tokens,
        windows): ``(..., H, d)`` for an attention dimension (``"qk"``: the queries and the keys,
        one call each, as the projections give them, biases included; ``"v"``: the values) and
        ``(..., m)`` for an MLP's ``"hidden"`` units (what the second projection receives, after
        the activation or gate). A dimension of width 1 needs nothing: its channel has no
        neighbour to be similar to.

        Read the activations where the module's forward produces them (a hook on a projection it
        calls), or recompute them from the module's input where the forward bypasses the
        submodule (``F.linear(x, self.qkv.weight, bias)``): a hook on a submodule that is never
        called hands over nothing. The similarity_indicator strategy builds its channel-similarity
        weights (METHOD.md 3.2) from these activations; a dimension that gets none keeps weight 1,
        with a warning, and is listed in the strategy's result.
        """
        return None

    def call_facts(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Facts about one call of a claimed ``module`` during :func:`build_space`'s counted forward
        that its cost needs beyond the token count (the default: none).

        Called with the module's positional and keyword arguments before its forward runs; the
        returned mapping (JSON-like values) is added to the layer's ``meta`` after :meth:`describe`,
        before the cost formulas are first evaluated. Example: a spatial-reduction attention whose
        key/value token count depends on the feature-map size passed to its forward.
        """
        return {}

    def open_submodules(self, module: nn.Module) -> tuple[str, ...]:
        """Paths (relative to the claimed ``module``) of submodules other adapters may still claim.

        By default a claimed module covers all of its submodules. A layer whose channels span
        siblings (Hugging Face BERT's feed-forward: ``intermediate.dense`` rows and
        ``output.dense`` columns) is claimed through its parent block, which also holds the
        attention; naming ``"attention"`` here leaves that to the attention adapter. The layer's
        cost and parameter count then exclude the open submodules, its coupling must not reach into
        them, and :meth:`build_pruned` must keep them (the same module objects).
        """
        return ()

    @abstractmethod
    def claims(self, module: nn.Module) -> bool:
        """True when ``module`` belongs to this adapter's family."""

    def check(self, module: nn.Module) -> str | None:
        """``None`` when the module is safe to prune, else why it is not."""
        return None

    @abstractmethod
    def input_dim(self, module: nn.Module) -> int:
        """Channels of the module's input (to turn the traced input into a token count)."""

    @abstractmethod
    def describe(self, label: str, module: nn.Module, tokens: int) -> LayerSpace:
        """The layer's dimensions and static facts; ``tokens`` is the per-image token count seen."""

    @abstractmethod
    def coupling(self, layer: LayerSpace) -> dict[str, list[Slot]]:
        """For each dimension kind, the parameter slices that hold its channels."""

    @abstractmethod
    def install_masks(
        self, module: nn.Module, layer: LayerSpace, masks: MaskSet
    ) -> list[torch.utils.hooks.RemovableHandle]:
        """Make ``module`` multiply its channels by ``masks[dim label]`` (when present) on forward."""

    def remove_masks(self, module: nn.Module) -> None:  # noqa: B027 - optional hook
        """Undo anything :meth:`install_masks` set besides hooks."""

    @abstractmethod
    def build_pruned(
        self,
        module: nn.Module,
        layer: LayerSpace,
        widths: dict[str, int],
        params: dict[str, torch.Tensor],
    ) -> nn.Module:
        """A new, smaller module holding ``params`` (sliced tensors, by local name).

        An adapter may add a keyword argument ``kept: Mapping[str, torch.Tensor] | None = None``:
        :func:`~nas_headprune.evaluator.materialize.materialize` then passes the kept unit indices
        of each dimension kind (``(H, w)`` for attention, ``(m,)`` for an MLP, sorted per head).
        """

    def fold_scales(
        self,
        layer: LayerSpace,
        widths: dict[str, int],
        params: dict[str, torch.Tensor],
        scales: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Fold per-kept-channel scales (``{kind: (H, w)}``) into the sliced ``params``.

        Adapters whose modules cannot fold a kind exactly raise :class:`ArchitectureError`.
        """
        raise ArchitectureError(f"{layer.label}: {self.name} cannot fold reweight scales")

    @abstractmethod
    def macs(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        """Per-image MACs at ``widths``; must work for floats and tensors (differentiable)."""

    @abstractmethod
    def params(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        """Parameter count at ``widths``."""


class MaskSet(dict):
    """``{dimension label: mask tensor}``, read by the installed hooks at every forward.

    Attention masks are ``(H, d)``; MLP masks ``(m,)``. Values may be hard (0/1) or soft, and may
    require grad. A label that is absent is not masked. Update entries in place between steps.
    An entry ``"<layer>:qk@q"`` (``(H, d)``) multiplies the queries only: the reweight scales of the
    similarity_indicator strategy. (A value scale needs no entry of its own: multiplying the value
    mask by it is the same computation.)
    """


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

    def with_step(self, step: int, min_width: int | None = None) -> HeadSpace:
        """A copy whose attention widths are rounded to ``step`` (e.g. 8 for GPU speed)."""
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
                dims[k] = DimSpec(d.label, d.kind, d.heads, d.max_width, min(lo, d.max_width), step)
            layers[name] = LayerSpace(layer.label, layer.family, layer.kind, dims, layer.meta, layer.adapter)
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

    def without_heads(self) -> HeadSpace:
        """A copy without ``heads`` dimensions (channel widths only)."""
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


def __getattr__(name: str) -> Any:
    """``build_space`` lives in :mod:`nas_headprune.build`; this keeps the old import path working
    (a lazy re-export, so this module imports nothing of the plugin registry)."""
    if name == "build_space":
        from nas_headprune.build import build_space

        return build_space
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
