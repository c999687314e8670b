"""Independent MACs count: run the model under torch's FlopCounterMode.

This is the check on the analytic cost model (:mod:`nas_headprune.evaluator.cost`): it knows
nothing about search spaces, it just counts the matrix products the model executes. FlopCounterMode
counts 0 for scaled_dot_product_attention on the CPU, so a formula for the CPU kernel is registered
here. One convention: ``flops = 2 * macs``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _sdpa_cpu_flops(q_shape: Any, k_shape: Any, v_shape: Any, *args: Any, **kwargs: Any) -> int:
    # q: (B, H, L, E), k: (B, H, S, E), v: (B, H, S, Ev); q @ k^T and attn @ v, 2 FLOPs per MAC
    b, h, lq, e = q_shape
    s = k_shape[-2]
    ev = v_shape[-1]
    return 2 * b * h * lq * s * (e + ev)


def _custom_mapping() -> dict:
    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _sdpa_cpu_flops
    return mapping


def _counter() -> FlopCounterMode:
    from torch.utils.flop_counter import register_flop_formula  # noqa: F401  (present in torch>=2.1)

    return FlopCounterMode(display=False, custom_mapping=_custom_mapping())


def _example(model: nn.Module, input_size: tuple[int, ...]) -> torch.Tensor:
    p = next(model.parameters(), None)
    return torch.zeros(1, *input_size, device=p.device if p is not None else "cpu")


def _count(model: nn.Module, input_size: tuple[int, ...]) -> FlopCounterMode:
    """Run ``model`` once at batch 1 in eval mode under a flop counter; return the counter."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), _counter() as fc:
            model(_example(model, input_size))
    finally:
        model.train(was)
    return fc


def measure_macs(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """Per-image MACs of ``model`` measured by FlopCounterMode (batch 1, eval mode)."""
    return _count(model, input_size).get_total_flops() // 2


def measure_macs_by_module(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, int]:
    """Per-image MACs per module path (``""`` is the whole model), measured."""
    out: dict[str, int] = {}
    for key, counts in _count(model, input_size).get_flop_counts().items():
        # keys look like "Global" and "<RootClass>.<path>"
        path = "" if key == "Global" else key.partition(".")[2]
        out[path] = sum(counts.values()) // 2
    return out


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
