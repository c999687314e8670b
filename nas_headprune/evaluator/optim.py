"""The fine-tune's optimizer setup: AdamW parameter groups and the warm-up plus cosine schedule."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

__all__ = ["lr_factor", "param_groups"]


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for 0-based optimizer step ``step``.

    Linear warm-up ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then a cosine
    from 1 at step ``warmup_steps`` to ``min_ratio`` at step ``total_steps - 1``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps - 1
    progress = min(1.0, (step - warmup_steps) / decay_steps) if decay_steps > 0 else 0.0
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: trainable matrices decay; 1-D parameters and ``model.no_weight_decay()`` names do not."""
    skip: set[str] = set()
    hook = getattr(model, "no_weight_decay", None)
    if callable(hook):
        skip = set(hook())
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
