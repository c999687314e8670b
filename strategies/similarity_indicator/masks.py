"""METHOD.md 3.1 / 3.3: head-balanced masks and widths from the indicators, the final budget
fix-up, and the differentiable MACs of soft widths."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from nas_headprune.allocate import BudgetError, narrow_greedily
from nas_headprune.errors import (
    ArchitectureError,
)
from nas_headprune.evaluator.cost import analytic_cost
from nas_headprune.space import (
    HEADS,
    DimSpec,
    HeadSpace,
    LayerSpace,
    SpaceAdapter,
    split_label,
)

from .config import _EPS

log = logging.getLogger(__name__)


# ======================================================= 3.1 / 3.3 masks and widths


def nearest_width(per_head: float, spec: DimSpec) -> int:
    """The allowed width of ``spec`` nearest to ``per_head`` (ties keep the wider)."""
    return min(spec.allowed(), key=lambda w: (abs(w - per_head), -w))


def padded_width(widest: int, spec: DimSpec) -> int:
    """The smallest allowed width of ``spec`` holding ``widest`` channels."""
    fits = [w for w in spec.allowed() if w >= widest]
    return min(fits) if fits else spec.max_width


def allowed_widths(spec: DimSpec, device: str | torch.device = "cpu") -> Tensor:
    """The allowed widths of ``spec``, widest first, as a long tensor (for :func:`dimension_masks`)."""
    return torch.tensor(sorted(spec.allowed(), reverse=True), dtype=torch.long, device=device)


def nearest_width_tensor(count: Tensor, heads: int, allowed: Tensor) -> Tensor:
    """:func:`nearest_width` of ``count / heads`` on the device, without a host sync: ``allowed``
    widest first (:func:`allowed_widths`), compared in integers as ``|w * heads - count|``, so a tie
    keeps the wider width exactly as :func:`nearest_width` does."""
    gap = (allowed * heads - count).abs()  # (n,)
    # argmin takes the first, the widest, of equal gaps; gather, since indexing with a tensor syncs
    return allowed.gather(0, torch.argmin(gap).reshape(1)).squeeze(0)


def top_channels(score: Tensor, width: int | Tensor) -> Tensor:
    """0/1 mask ``(H, d)`` of each head's top-``width`` channels by score (ties: lower index), the
    same order as :meth:`HeadSpace.selection_from_scores`. ``width`` may be a 0-d tensor."""
    order = torch.sort(-score.detach().float(), dim=1, stable=True).indices  # (H, d)
    place = torch.arange(order.shape[1], device=order.device).expand_as(order)  # (H, d)
    rank = torch.empty_like(order).scatter_(1, order, place)  # (H, d): each channel's place in its head
    return (rank < width).to(score.dtype)


def dimension_masks(
    score: Tensor, spec: DimSpec, tau: float, balance: bool, allowed: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One dimension's masks from its scores (``(H, d)``, or ``(m,)`` for an MLP).

    Returns ``(hard, ste, width)``: the 0/1 mask; the same values with the straight-through gradient
    to ``score``; the per-head kept width as a tensor whose value is the hard width and whose
    gradient is the straight-through count of channels above ``tau``, divided by ``H``. With
    ``balance`` every head keeps its top ``nearest_width(k / H)`` channels (``k`` the count above
    ``tau`` in the whole dimension); without it the mask is ``score > tau`` as is and the width the
    mean per-head count. Everything stays on the scores' device (no host sync); ``allowed`` is
    :func:`allowed_widths` of ``spec`` on that device, built once by a caller that loops.
    """
    heads = spec.heads
    s = score.reshape(heads, -1)  # (H, d)
    above = s.detach() > tau  # (H, d)
    through = s - s.detach()  # zeros that carry the gradient to the scores
    if balance:
        if allowed is None:
            allowed = allowed_widths(spec, s.device)
        width = nearest_width_tensor(above.sum(), heads, allowed)  # 0-d long
        hard = top_channels(s, width)
        width_t = width + through.sum() / heads
    else:
        hard = above.to(s.dtype)
        width_t = (hard.sum() + through.sum()) / heads
    return hard.reshape(score.shape), (hard + through).reshape(score.shape), width_t


