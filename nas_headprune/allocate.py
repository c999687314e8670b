"""The shared allocator: channel scores + MACs budget -> a head-balanced architecture."""

from __future__ import annotations

import heapq
import logging
from collections.abc import Mapping
from typing import Literal

import torch

from nas_headprune.errors import UsageError
from nas_headprune.evaluator.cost import analytic_cost
from nas_headprune.space import Architecture, DimSpec, HeadSpace, split_label

log = logging.getLogger(__name__)


class BudgetError(UsageError):
    """The budget cannot be met within the space's minimum widths."""


def _round_down(width: float, d: DimSpec) -> int:
    w = int(width) // d.step * d.step
    return max(min(w, d.max_width), d.min_width)


def check_reachable(space: HeadSpace, target: float) -> Architecture:
    """The smallest architecture of ``space``; :class:`BudgetError` if even it costs above ``target``."""
    smallest = Architecture({label: d.allowed()[0] for label, d in space.dims.items()})
    floor = float(analytic_cost(space, smallest).macs)
    if floor > target:
        dense = float(analytic_cost(space).macs)
        raise BudgetError(
            f"budget of {target:.4g} MACs ({target / dense:.3f} of dense) cannot be met: the smallest "
            f"architecture of this space costs {floor:.4g} MACs ({floor / dense:.3f} of dense)"
        )
    return smallest


def uniform(space: HeadSpace, target: float) -> Architecture:
    """The largest single keep ratio r (width = r * dense width, rounded down to the step)."""
    check_reachable(space, target)

    def at(r: float) -> Architecture:
        return Architecture({label: _round_down(r * d.max_width, d) for label, d in space.dims.items()})

    lo, hi = 0.0, 1.0
    if float(analytic_cost(space, at(hi)).macs) <= target:
        return at(hi)
    for _ in range(40):
        mid = (lo + hi) / 2
        if float(analytic_cost(space, at(mid)).macs) <= target:
            lo = mid
        else:
            hi = mid
    return at(lo)


def _normalised_sorted(space: HeadSpace, scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per dimension, scores sorted descending within each head, divided by the dimension's mean."""
    out = {}
    for label, d in space.dims.items():
        s = scores[label].detach().double().reshape(d.heads, d.max_width)  # (H, d); MLPs: (1, m)
        mean = s.abs().mean()
        s = s / mean if mean > 0 else s
        out[label] = torch.sort(s, dim=1, descending=True).values
    return out


def global_by_score_per_mac(
    space: HeadSpace, scores: Mapping[str, torch.Tensor], target: float
) -> Architecture:
    """Greedy: repeatedly narrow the dimension whose next step loses the least score per MAC saved."""
    check_reachable(space, target)
    ranked = _normalised_sorted(space, scores)
    widths = {label: d.max_width for label, d in space.dims.items()}
    layer_of = {label: split_label(label)[0] for label in space.dims}
    total = float(analytic_cost(space, widths).macs)

    def candidate(label: str) -> tuple[float, float, int] | None:
        d = space.dims[label]
        w = widths[label]
        allowed = [a for a in d.allowed() if a < w]
        if not allowed:
            return None
        new_w = allowed[-1]
        layer = space.layers[layer_of[label]]
        kind = split_label(label)[1]
        cur = {**{k: widths[dd.label] for k, dd in layer.dims.items()}}
        after = {**cur, kind: new_w}
        saved = float(layer.macs(cur)) - float(layer.macs(after))
        lost = float(ranked[label][:, new_w:w].sum())
        return (lost / max(saved, 1e-12), saved, new_w)

    heap: list[tuple[float, str, int]] = []
    version = dict.fromkeys(widths, 0)
    for label in widths:
        c = candidate(label)
        if c is not None:
            heapq.heappush(heap, (c[0], label, 0))
    while total > target and heap:
        _, label, ver = heapq.heappop(heap)
        if ver != version[label]:
            continue
        c = candidate(label)
        if c is None:
            continue
        _, saved, new_w = c
        widths[label] = new_w
        total -= saved
        version[label] += 1
        layer = space.layers[layer_of[label]]
        for dd in layer.dims.values():  # a layer's other dimension's saving changed too
            version[dd.label] += 1 if dd.label != label else 0
            nc = candidate(dd.label)
            if nc is not None:
                heapq.heappush(heap, (nc[0], dd.label, version[dd.label]))
    arch = Architecture(widths)
    if float(analytic_cost(space, arch).macs) > target:  # pragma: no cover - guarded by reachability
        raise BudgetError("global allocation could not meet the budget")
    return arch


def allocate(
    space: HeadSpace,
    scores: Mapping[str, torch.Tensor],
    target_macs: float,
    mode: Literal["uniform", "global"] = "global",
) -> Architecture:
    """A head-balanced architecture costing at most ``target_macs``."""
    missing = [label for label in space.dims if label not in scores]
    if missing:
        raise UsageError(f"scores are missing dimension {missing[0]!r}")
    if mode == "uniform":
        return uniform(space, target_macs)
    if mode == "global":
        return global_by_score_per_mac(space, scores, target_macs)
    raise UsageError(f"unknown allocation {mode!r}; choose 'uniform' or 'global'")
