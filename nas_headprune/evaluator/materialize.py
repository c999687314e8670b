"""Surgery: physically slice a model to a head-balanced selection.

The coupling graph of the space says which parameter slices belong to each dimension; this module
walks it to gather the kept rows/columns, then asks each layer's adapter to build the smaller module
around them. The input model is never modified: the result is a new model.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from nas_headprune.errors import ArchitectureError
from nas_headprune.models.factory import BASE_ATTR
from nas_headprune.space import DROP_NORM, HEADS, HeadSpace, Selection, slot_positions, split_label

log = logging.getLogger(__name__)

META_ATTR = "nas_headprune_meta"


def kept_heads(space: HeadSpace, selection: Selection, layer: str) -> torch.Tensor | None:
    """The dense heads a layer keeps, ``(h,)``, when it may drop whole heads; else ``None``."""
    d = space.layers[layer].dims.get(HEADS)
    return None if d is None else selection[d.label].reshape(-1)


def _takes_kept(adapter: object) -> bool:
    """Whether ``adapter.build_pruned`` declares the optional keyword argument ``kept``."""
    try:
        params = inspect.signature(getattr(adapter, "build_pruned")).parameters  # noqa: B009
    except (TypeError, ValueError):
        return False
    return "kept" in params and params["kept"].kind in (
        inspect.Parameter.KEYWORD_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )


def slice_parameters(
    space: HeadSpace, module_params: Mapping[str, Mapping[str, torch.Tensor]], selection: Selection
) -> dict[str, dict[str, torch.Tensor]]:
    """For every layer, the sliced tensors of the parameters its dimensions reach.

    ``module_params`` maps a layer label to its parameters by local name. Returns
    ``{layer: {local param name: sliced tensor}}``. Slots on the same axis of one parameter are
    concatenated in offset order (q, k, v rows of ``qkv``).
    """
    graph = space.coupling_graph()
    gathered: dict[str, dict[tuple[str, int], list[tuple[int, torch.Tensor]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for label in space.dims:
        if label not in graph:  # a head count owns no slice of its own
            continue
        idx = selection[label]
        heads = kept_heads(space, selection, split_label(label)[0])
        if heads is not None:  # only the kept heads' rows, at their dense positions
            idx = idx[heads]
        for node in graph.successors(label):
            slot = graph.nodes[node]
            flat = slot_positions(idx, slot["offset"], slot["head_stride"], slot["channel_stride"], heads)
            flat = flat.reshape(-1)  # (H*w,) in (h, w) order
            gathered[slot["layer"]][(slot["local"], slot["axis"])].append((slot["offset"], flat))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for layer, per_param in gathered.items():
        params = module_params[layer]
        sliced: dict[str, torch.Tensor] = {}
        for (local, axis), parts in per_param.items():
            if local in sliced:
                raise ArchitectureError(f"{layer}.{local}: channels coupled along two axes")
            parts.sort(key=lambda p: p[0])
            index = torch.cat([p[1] for p in parts]).to(params[local].device)
            sliced[local] = params[local].detach().index_select(axis, index).clone()
        out[layer] = sliced
    return out


def materialize(
    model: nn.Module,
    space: HeadSpace,
    selection: Selection | Mapping[str, Any],
    scales: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """A new, physically smaller copy of ``model`` keeping exactly the selected channels.

    ``selection`` may be a :class:`Selection` or raw per-head index lists; it is checked against
    ``space`` (unbalanced heads, out-of-range indices and unknown labels raise
    :class:`~nas_headprune.errors.ArchitectureError`). ``scales`` (optional) maps attention
    dimension labels to reweight factors over the dense channels, ``(H, d)``; the kept channels'
    factors are folded into the weights (queries for ``:qk``, values for ``:v``), so the result equals
    the masked model run with those factors (``<layer>:qk@q`` entries and value masks times scales).
    """
    if isinstance(selection, Selection):
        selection = space.selection({k: v for k, v in selection.items()})
    else:
        selection = space.selection(selection)
    modules = dict(model.named_modules())
    missing = [name for name in space.layers if name not in modules]
    if missing:
        raise ArchitectureError(f"model has no module {missing[0]!r}: was the space built from it?")
    if scales is not None:
        unknown = [k for k in scales if k not in space.dims]
        if unknown:
            raise ArchitectureError(f"scales for unknown dimension {unknown[0]!r}")
        for label, factors in scales.items():
            d = space.dims[label]
            if factors.numel() != d.heads * d.max_width:
                raise ArchitectureError(
                    f"scales for {label} have shape {tuple(factors.shape)}; expected "
                    f"({d.heads}, {d.max_width}), one factor per unit of the dimension"
                )
    params = {name: dict(modules[name].named_parameters()) for name in space.layers}
    sliced = slice_parameters(space, params, selection)
    arch = selection.architecture()

    new = copy.deepcopy(model)
    paths: dict[str, dict[str, str]] = {}
    dropped: list[str] = []
    for name, layer in space.layers.items():
        old = new.get_submodule(name)
        widths = arch.layer_widths(name)
        if layer.dropped(widths):  # the whole sublayer goes: a constant, and the norm only it read
            gone: nn.Module = layer.adapter.build_dropped(old, layer)
            gone.train(old.training)
            new.set_submodule(name, gone)
            norm = layer.meta.get(DROP_NORM)
            if norm:
                new.set_submodule(norm, nn.Identity())
            dropped.append(name)
            continue
        layer_params = sliced[name]
        layer_scales = {}
        heads = kept_heads(space, selection, name)
        for kind, d in layer.dims.items():
            if scales is not None and d.label in scales:
                factors = scales[d.label].detach().reshape(d.heads, d.max_width)
                gathered = torch.gather(factors, 1, selection[d.label].to(factors.device))
                layer_scales[kind] = gathered if heads is None else gathered[heads]
        if layer_scales:
            layer_params = layer.adapter.fold_scales(layer, widths, layer_params, layer_scales)
        # the kept indices go to adapters that declare ``kept`` (SpaceAdapter.build_pruned)
        build: Any = layer.adapter.build_pruned
        extra = (
            {
                "kept": {
                    k: selection[d.label] if heads is None or k == HEADS else selection[d.label][heads]
                    for k, d in layer.dims.items()
                }
            }
            if _takes_kept(layer.adapter)
            else {}
        )
        replacement: nn.Module = build(old, layer, widths, layer_params, **extra)
        replacement.train(old.training)
        new.set_submodule(name, replacement)
        recorded: object = getattr(replacement, "attn_paths", None)
        if isinstance(recorded, dict):
            paths[name] = dict(recorded)
    base_meta = getattr(model, META_ATTR, None) or {}
    setattr(
        new,
        META_ATTR,
        {
            "architecture": arch.to_dict(),
            "input_size": list(space.input_size),
            "skipped": dict(space.skipped),
            # dimensions given reweight scales: some adapters keep them as parameters (q_gamma)
            "scaled": sorted(scales) if scales else [],
            "base": base_meta.get("base", getattr(model, BASE_ATTR, None)),
            # per attention layer, the path its forward runs on each device type (chosen from the
            # widths by the adapter, so load_pruned derives the same paths from the architecture)
            "attention_paths": paths,
            # layers dropped whole (space.drop_sublayers): constants, their norms nn.Identity
            "dropped": dropped,
        },
    )
    log.debug("materialised %d layers (%d dropped whole)", len(space.layers), len(dropped))
    return new
