"""Building a model's search space: find the prunable layers through the space adapters, trace one
forward pass for token counts and fixed MACs, and refuse (or leave dense) what no adapter can prune.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from nas_headprune.errors import ArchitectureError, UnsupportedLayerError
from nas_headprune.space.adapter import SpaceAdapter
from nas_headprune.space.headspace import HeadSpace
from nas_headprune.space.types import LayerSpace

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

# --------------------------------------------------------------------- building
# Class names of modules that must not pass silently when no adapter claims them: attention by
# name (suffix), feed-forward layers by a marker anywhere in the name (SwiGLU, GluMlp,
# ConvMlpWithNorm, MlpWithDepthwiseConv, BertIntermediate, PositionwiseFeedForward, ...), except
# classifier heads (NormMlpClassifierHead) and position-bias generators (RelPosMlp). Attention under
# any other name is found by its products of two activations (see build_space).
_ATTENTION_SUFFIXES = ("Attention",)
_FEED_FORWARD_MARKERS = (
    "Mlp",
    "MLP",
    "Glu",
    "GLU",
    "FeedForward",
    "Feedforward",
    "FFN",
    "Ffn",
    "Intermediate",
)
_HEAD_SUFFIXES = ("Head", "Classifier")
# Position-bias generators: small MLPs from relative coordinates to one attention-bias value per
# head (timm's ``RelPosMlp``). They run on coordinates, not on the input's features, so they are no
# feed-forward layer: kept whole with their submodules, their cost fixed (see build_space).
_POSITION_BIAS_MARKERS = ("PosMlp", "PosMLP")


def build_space(
    model: nn.Module,
    input_size: tuple[int, ...] | None = None,
    *,
    example_inputs: Any = None,
    skip_unsupported: bool = False,
    adapters: list[SpaceAdapter] | None = None,
    min_width: int = 1,
    step: int = 1,
) -> HeadSpace:
    """Find the prunable layers of ``model`` and describe them as a :class:`HeadSpace`.

    ``input_size`` is ``(C, H, W)``; by default the model's ``pretrained_cfg["input_size"]``.
    ``example_inputs`` replaces the blank image ``torch.zeros(1, *input_size)`` for models that take
    something else (token ids and an attention mask): a tensor or a tuple of tensors (positional
    arguments), a mapping (keyword arguments), or a callable returning one of these; batch 1.
    ``input_size`` then defaults to the first tensor's shape without the batch dimension (the
    sequence length for token ids); it is kept in the space as a record. One
    counted forward pass at batch 1 (:func:`~nas_headprune.evaluator.measure.trace_forward`) records
    the token count of every claimed layer, the MACs of every module, and which modules multiply two
    activations. The fixed MACs are the counted total minus the counted MACs of the claimed layers,
    so the dense analytic cost equals the counted one exactly when every adapter's formula matches
    the count of its layers.

    Refused, with :class:`UnsupportedLayerError` naming them (or, with ``skip_unsupported=True``,
    left dense with a warning, listed in ``space.skipped`` and counted whole in the fixed MACs):

    * a module an adapter claims but cannot prune exactly;
    * a module no adapter claims whose class name says attention (``...Attention``) or feed-forward
      (contains ``Mlp``, ``MLP``, ``Glu``, ``GLU``, ``FeedForward``, ``FFN``, ``Ffn`` or
      ``Intermediate``; classifier heads and position-bias generators excepted);
    * a module no adapter claims whose own forward multiplies two activations (tensors computed
      from the input: ``q @ k^T``, ``attn @ v``, fused attention kernels), that is attention of a
      kind no adapter knows.

    Modules inside a claimed or refused module are not listed separately; a claimed layer inside a
    refused module is left dense with it. A position-bias generator no adapter claims (class name
    containing ``PosMlp`` or ``PosMLP``, such as timm's ``RelPosMlp``, which ``vit_srelpos_*`` models
    hold at the top level) is kept whole with its submodules and charged in the fixed MACs, like the
    bias tables of the attention layers; it is not listed in ``space.skipped``. A model left with no
    prunable layer raises :class:`UnsupportedLayerError` naming its class and what was refused.
    """
    from nas_headprune import registry
    from nas_headprune.evaluator.measure import example_call, trace_forward

    if example_inputs is not None:
        ex_args, ex_kwargs = example_call(model, input_size, example_inputs)
        leaves = [t for t in (*ex_args, *ex_kwargs.values()) if hasattr(t, "shape") and t.dim() > 0]
        if not leaves or any(t.shape[0] != 1 for t in leaves):
            raise ArchitectureError(
                "example_inputs must hold tensors of batch size 1 (token counts are per example), got "
                + (", ".join(str(tuple(t.shape)) for t in leaves) or "no tensor")
            )
        if input_size is None:
            input_size = tuple(leaves[0].shape[1:])
        example_inputs = (ex_args, ex_kwargs)
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = tuple(cfg.get("input_size", ()))
        if not input_size:
            raise ArchitectureError("input_size is required: the model has no pretrained_cfg input_size")
    input_size = tuple(int(v) for v in input_size)
    adapters = adapters if adapters is not None else registry.space_adapters()
    model_name = type(model).__name__
    modules = dict(model.named_modules())

    claimed: dict[str, tuple[SpaceAdapter, nn.Module]] = {}
    refused: dict[str, str] = {}  # module path -> reason, in module order
    opened: dict[str, list[str]] = {}  # claimed path -> full paths of its open submodules
    whole: dict[str, str] = {}  # position-bias generators (path -> class): kept whole, fixed cost
    for name, module in modules.items():
        if _covered(name, claimed, opened) or _inside(name, refused) or _inside(name, whole):
            continue
        owner = next((a for a in adapters if a.claims(module)), None)
        if owner is None:
            cls = type(module).__name__
            if name and _position_bias_generator(cls):
                whole[name] = cls
                log.info("keeping %s (%s) whole: a position-bias generator, fixed cost", name, cls)
            elif name and _known_by_name(cls):
                refused[name] = f"no space adapter knows {cls}"
            continue
        reason = owner.check(module)
        if reason is not None:
            refused[name] = reason
        else:
            claimed[name] = (owner, module)
            opened[name] = [f"{name}.{sub}" if name else sub for sub in owner.open_submodules(module)]

    # one counted forward: token counts of claimed layers, MACs per module, products of activations
    tokens: dict[str, int] = {}
    facts: dict[str, dict[str, Any]] = {}

    def record_call(name: str, adapter: SpaceAdapter, c_in: int):
        def hook(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            # batch 1, so every token of the image passes here once: (1, N, C), (nW, M, C), (1, H, W, C)
            x = args[0] if args else next(v for v in kwargs.values() if hasattr(v, "numel"))
            tokens[name] = x.numel() // c_in
            facts[name] = adapter.call_facts(mod, args, kwargs)

        return hook

    hooks = [
        module.register_forward_pre_hook(
            record_call(name, adapter, adapter.input_dim(module)), with_kwargs=True
        )
        for name, (adapter, module) in claimed.items()
    ]
    try:
        trace = trace_forward(model, input_size, example_inputs=example_inputs)
    finally:
        for h in hooks:
            h.remove()

    # attention no adapter claims: the outermost uncovered module whose own forward multiplies two
    # activations (named_modules order puts a parent before its children)
    for name in modules:
        ops = trace.activation_products.get(name)
        if (
            ops is None
            or _covered(name, claimed, opened, self_too=True)
            or _inside(name, refused, self_too=True)
        ):
            continue
        cls = type(modules[name]).__name__
        refused[name] = (
            f"no space adapter knows {cls}, and it computes attention "
            f"(a product of two activations: {', '.join(sorted(ops))})"
        )
    refused = {n: refused[n] for n in modules if n in refused}  # module order
    claimed = {n: c for n, c in claimed.items() if not _inside(n, refused)}
    described = [f"{n or '(model)'} ({type(modules[n]).__name__}: {r})" for n, r in refused.items()]
    if described and not skip_unsupported:
        raise UnsupportedLayerError(
            "cannot prune these layers exactly: "
            + "; ".join(described)
            + ". Pass skip_unsupported=True (CLI: --set space.skip_unsupported=true) to leave them dense."
        )
    if not claimed:
        why = (
            "every candidate was left dense: " + "; ".join(described)
            if described
            else "no module is claimed by a space adapter ("
            + ", ".join(a.name for a in adapters)
            + ") and none looks like attention or an MLP"
        )
        raise UnsupportedLayerError(f"no prunable layers in {model_name}: {why}")
    for item in described:
        warnings.warn(f"leaving layer dense: {item}", stacklevel=2)
        log.warning("leaving layer dense: %s", item)

    layers: dict[str, LayerSpace] = {}
    prunable_params = 0
    claimed_flops = 0
    for name, (adapter, module) in claimed.items():
        if name not in tokens:
            raise UnsupportedLayerError(f"layer {name!r} was not called in a forward pass; cannot size it")
        layer = adapter.describe(name, module, tokens[name])
        layer.meta.update(facts.get(name) or {})
        layers[name] = layer
        # open submodules are not part of the layer: their cost and parameters stay with whoever
        # claims them (or in the fixed part)
        open_paths = [p for p in opened.get(name, []) if p in modules]
        open_params = {id(p) for sub in open_paths for p in modules[sub].parameters()}
        prunable_params += sum(p.numel() for p in module.parameters() if id(p) not in open_params)
        counted = trace.module_flops.get(name, 0) - sum(trace.module_flops.get(p, 0) for p in open_paths)
        claimed_flops += counted
        formula = layer.macs(layer.dense_widths())
        if 2 * formula != counted:
            log.warning(
                "%s (%s): analytic MACs %s differ from the %s counted; analytic costs of this space "
                "will not match measured ones",
                name,
                adapter.name,
                formula,
                counted // 2,
            )
    fixed_macs = (trace.flops - claimed_flops) // 2
    fixed_params = sum(p.numel() for p in model.parameters()) - prunable_params
    space = HeadSpace(layers, input_size, fixed_macs, fixed_params, refused)
    if step != 1 or min_width != 1:
        space = space.with_step(step, min_width)
    return space


def _position_bias_generator(cls: str) -> bool:
    """Whether an unclaimed module's class name says position-bias generator (see build_space)."""
    return any(m in cls for m in _POSITION_BIAS_MARKERS)


