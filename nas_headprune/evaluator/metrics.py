"""Accuracy, loss, throughput and parameter counts of (pruned) models.

:func:`evaluate` gives top-1 / top-5 accuracy and mean cross entropy over a loader; under
``torch.distributed`` each rank evaluates its shard and the counts are summed across ranks.
:func:`measure_throughput` times several models on one shared input, interleaved round by round so
they share the machine's noise, and reports speed-ups relative to the first model, with the
attention paths each model runs (:func:`attention_paths`). Speed is reported, never asserted.
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from nas_headprune.errors import UsageError
from nas_headprune.evaluator.measure import count_params

__all__ = [
    "batch_inputs",
    "attention_paths",
    "count_params",
    "evaluate",
    "interleaved_medians",
    "measure_throughput",
    "resolve_device",
    "split_batch",
]

logger = logging.getLogger(__name__)
K = TypeVar("K")


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` means CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(
            f"device {device!r} is not a valid torch device (try 'cpu', 'cuda', 'cuda:0' or 'auto')"
        ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"device {device!r} was asked for but CUDA is not available here; use 'cpu' or 'auto'"
        )
    return resolved


def batch_inputs(batch: Any) -> torch.Tensor:
    """The inputs of a batch: a tensor as it is, or the first item of ``(inputs, targets, ...)``."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` from a batch that is a tuple or list of at least two tensors."""
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 2:
        return batch[0], batch[1]
    raise UsageError(
        f"a batch must be a tuple or list (inputs, targets, ...), got {type(batch).__name__}; "
        "wrap the dataset so that it yields (image, label) pairs"
    )


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype used for mixed precision on ``device``; ``None`` where AMP is not used (CPU)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def is_distributed() -> bool:
    """Whether a torch.distributed process group is running (under torchrun)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    device: str | torch.device = "cpu",
    amp: bool = False,
    max_batches: int | None = None,
) -> dict[str, float | int]:
    """Top-1 (and top-5 when there are more than 5 classes) accuracy in percent and mean cross entropy.

    Returns ``{"top1", "top5" (only for more than 5 classes), "loss", "samples"}``. The model is put in
    eval mode for the pass and given back in the mode it was in. ``amp`` enables autocast on CUDA only.
    Under ``torch.distributed`` every rank must call this with its own shard of the data; sums are
    reduced across ranks, so a ``DistributedSampler`` that pads the last shard counts padded samples.
    """
    if max_batches is not None and max_batches < 1:
        raise UsageError(f"max_batches must be at least 1 or None, got {max_batches}")
    dev = resolve_device(device)
    dtype = amp_dtype(dev) if amp else None
    was_training = model.training
    model.eval()
    # counts: [top1 hits, top5 hits, summed loss, samples]; float64 so large sets stay exact
    totals = torch.zeros(4, dtype=torch.float64, device=dev)
    num_classes = 0
    try:
        with torch.no_grad():
            for index, batch in enumerate(loader):
                if max_batches is not None and index >= max_batches:
                    break
                inputs, targets = split_batch(batch)
                inputs = inputs.to(dev, non_blocking=True)
                targets = targets.to(dev, non_blocking=True)
                with torch.autocast(device_type=dev.type, dtype=dtype, enabled=dtype is not None):
                    logits = model(inputs)
                logits = logits.float()  # (B, num_classes)
                num_classes = logits.shape[-1]
                k = min(5, num_classes)
                topk = logits.topk(k, dim=-1).indices  # (B, k)
                hits = topk.eq(targets.unsqueeze(-1))  # (B, k)
                totals[0] += hits[:, 0].sum()
                totals[1] += hits.any(dim=-1).sum()
                totals[2] += F.cross_entropy(logits, targets, reduction="sum").double()
                totals[3] += targets.shape[0]
    finally:
        model.train(was_training)

    if is_distributed():
        classes = torch.tensor([num_classes], dtype=torch.float64, device=dev)
        torch.distributed.all_reduce(totals)
        torch.distributed.all_reduce(classes, op=torch.distributed.ReduceOp.MAX)
        num_classes = int(classes.item())
    top1_hits, top5_hits, loss_sum, samples = totals.tolist()
    if samples == 0:
        raise UsageError("evaluate got no samples: the loader is empty")
    result: dict[str, float | int] = {
        "top1": 100.0 * top1_hits / samples,
        "loss": loss_sum / samples,
        "samples": int(samples),
    }
    if num_classes > 5:
        result["top5"] = 100.0 * top5_hits / samples
    return result


def attention_paths(model: nn.Module, device: str | torch.device = "cpu") -> dict[str, str]:
    """Per module path, the attention path (``"sdpa"``, ``"sdpa_padded"``, ``"math"``) that each
    pruned attention module of ``model`` runs on ``device``: the modules that say so through an
    ``attention_path(device_type)`` method (the project's pruned attention). Empty for a model
    without such modules."""
    dev = resolve_device(device) if isinstance(device, str) else device
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        method = getattr(module, "attention_path", None)
        if callable(method):
            out[name] = str(method(dev.type))
    return out


def _path_counts(model: nn.Module, device: torch.device) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in attention_paths(model, device).values():
        counts[path] = counts.get(path, 0) + 1
    return dict(sorted(counts.items()))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], Any], calls: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``calls`` calls, the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / calls


def interleaved_medians(
    fns: Mapping[K, Callable[[], Any]],
    rounds: int,
    warmup: int,
    device: torch.device,
    sample_s: float | None = None,
) -> dict[K, float]:
    """Median seconds per call of each function under ``torch.inference_mode``: ``warmup`` untimed
    calls each, then ``rounds`` rounds that call every function once, the order rotated from round
    to round, so slow spells of the machine hit all of them alike. ``sample_s`` (optional): repeat a
    short function within one sample so that the sample lasts about that long (at most 50 calls);
    by default one call is one sample."""
    keys = list(fns)
    with torch.inference_mode():
        for _ in range(warmup):
            for k in keys:
                fns[k]()
        _sync(device)
        calls = dict.fromkeys(keys, 1)
        if sample_s is not None:
            for k in keys:
                once = min(timed_call(fns[k], 1, device) for _ in range(3))
                calls[k] = max(1, min(50, int(sample_s / max(once, 1e-7))))
        times: dict[K, list[float]] = {k: [] for k in keys}
        for r in range(rounds):
            shift = r % len(keys)
            for k in keys[shift:] + keys[:shift]:
                times[k].append(timed_call(fns[k], calls[k], device))
    return {k: statistics.median(v) for k, v in times.items()}


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def measure_throughput(
    models: Mapping[str, nn.Module],
    input_shape: tuple[int, ...],
    batch_size: int,
    device: str | torch.device = "cpu",
    warmup: int = 3,
    iters: int = 10,
    threads: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Time forward passes of several models on one shared random input of ``(batch_size, *input_shape)``.

    Each round runs every model once, the order rotated from round to round, so slow spells of the
    machine hit all models alike. Returns, per model name, ``ms_per_batch`` (median over ``iters``
    rounds), ``images_per_s`` and ``speedup`` (the first model's median time over this one's; 1.0 for
    the first), plus ``attention_paths`` (how many attention modules run each path on ``device``, see
    :func:`attention_paths`) for a model that has pruned attention. The models are moved to ``device``
    and run in eval mode under ``torch.inference_mode``;
    each is given back in the train/eval mode it had. ``threads`` sets torch's CPU threads for the
    measurement and restores the previous value afterwards.
    """
    if not models:
        raise UsageError("measure_throughput needs at least one model, got an empty mapping")
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    if iters < 1:
        raise UsageError(f"iters must be at least 1, got {iters}")
    if warmup < 0:
        raise UsageError(f"warmup must be 0 or more, got {warmup}")
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be at least 1 or None, got {threads}")
    if not input_shape or any(int(s) < 1 for s in input_shape):
        raise UsageError(
            f"input_shape must be the shape of one sample, e.g. (3, 224, 224), got {input_shape!r}"
        )
    dev = resolve_device(device)
    names = list(models)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    modes = {name: models[name].training for name in names}
    try:
        generator = torch.Generator().manual_seed(0)
        shared = torch.randn((batch_size, *input_shape), generator=generator).to(dev)  # (B, *input_shape)
        inputs: dict[str, torch.Tensor] = {}
        for name in names:
            model = models[name].to(dev).eval()
            dtype = _model_dtype(model)
            # every model sees the very same tensor unless its weights need another dtype
            inputs[name] = shared if dtype == shared.dtype else shared.to(dtype)
        forwards = {name: functools.partial(models[name], inputs[name]) for name in names}
        medians = interleaved_medians(forwards, iters, warmup, dev)
    finally:
        for name in names:
            models[name].train(modes[name])
        if threads is not None:
            torch.set_num_threads(old_threads)

    reference = medians[names[0]]
    result: dict[str, dict[str, Any]] = {}
    for name in names:
        seconds = medians[name]
        result[name] = {
            "ms_per_batch": 1000.0 * seconds,
            "images_per_s": batch_size / seconds if seconds > 0 else math.inf,
            "speedup": 1.0 if name == names[0] else (reference / seconds if seconds > 0 else math.inf),
        }
        paths = _path_counts(models[name], dev)
        if paths:
            result[name]["attention_paths"] = paths
        logger.debug("throughput %s: %.3f ms per batch of %d", name, 1000.0 * seconds, batch_size)
    return result