def fit_budget(
    space: HeadSpace, scores: Mapping[str, Tensor], arch: Mapping[str, int], target: float
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Narrow ``arch`` one width step at a time, always the dimension losing the least score per MAC
    saved (the scores of the channels each head would give up; for a head count, the weakest kept
    head's score times the channels each head keeps), until it costs at most ``target``; ties go to
    the dimension first in the space. The allocator's greedy trim (:func:`narrow_greedily`) with the
    indicator values as they are, from ``arch`` instead of the dense widths. Returns the widths and
    the steps taken."""
    widths = dict(arch)
    ranked = {
        label: torch.sort(
            scores[label].detach().double().reshape(d.heads, d.max_width), dim=1, descending=True
        ).values  # (H, d)
        for label, d in space.dims.items()
    }
    removed: list[dict[str, Any]] = []
    position = {label: i for i, label in enumerate(space.dims)}

    def candidate(label: str) -> tuple[float, float, int] | None:
        d, w = space.dims[label], widths[label]
        smaller = [a for a in d.allowed() if a < w]
        if not smaller:
            return None
        new_w = max(smaller)
        layer = space.layer_of(label)
        cur = {k: widths[dd.label] for k, dd in layer.dims.items()}
        saved = float(layer.macs(cur)) - float(layer.macs({**cur, d.kind: new_w}))
        lost = float(ranked[label][:, new_w:w].sum())
        if d.kind == HEADS:  # one head's score stands for all the channels the head keeps
            lost *= sum(cur[dd.kind] for dd in layer.head_channel_dims())
        return (lost / max(saved, _EPS), saved, new_w)

    def step(label: str, new_w: int) -> list[str]:
        removed.append({"label": label, "from": widths[label], "to": new_w})
        widths[label] = new_w
        return [dd.label for dd in space.layer_of(label).dims.values()]

    total = narrow_greedily(
        space.dims, candidate, step, float(analytic_cost(space, widths).macs), target, position.__getitem__
    )
    if total > target:  # pragma: no cover - excluded by check_reachable
        raise BudgetError("the budget cannot be met within the space's minimum widths")
    return widths, removed


# ============================================================================ helpers


def _logits(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def foldable_kinds(layer: LayerSpace, module: nn.Module) -> list[str]:
    """The attention kinds (``"qk"``, ``"v"``) whose reweight scales ``layer``'s adapter folds at
    materialisation, asked by folding unit scales into the dense module's own parameters (an adapter
    that cannot fold a kind raises :class:`ArchitectureError`)."""
    if layer.kind != "attention" or type(layer.adapter).fold_scales is SpaceAdapter.fold_scales:
        return []
    params = {name: p.detach() for name, p in module.named_parameters()}
    widths = layer.dense_widths()
    kinds = []
    for kind in ("qk", "v"):
        d = layer.dims[kind]
        try:
            layer.adapter.fold_scales(layer, widths, params, {kind: torch.ones(d.heads, d.max_width)})
        except (ArchitectureError, NotImplementedError, KeyError) as exc:
            log.debug("%s: %s scales cannot be folded (%s)", layer.label, kind, exc)
            continue
        kinds.append(kind)
    return kinds


def _search_macs(space: HeadSpace, widths: Mapping[str, Tensor]) -> Tensor:
    """``analytic_cost(space, widths).macs`` (the same sum, in the same order) without the parameter
    counts, which the search does not use and which may read tensor widths back to the host."""
    per_layer: dict[str, dict[str, Any]] = defaultdict(dict)
    for label, value in widths.items():
        layer_name, kind = split_label(label)
        per_layer[layer_name][kind] = value
    total: Any = space.fixed_macs
    for name, layer in space.layers.items():
        total = total + layer.macs({**layer.dense_widths(), **per_layer[name]})
    return total
