"""The space adapter interface: :class:`SpaceAdapter`, the base class of every plugin that knows one
family of prunable modules (entry point group ``nas_headprune.spaces``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from nas_headprune.errors import ArchitectureError
from nas_headprune.space.types import LayerSpace, MaskSet, Slot

if TYPE_CHECKING:
    import torch
    from torch import nn

#: receives activations from the hooks of :meth:`SpaceAdapter.watch_channels`: ``sink(kind, z)``
ChannelSink = Callable[[str, "torch.Tensor"], None]


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
    * :attr:`sublayer_drop`, :meth:`build_dropped`, :meth:`drop_norm`: whether and how a layer is
      dropped whole (``space.drop_sublayers``);
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
    #: Whether a layer of this adapter may be dropped whole (:meth:`HeadSpace.with_drops`: an
    #: attention layer's ``heads`` or an MLP's ``hidden`` dimension may be 0). The adapter then
    #: implements :meth:`build_dropped` and may name a norm with :meth:`drop_norm`.
    sublayer_drop: ClassVar[bool] = False

    def build_dropped(self, module: nn.Module, layer: LayerSpace) -> nn.Module:
        """The module that replaces a dropped layer: what the masked dense module outputs with every
        unit masked (for a linear output projection, its bias), as a
        :class:`~nas_headprune.space.dropped.DroppedSublayer`. Only for adapters with
        :attr:`sublayer_drop`."""
        raise NotImplementedError(f"adapter {self.name!r} cannot drop a layer whole")

    def drop_norm(self, modules: Mapping[str, nn.Module], label: str) -> str | None:
        """The module path of a norm whose output only the layer ``label`` reads (``modules``: the
        model's ``named_modules()``), replaced by ``nn.Identity`` when the layer is dropped; ``None``
        (the default) when there is none."""
        return None

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
