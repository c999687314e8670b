"""Measured latency as a budget (``budget_kind: latency``): a lookup table per layer and width.

A latency table holds, for every prunable layer, its forward time on a grid of widths (a few widths
per dimension: the smallest, the dense one and evenly spaced ones between; the product of the grids
for a layer with a query/key and a value dimension). Each grid point is one pruned copy of the layer
(built by :func:`~nas_headprune.evaluator.materialize.materialize`, so it runs the attention path a
real pruned model runs), timed alone on the input the dense model gives it, at the configured batch
size, device and thread count: warm-up calls, then the median of interleaved rounds. Between grid
points the time is interpolated (multilinear), and each layer's grid is made non-decreasing in every
width first, so narrowing never predicts a slow-down that timing noise made up.

A layer that may be dropped whole (``space.drop_sublayers``) is timed with the norm only it reads
(a timm block's ``norm1`` before ``attn``), at every grid point: its 0 heads / 0 units point is the
constant module and the ``nn.Identity`` that replaces the norm, so the time a drop saves includes
the norm's. Its grid holds 0 besides the usual widths.

Layers timed alone run faster than inside the model (warm caches, no neighbours). Two whole models
are timed too, the dense one and the smallest architecture, and the prediction is calibrated on them:
``predicted(arch) = fixed + scale * sum(layer times)``, exact at both ends. ``fixed`` is the part no
pruning changes (patch embedding, norms, the head, Python overhead).

Tables are cached (``latency.cache_dir``, by default ``~/.cache/nas-headprune/latency``), keyed by
the model's class and space, the input size, batch size, device (with the CPU's or GPU's name),
thread count, torch version and the grid settings, so a device is measured once.

The table itself, the cost model the allocator takes, is in :mod:`nas_headprune.evaluator.latency_cost`;
its names are importable from here too.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import platform
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nas_headprune.errors import UsageError
from nas_headprune.evaluator.latency_cost import TABLE_VERSION, LatencyTable, LayerLatency, interpolate
from nas_headprune.evaluator.metrics import interleaved_medians
from nas_headprune.space import DROP_NORM, Architecture, DimSpec, HeadSpace

log = logging.getLogger(__name__)

# the name the interpolation had when it lived in this module
_interpolate = interpolate


def grid_widths(d: DimSpec, points: int) -> list[int]:
    """``points`` allowed widths of ``d`` spread evenly over its allowed widths, both ends included.
    A dimension that allows 0 (a droppable layer) gets 0 on top of the ``points`` nonzero widths, so
    the smallest width that keeps the layer is timed too."""
    if points < 2:
        raise UsageError(f"latency.points must be at least 2, got {points}")
    if d.zero:
        return [0, *grid_widths(dataclasses.replace(d, zero=False), points)]
    allowed = d.allowed()
    if len(allowed) <= points:
        return allowed
    picks = {round(i * (len(allowed) - 1) / (points - 1)) for i in range(points)}
    return [allowed[i] for i in sorted(picks)]


def _monotone(values: torch.Tensor) -> torch.Tensor:
    """``values`` made non-decreasing along every axis (running maximum axis by axis)."""
    out = values.clone()
    for axis in range(out.dim()):
        out = torch.cummax(out, dim=axis).values
    return out


# ------------------------------------------------------------------------------- measuring
def device_name(device: torch.device) -> str:
    """The processor's name: the GPU's for CUDA, the CPU model (from /proc/cpuinfo) otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _norms(space: HeadSpace) -> dict[str, str]:
    """``{layer: the norm only it reads}`` for the layers that may be dropped whole with their norm."""
    return {name: layer.meta[DROP_NORM] for name, layer in space.layers.items() if layer.meta.get(DROP_NORM)}


def _layer_inputs(model: nn.Module, space: HeadSpace, example: torch.Tensor) -> dict[str, tuple[tuple, dict]]:
    """The positional and keyword arguments each prunable layer gets in one forward of ``example``,
    and each norm of :func:`_norms` (under the norm's module path)."""
    captured: dict[str, tuple[tuple, dict]] = {}
    handles = []
    modules = dict(model.named_modules())
    for name in [*space.layers, *_norms(space).values()]:

        def hook(module: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            if name not in captured:  # the first call (a module called twice keeps its first input)
                captured[name] = (args, kwargs)

        handles.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name in [*space.layers, *_norms(space).values()] if name not in captured]
    if missing:
        raise UsageError(f"layer {missing[0]!r} was not called in a forward pass; it cannot be timed")
    return captured


def _grids(space: HeadSpace, points: int) -> dict[str, dict[str, list[int]]]:
    return {
        name: {kind: grid_widths(d, points) for kind, d in layer.dims.items()}
        for name, layer in space.layers.items()
    }


