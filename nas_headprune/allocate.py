"""The shared allocator: channel scores + a budget -> a head-balanced architecture.

The budget is in MACs by default (:class:`MacsCost`); any :class:`CostModel` whose cost is a fixed
part plus a sum over layers can replace it, such as the measured latency table of
:mod:`nas_headprune.evaluator.latency` (``budget_kind: latency``).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Protocol, TypeVar

import torch

from nas_headprune.errors import BudgetError, UsageError
from nas_headprune.evaluator.cost import analytic_cost
from nas_headprune.space import HEADS, Architecture, DimSpec, HeadSpace, split_label

log = logging.getLogger(__name__)
K = TypeVar("K")


class CostModel(Protocol):
    """What the allocator spends a budget on: a per-layer cost and the whole architecture's cost.

    ``total(space, arch)`` must equal a fixed part plus the sum of ``layer`` over the space's layers
    (up to a constant factor the model applies to both), so that a step's saving is the change of
    its layer's cost.
    """

    unit: str

    def layer(self, space: HeadSpace, name: str, widths: Mapping[str, int]) -> float: ...

    def total(self, space: HeadSpace, arch: Mapping[str, int]) -> float: ...

    def dense(self, space: HeadSpace) -> float: ...


class MacsCost:
    """The default budget: analytic MACs per image (:func:`~nas_headprune.evaluator.cost.analytic_cost`)."""

    unit = "MACs"

    def layer(self, space: HeadSpace, name: str, widths: Mapping[str, int]) -> float:
        return float(space.layers[name].macs(widths))

    def total(self, space: HeadSpace, arch: Mapping[str, int]) -> float:
        return float(analytic_cost(space, arch).macs)

    def dense(self, space: HeadSpace) -> float:
        return float(analytic_cost(space).macs)


MACS = MacsCost()


def _round_down(width: float, d: DimSpec) -> int:
    w = int(width) // d.step * d.step
    return max(min(w, d.max_width), d.min_width)


def check_reachable(space: HeadSpace, target: float, cost: CostModel = MACS) -> Architecture:
    """The smallest architecture of ``space``; :class:`BudgetError` if even it costs above ``target``."""
    smallest = space.smallest()
    floor = cost.total(space, smallest)
    if floor > target:
        dense = cost.dense(space)
        raise BudgetError(
            f"budget of {target:.4g} {cost.unit} ({target / dense:.3f} of dense) cannot be met: the "
            f"smallest architecture of this space costs {floor:.4g} {cost.unit} ({floor / dense:.3f} "
            "of dense)"
        )
    return smallest


def tied_groups(space: HeadSpace, tie_qk_v: bool = False) -> list[tuple[str, ...]]:
    """The dimension labels that change width together, in the space's order.

    Every dimension alone, except with ``tie_qk_v``: then the ``qk`` and ``v`` dimensions of a layer
    form one group when they allow the same widths (same heads, dense width, step and minimum), so
    the layer keeps equal query/key and value widths and the fused attention kernel applies as is.
    """
    groups: list[tuple[str, ...]] = []
    for layer in space.layers.values():
        qk, v = layer.dims.get("qk"), layer.dims.get("v")
        tie = (
            tie_qk_v
            and qk is not None
            and v is not None
            and qk.heads == v.heads
            and qk.allowed() == v.allowed()
        )
        if tie and qk is not None and v is not None:
            groups.append((qk.label, v.label))
            groups.extend((d.label,) for kind, d in layer.dims.items() if kind not in ("qk", "v"))
        else:
            groups.extend((d.label,) for d in layer.dims.values())
    return groups


def uniform(space: HeadSpace, target: float, tie_qk_v: bool = False, cost: CostModel = MACS) -> Architecture:
    """The largest single keep ratio r (width = r * dense width, rounded down to the step) whose
    cost is within ``target``; with ``tie_qk_v`` a tied group takes the smallest width of its members."""
    check_reachable(space, target, cost)
    groups = tied_groups(space, tie_qk_v)

    def at(r: float) -> Architecture:  # every head is kept: one ratio is about channels
        widths = {
            label: d.max_width if d.kind == HEADS else _round_down(r * d.max_width, d)
            for label, d in space.dims.items()
        }
        for group in groups:
            w = min(widths[label] for label in group)
            widths.update(dict.fromkeys(group, w))
        return Architecture(widths)

    lo, hi = 0.0, 1.0
    floor = cost.total(space, at(lo))
    if floor > target:  # with head counts or droppable layers: the uniform ratio keeps every head
        dense = cost.dense(space)
        raise BudgetError(
            f"budget of {target:.4g} {cost.unit} ({target / dense:.3f} of dense) cannot be met by the "
            f"uniform allocation, which keeps every head and sublayer (its smallest architecture costs "
            f"{floor:.4g} {cost.unit}, {floor / dense:.3f} of dense); allocation: global may drop "
            "whole heads and sublayers"
        )
    if cost.total(space, at(hi)) <= target:
        return at(hi)
    for _ in range(40):
        mid = (lo + hi) / 2
        if cost.total(space, at(mid)) <= target:
            lo = mid
        else:
            hi = mid
    return at(lo)


def _normalised(d: DimSpec, score: torch.Tensor) -> torch.Tensor:
    """A dimension's scores as ``(H, d)`` (MLPs: ``(1, m)``), divided by their mean magnitude."""
    s = score.detach().double().reshape(d.heads, d.max_width)
    mean = s.abs().mean()
    return s / mean if mean > 0 else s


