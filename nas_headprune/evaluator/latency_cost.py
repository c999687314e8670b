"""The latency table as a cost model: per-layer times on width grids, interpolated between them.

A :class:`LatencyTable` holds, for every prunable layer, a :class:`LayerLatency`: the measured times
(ms per batch) on the grid of its dimensions' widths, as measured and made non-decreasing in every
width. Between grid points the time is interpolated (multilinear); the whole model's latency is
``fixed + scale * sum(layer times)``. The table round-trips through JSON (:meth:`LatencyTable.to_dict`,
:meth:`LatencyTable.from_dict`). Measuring, calibrating and caching tables is
:mod:`nas_headprune.evaluator.latency`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from nas_headprune.errors import UsageError
from nas_headprune.space import HeadSpace

__all__ = ["TABLE_VERSION", "LatencyTable", "LayerLatency", "interpolate"]


#: bump when the table's meaning or layout changes: older cached tables are then measured again
TABLE_VERSION = 1


def interpolate(grids: list[list[int]], values: Any, point: list[float]) -> float:
    """Multilinear interpolation of ``values`` (nested lists or a tensor, one axis per grid) at
    ``point``, clamped to the grid."""
    if not grids:
        return float(values)
    grid, rest = grids[0], grids[1:]
    x = min(max(float(point[0]), grid[0]), grid[-1])
    hi = next((i for i, g in enumerate(grid) if g >= x), len(grid) - 1)
    if grid[hi] == x or hi == 0:
        return interpolate(rest, values[hi], point[1:])
    lo = hi - 1
    t = (x - grid[lo]) / (grid[hi] - grid[lo])
    a = interpolate(rest, values[lo], point[1:])
    b = interpolate(rest, values[hi], point[1:])
    return a + t * (b - a)


@dataclass
class LayerLatency:
    """One layer's measured times (ms per batch) on the grid of its dimensions' widths."""

    kinds: list[str]  # the dimension kinds, one axis each ("qk", "v", "mlp", ...)
    grids: list[list[int]]  # per kind, the measured widths
    raw_ms: list  # nested lists, one axis per kind: the medians as measured
    ms: list  # the same made non-decreasing in every width

    def at(self, widths: Mapping[str, float]) -> float:
        # the nested lists as they are: the allocator asks this for every candidate step
        return interpolate(self.grids, self.ms, [widths[k] for k in self.kinds])


@dataclass
class LatencyTable:
    """Per layer and width, the measured latency, and the calibration to whole-model latency.

    It is a :class:`~nas_headprune.allocate.CostModel` in milliseconds per batch: ``layer`` is one
    layer's share (already multiplied by ``scale``), ``total`` the predicted latency of a whole
    architecture.
    """

    layers: dict[str, LayerLatency]
    fixed_ms: float
    scale: float
    dense_ms: float  # the dense model, timed whole
    smallest_ms: float  # the smallest architecture, timed whole
    setting: dict[str, Any] = field(default_factory=dict)

    unit = "ms"

    # ---------------------------------------------------------------- CostModel
    def layer(self, space: HeadSpace, name: str, widths: Mapping[str, int]) -> float:
        return self.scale * self.layers[name].at(widths)

    def total(self, space: HeadSpace, arch: Mapping[str, int]) -> float:
        return self.predict(space, arch)

    def dense(self, space: HeadSpace) -> float:
        return self.predict(space, space.dense())

    # ------------------------------------------------------------------- public
    def predict(self, space: HeadSpace, arch: Mapping[str, int]) -> float:
        """Predicted ms per batch of the whole model at ``arch`` (dense widths where it is silent)."""
        return float(self.fixed_ms + self.scale * self.layer_sum(space, arch))

    def layer_sum(self, space: HeadSpace, arch: Mapping[str, int]) -> float:
        """The layers' own summed times at ``arch``, before ``scale`` and ``fixed`` apply."""
        total = 0.0
        for name, layer in space.layers.items():
            if name not in self.layers:
                raise UsageError(
                    f"the latency table has no layer {name!r}; it was measured for another model"
                )
            total += self.layers[name].at({k: arch.get(d.label, d.max_width) for k, d in layer.dims.items()})
        return total

    def refitted(self, space: HeadSpace, arch: Mapping[str, int], fraction: float) -> LatencyTable | None:
        """This table calibrated again through the dense model and ``arch``, which was measured whole
        at ``fraction`` of the dense latency: ``scale`` and ``fixed`` are chosen so the prediction is
        ``dense_ms`` at the dense widths and ``fraction * dense_ms`` at ``arch``. Near ``arch`` this is
        the secant of the real curve, where the two-ends calibration is its chord over the whole range.
        ``None`` when the two points cannot fix a line (``arch`` saves nothing in the layers' own
        times, or was not measured faster than dense)."""
        dense_sum = self.layer_sum(space, space.dense())
        saved = dense_sum - self.layer_sum(space, arch)
        if not (0.0 < fraction < 1.0) or saved <= 0.0:
            return None
        scale = self.dense_ms * (1.0 - fraction) / saved
        fixed = self.dense_ms - scale * dense_sum
        return replace(self, scale=scale, fixed_ms=fixed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": TABLE_VERSION,
            "setting": self.setting,
            "fixed_ms": self.fixed_ms,
            "scale": self.scale,
            "dense_ms": self.dense_ms,
            "smallest_ms": self.smallest_ms,
            "layers": {
                name: {"kinds": t.kinds, "grids": t.grids, "raw_ms": t.raw_ms, "ms": t.ms}
                for name, t in self.layers.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyTable:
        """The table of :meth:`to_dict`; ``ValueError`` for anything that is not one."""
        try:
            if data["version"] != TABLE_VERSION:
                raise ValueError(f"table version {data['version']!r}, expected {TABLE_VERSION}")
            layers = {}
            for name, t in data["layers"].items():
                layer = LayerLatency(
                    list(t["kinds"]), [list(map(int, g)) for g in t["grids"]], t["raw_ms"], t["ms"]
                )
                shape = tuple(len(g) for g in layer.grids)
                if tuple(torch.tensor(layer.ms, dtype=torch.float64).shape) != shape:
                    raise ValueError(f"layer {name!r}: times do not match its grid {shape}")
                layers[name] = layer
            table = cls(
                layers,
                float(data["fixed_ms"]),
                float(data["scale"]),
                float(data["dense_ms"]),
                float(data["smallest_ms"]),
                dict(data["setting"]),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a latency table ({type(exc).__name__}: {exc})") from exc
        values = [table.fixed_ms, table.scale, table.dense_ms, table.smallest_ms]
        if not all(v == v and abs(v) != float("inf") for v in values):
            raise ValueError("not a latency table (non-finite numbers)")
        return table
