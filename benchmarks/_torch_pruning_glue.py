"""Minimal glue to run Torch-Pruning's head-dim pruning on timm ViTs, for side-by-side benchmarks.

Torch-Pruning (MIT, https://github.com/VainF/Torch-Pruning) is a benchmark-only extra
(``pip install -c constraints.txt -e ".[bench]"``); nothing of it is vendored here. Its own timm
example needs a patched ``Attention.forward`` (timm 1.0.31's forward reads ``head_dim`` and
``attn_dim``, and its fused path would use ``1/sqrt(new head_dim)`` instead of the dense scale).
Instead, after Torch-Pruning has sliced the weights, each timm ``Attention`` is replaced by this
project's ``PrunedAttention`` holding those sliced weights, with equal q/k and v widths and the
dense model's scale. Both models then run the same attention code, so a speed comparison compares
architectures, not forward implementations. Torch-Pruning removes the same channel positions in
every head (head-dim pruning); the number of heads is kept.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention
from torch import nn

from nas_headprune.evaluator.measure import measure_macs
from nas_headprune.spaces.timm_vit import PrunedAttention

IMPORTANCES = ("l2", "taylor")


def _importance(name: str) -> Any:
    import torch_pruning as tp

    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise ValueError(f"unknown importance {name!r}; choose one of {IMPORTANCES}")


def _swap_attention(model: nn.Module) -> None:
    """Replace every (sliced) timm ``Attention`` by a ``PrunedAttention`` with the same weights."""
    for name, module in list(model.named_modules()):
        if type(module) is not Attention:
            continue
        qkv, proj = module.qkv, module.proj
        assert isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
        heads = int(module.num_heads)
        width = qkv.out_features // (3 * heads)
        new = PrunedAttention(
            dim=qkv.in_features,
            num_heads=heads,
            head_dim_qk=width,
            head_dim_v=width,
            scale=float(module.scale),  # the dense model's scale, as the masked model has it
            qkv_bias=qkv.bias is not None,
            proj_bias=proj.bias is not None,
            out_dim=proj.out_features,
            fused_attn=bool(module.fused_attn),
        )
        new.qkv, new.proj = qkv, proj
        new.train(module.training)
        model.set_submodule(name, new)


def prune_at_ratio(
    model: nn.Module,
    input_size: tuple[int, ...],
    ratio: float,
    importance: str,
    calib: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
) -> nn.Module:
    """A pruned copy of ``model``: Torch-Pruning's global head-dim pruning at ``pruning_ratio=ratio``.

    ``calib`` batches give the gradients that Taylor importance needs (cross entropy on the labels).
    """
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    example = torch.zeros(1, *input_size)
    heads = {m.qkv: int(m.num_heads) for m in pruned.modules() if type(m) is Attention}
    pruner = tp.pruner.MetaPruner(
        pruned,
        example,
        importance=_importance(importance),
        global_pruning=True,
        pruning_ratio=ratio,
        ignored_layers=[pruned.get_classifier()],
        num_heads=heads,
        prune_head_dims=True,
        prune_num_heads=False,
    )
    if importance == "taylor":
        pruned.zero_grad()
        for x, y in calib:
            F.cross_entropy(pruned(x), y).backward()
    pruner.step()
    pruned.zero_grad(set_to_none=True)
    _swap_attention(pruned)
    return pruned


def prune_to_macs(
    model: nn.Module,
    input_size: tuple[int, ...],
    target_macs: float,
    importance: str,
    calib: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    steps: int = 10,
) -> tuple[nn.Module, float]:
    """The largest model Torch-Pruning gives at or below ``target_macs``: bisection on the pruning
    ratio (``steps`` halvings). Returns the model and its ratio."""
    lo, hi = 0.0, 0.95
    best: tuple[nn.Module, float] | None = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        candidate = prune_at_ratio(model, input_size, mid, importance, calib)
        if measure_macs(candidate, input_size) <= target_macs:
            best, hi = (candidate, mid), mid
        else:
            lo = mid
    if best is None:
        best = (prune_at_ratio(model, input_size, hi, importance, calib), hi)
    return best