def _normalised_sorted(space: HeadSpace, scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per channel dimension, scores sorted descending within each head, divided by the dimension's
    mean (head counts are ranked by :func:`head_scores` instead)."""
    return {
        label: torch.sort(_normalised(d, scores[label]), dim=1, descending=True).values
        for label, d in space.dims.items()
        if d.kind != HEADS
    }


def head_scores(space: HeadSpace, scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``scores`` with a score per head for every ``heads`` dimension it lacks: the sum of the head's
    query/key and value channel scores, each dimension normalised by its mean as the allocator
    compares them, so dropping a head costs what dropping all its channels would."""
    out = dict(scores)
    for layer in space.layers.values():
        d = layer.dims.get(HEADS)
        if d is None or d.label in out:
            continue
        total = torch.zeros(d.max_width, dtype=torch.float64)
        for cd in layer.head_channel_dims():
            total += _normalised(cd, scores[cd.label]).sum(dim=1)
        out[d.label] = total
    return out


def _head_order(space: HeadSpace, scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer with a ``heads`` dimension, its heads from the highest score down (ties: lower
    index first, as :meth:`HeadSpace.selection_from_scores` keeps them)."""
    order = {}
    for name, layer in space.layers.items():
        d = layer.dims.get(HEADS)
        if d is not None:
            s = scores[d.label].detach().double().reshape(-1)
            order[name] = torch.sort(-s, stable=True).indices
    return order


def narrow_greedily(
    units: Iterable[K],
    candidate: Callable[[K], tuple[float, float, int] | None],
    step: Callable[[K, int], Iterable[K]],
    total: float,
    target: float,
    rank: Callable[[K], Any] | None = None,
) -> float:
    """The greedy trim: while ``total`` is above ``target``, take the unit whose next step has the
    smallest ``candidate(unit)[0]`` (score lost per unit of cost saved; ties go to the smallest
    ``rank(unit)``, by default the unit itself) and apply it with ``step(unit, new_width)``, which
    returns the units whose candidates that changed. ``candidate`` gives ``(key, cost saved, new
    width)``, or None for a unit that cannot narrow. Returns the cost left. Used by
    :func:`global_by_score_per_mac` and by ``similarity_indicator``'s budget fix-up."""
    order: Callable[[K], Any] = rank if rank is not None else (lambda unit: unit)
    heap: list[tuple[float, Any, int, int]] = []
    keys = list(units)
    index = {unit: i for i, unit in enumerate(keys)}  # a heap entry names its unit by position
    version = [0] * len(keys)
    for i, unit in enumerate(keys):
        c = candidate(unit)
        if c is not None:
            heapq.heappush(heap, (c[0], order(unit), i, 0))
    while total > target and heap:
        _, _, i, ver = heapq.heappop(heap)
        if ver != version[i]:
            continue
        c = candidate(keys[i])
        if c is None:
            continue
        _, saved, new_w = c
        total -= saved
        for other in step(keys[i], new_w):
            j = index[other]
            version[j] += 1
            nc = candidate(other)
            if nc is not None:
                heapq.heappush(heap, (nc[0], order(other), j, version[j]))
    return total


def global_by_score_per_mac(
    space: HeadSpace,
    scores: Mapping[str, torch.Tensor],
    target: float,
    tie_qk_v: bool = False,
    cost: CostModel = MACS,
) -> Architecture:
    """Greedy: repeatedly narrow the dimension whose next step loses the least score per unit of
    cost saved (MACs by default, milliseconds with a latency table).

    In a space with droppable layers (:meth:`HeadSpace.with_drops`) a head count may step 1 -> 0
    and an MLP width its minimum -> 0: the step loses the scores of everything the layer still keeps
    and saves the layer's remaining cost; a dropped layer takes no further steps.

    With ``tie_qk_v`` a layer's ``qk`` and ``v`` dimensions are one unit (:func:`tied_groups`): a
    step narrows both, losing the scores of both and saving the cost of both. A step that saves
    nothing (a measured latency can be flat in width) is taken last.
    """
    check_reachable(space, target, cost)
    scores = head_scores(space, scores)
    ranked = _normalised_sorted(space, scores)
    head_order = _head_order(space, scores)
    widths = {label: d.max_width for label, d in space.dims.items()}
    layer_of = {label: split_label(label)[0] for label in space.dims}
    total = cost.total(space, widths)
    groups = {group[0]: group for group in tied_groups(space, tie_qk_v)}  # keyed by the first label
    groups_of_layer: dict[str, list[str]] = {}
    for key in groups:
        groups_of_layer.setdefault(layer_of[key], []).append(key)

    def candidate(key: str) -> tuple[float, float, int] | None:
        group = groups[key]
        d = space.dims[key]
        w = widths[key]  # the members of a group have one width
        allowed = [a for a in d.allowed() if a < w]
        if not allowed:
            return None
        new_w = allowed[-1]
        layer = space.layers[layer_of[key]]
        cur = {**{k: widths[dd.label] for k, dd in layer.dims.items()}}
        if layer.dropped(cur):  # a layer dropped whole has nothing left to narrow
            return None
        after = {**cur, **{split_label(label)[1]: new_w for label in group}}
        saved = cost.layer(space, layer_of[key], cur) - cost.layer(space, layer_of[key], after)
        order = head_order.get(layer_of[key])
        if d.kind == HEADS:  # drop the lowest-scored kept head with the channels it keeps
            assert order is not None
            gone = order[new_w]
            lost = sum(
                float(ranked[dd.label][gone, : widths[dd.label]].sum()) for dd in layer.head_channel_dims()
            )
        else:  # only the kept heads' channels count
            rows = order[: cur[HEADS]] if order is not None else slice(None)
            lost = sum(float(ranked[label][rows, new_w:w].sum()) for label in group)
        return (lost / max(saved, 1e-12), saved, new_w)

    def step(key: str, new_w: int) -> list[str]:
        widths.update(dict.fromkeys(groups[key], new_w))
        return groups_of_layer[layer_of[key]]  # the layer's units, whose savings changed

    narrow_greedily(groups, candidate, step, total, target)
    arch = Architecture(widths)
    if cost.total(space, arch) > target:  # pragma: no cover - guarded by reachability
        raise BudgetError("global allocation could not meet the budget")
    return arch


def allocate(
    space: HeadSpace,
    scores: Mapping[str, torch.Tensor],
    target_macs: float,
    mode: Literal["uniform", "global"] = "global",
    tie_qk_v: bool = False,
    cost: CostModel = MACS,
) -> Architecture:
    """A head-balanced architecture costing at most ``target_macs`` (or ``target`` in the unit of
    ``cost``, e.g. milliseconds for a latency table); with ``tie_qk_v`` every softmax attention layer
    keeps equal query/key and value widths (:func:`tied_groups`)."""
    missing = [label for label in space.dims if label not in scores and space.dims[label].kind != HEADS]
    if missing:
        raise UsageError(f"scores are missing dimension {missing[0]!r}")
    if mode == "uniform":
        return uniform(space, target_macs, tie_qk_v, cost)
    if mode == "global":
        return global_by_score_per_mac(space, scores, target_macs, tie_qk_v, cost)
    raise UsageError(f"unknown allocation {mode!r}; choose 'uniform' or 'global'")