def measure_table(
    model: nn.Module,
    space: HeadSpace,
    *,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    points: int = 5,
    rounds: int = 15,
    warmup: int = 3,
    setting: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> LatencyTable:
    """Time every layer of ``space`` on its width grid and calibrate on two whole models.

    ``model`` is the dense model the space was built from; it is not modified. ``threads`` sets
    torch's CPU threads while timing (restored afterwards).
    """
    from nas_headprune.evaluator.materialize import materialize
    from nas_headprune.progress import stderr_progress

    if batch_size < 1 or rounds < 1 or warmup < 0:
        raise UsageError(
            f"batch_size and rounds must be >= 1 and warmup >= 0; got {batch_size}, {rounds}, {warmup}"
        )
    dev = torch.device(device)
    grids = _grids(space, points)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    was_training = model.training
    on_device = all(p.device == dev for p in model.parameters())
    dense = (model if on_device else copy.deepcopy(model).to(dev)).eval()
    try:
        generator = torch.Generator().manual_seed(0)
        example = torch.randn((batch_size, *space.input_size), generator=generator).to(dev)
        inputs = _layer_inputs(dense, space, example)
        # One pruned model per tuple of grid indices (i, j, ...): it sets every layer whose grid has
        # those indices (layers with fewer dimensions only at trailing zeros), and those layers are
        # timed there. So a layer with grids of n and m widths is timed at its n * m grid points.
        depth = max(len(g) for g in grids.values())
        sizes = [max(len(list(g.values())[i]) for g in grids.values() if len(g) > i) for i in range(depth)]
        combos = list(itertools.product(*(range(n) for n in sizes)))
        modules: dict[tuple[str, tuple[int, ...]], nn.Module] = {}
        # a droppable layer is timed with the norm only it reads: dropping it removes both
        norm_of = _norms(space)
        norm_modules: dict[tuple[str, tuple[int, ...]], nn.Module] = {}
        with stderr_progress(enabled=progress, transient=True) as bar:
            task = bar.add_task("latency table: pruned copies", total=len(combos))
            for combo in combos:
                widths: dict[str, int] = {}
                timed: list[tuple[str, tuple[int, ...]]] = []  # (layer, its grid index)
                for name, layer in space.layers.items():
                    g = grids[name]
                    index = combo[: len(g)]
                    if any(combo[len(g) :]) or any(
                        i >= len(w) for i, w in zip(index, g.values(), strict=True)
                    ):
                        continue
                    timed.append((name, index))
                    for (kind, w), i in zip(g.items(), index, strict=True):
                        widths[layer.dims[kind].label] = w[i]
                if timed:
                    arch = Architecture({**space.dense(), **widths})
                    pruned = materialize(dense, space, space.first_channels(arch)).eval()
                    for name, index in timed:
                        modules[name, index] = pruned.get_submodule(name)
                        if name in norm_of:  # nn.Identity where this grid point drops the layer
                            norm_modules[name, index] = pruned.get_submodule(norm_of[name])
                bar.advance(task)
        smallest = space.smallest()
        small_model = materialize(dense, space, space.first_channels(smallest)).to(dev).eval()

        def call(key: tuple[str, tuple[int, ...]]) -> Callable[[], Any]:
            args, kwargs = inputs[key[0]]
            module = modules[key]
            if key in norm_modules:  # the norm's output is the layer's first argument
                norm = norm_modules[key]
                norm_args, norm_kwargs = inputs[norm_of[key[0]]]
                rest = args[1:]
                return lambda: module(norm(*norm_args, **norm_kwargs), *rest, **kwargs)
            return lambda: module(*args, **kwargs)

        # short layers repeat within a sample (about 2 ms each), so timer resolution does not show
        layer_s = interleaved_medians({key: call(key) for key in modules}, rounds, warmup, dev, sample_s=2e-3)
        whole_s = interleaved_medians(
            {"dense": lambda: dense(example), "smallest": lambda: small_model(example)},
            rounds,
            warmup,
            dev,
            sample_s=2e-3,
        )
        layer_ms = {key: 1000.0 * v for key, v in layer_s.items()}
        whole = {key: 1000.0 * v for key, v in whole_s.items()}
    finally:
        model.train(was_training)
        if threads is not None:
            torch.set_num_threads(old_threads)

    layers: dict[str, LayerLatency] = {}
    for name, g in grids.items():
        shape = tuple(len(w) for w in g.values())
        raw = torch.zeros(shape, dtype=torch.float64)
        for index in itertools.product(*(range(n) for n in shape)):
            raw[index] = layer_ms[name, index]
        layers[name] = LayerLatency(list(g), list(g.values()), raw.tolist(), _monotone(raw).tolist())
    table = calibrate(layers, space, whole["dense"], whole["smallest"], setting or {})
    log.info(
        "latency table: dense %.3f ms, smallest %.3f ms per batch of %d (scale %.3f, fixed %.3f ms)",
        whole["dense"],
        whole["smallest"],
        batch_size,
        table.scale,
        table.fixed_ms,
    )
    return table


def calibrate(
    layers: dict[str, LayerLatency],
    space: HeadSpace,
    dense_ms: float,
    smallest_ms: float,
    setting: Mapping[str, Any],
) -> LatencyTable:
    """The table whose prediction equals the whole models' times at the dense and the smallest
    architecture: ``scale`` maps the span of the layers' summed times onto the span of the whole
    models', ``fixed`` is the rest. When the two whole times are not in that order (timing noise on a
    model too small to tell them apart) the layers' times are taken as they are (``scale`` 1) and
    only the dense end is matched."""
    table = LatencyTable(layers, 0.0, 1.0, dense_ms, smallest_ms, dict(setting))
    smallest = space.smallest()
    dense_sum = table.predict(space, space.dense())
    small_sum = table.predict(space, smallest)
    if dense_ms > smallest_ms and dense_sum > small_sum:
        table.scale = (dense_ms - smallest_ms) / (dense_sum - small_sum)
    else:
        log.warning(
            "the smallest architecture did not time faster than the dense model (%.4g vs %.4g ms); "
            "latency predictions use the layers' own times",
            smallest_ms,
            dense_ms,
        )
    table.fixed_ms = dense_ms - table.scale * dense_sum
    return table


# ---------------------------------------------------------------------------------- caching
def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nas-headprune" / "latency"


def table_key(model: nn.Module, space: HeadSpace, setting: Mapping[str, Any]) -> str:
    """A hash of what the table's times depend on: the model class, the space, the timing setting."""
    shape: dict[str, dict[str, Any]] = {
        name: {
            "family": layer.family,
            # a dimension that allows 0 says so (absent otherwise, so older keys stay as they were)
            "dims": {
                k: [d.heads, d.max_width, d.min_width, d.step, *(["zero"] if d.zero else [])]
                for k, d in layer.dims.items()
            },
        }
        for name, layer in space.layers.items()
    }
    for name, norm in _norms(space).items():  # timed with the layer: another table
        shape[name]["norm"] = norm
    facts = {
        "version": TABLE_VERSION,
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "space": shape,
        "input_size": list(space.input_size),
        "torch": torch.__version__,
        **setting,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def latency_table(
    model: nn.Module,
    space: HeadSpace,
    *,
    batch_size: int,
    device: str | torch.device,
    threads: int | None,
    points: int,
    rounds: int,
    warmup: int,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> tuple[LatencyTable, Path | None]:
    """The cached table for this model, space and setting, measured (and cached) when there is none.

    A cached file that cannot be read is measured again (with a warning naming it), never trusted.
    Returns the table and the cache file (``None`` when ``cache_dir`` is ``""``: no cache).
    """
    from nas_headprune.atomic import atomic_write_json

    dev = torch.device(device)
    setting = {
        "batch_size": batch_size,
        "device": dev.type,
        "device_name": device_name(dev),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "points": points,
        "rounds": rounds,
        "warmup": warmup,
    }
    path: Path | None = None
    if cache_dir != "":
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = folder / f"{table_key(model, space, setting)}.json"
        if path.is_file():
            try:
                table = LatencyTable.from_dict(json.loads(path.read_text()))
                if set(table.layers) != set(space.layers):
                    raise ValueError("its layers are not this space's")
                log.info("latency table from the cache: %s", path)
                return table, path
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                log.warning("latency cache file %s is damaged (%s); measuring again", path, exc)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or 1
    if dev.type == "cpu" and load > cores:  # more runnable tasks than cores (this one included)
        log.warning(
            "measuring a latency table on a busy machine (load average %.2f on %d cores): times measured "
            "now are slower than idle ones, small batches most, and the table is cached%s",
            load,
            cores,
            f" in {path}; delete it to measure again" if path is not None else "",
        )
    table = measure_table(
        model,
        space,
        batch_size=batch_size,
        device=dev,
        threads=threads,
        points=points,
        rounds=rounds,
        warmup=warmup,
        setting=setting,
        progress=progress,
    )
    table.setting["load_average"] = load  # a record of the conditions, not part of the cache key
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, table.to_dict())
        except OSError as exc:
            log.warning("could not cache the latency table in %s: %s", path, exc.strerror or exc)
    return table, path