def _known_by_name(cls: str) -> bool:
    """Whether an unclaimed module's class name says attention or feed-forward (see build_space)."""
    if cls.endswith(_ATTENTION_SUFFIXES):
        return True
    return any(m in cls for m in _FEED_FORWARD_MARKERS) and not cls.endswith(_HEAD_SUFFIXES)


def _covered(
    name: str, claimed: Mapping[str, object], opened: Mapping[str, list[str]], self_too: bool = False
) -> bool:
    """Whether module path ``name`` is covered by a claimed module: it lies inside one (or is one,
    with ``self_too``) and no open submodule of that claim (see
    :meth:`SpaceAdapter.open_submodules`) lies between them (or is ``name`` itself)."""
    if self_too and name in claimed:
        return True
    open_paths = {p for paths in opened.values() for p in paths}
    parts = name.split(".") if name else []
    # walk from ``name`` outwards: the nearest claim or opening decides
    for i in range(len(parts), -1, -1):
        path = ".".join(parts[:i])
        if i < len(parts) and path in claimed:
            return True
        if path in open_paths:
            return False
    return False


def _inside(name: str, parents: Mapping[str, object], self_too: bool = False) -> bool:
    """Whether module path ``name`` lies strictly inside one of ``parents`` (or is one, with
    ``self_too``). The root (``""``) contains every module."""
    if self_too and name in parents:
        return True
    if "" in parents and name:
        return True
    parts = name.split(".")
    return any(".".join(parts[:i]) in parents for i in range(1, len(parts)))
