"""Helpers for scoring strategies: per-channel reductions over the coupled parameter slices."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from nas_headprune.space import HeadSpace, slot_positions


def channel_index(
    heads: int, width: int, offset: int, head_stride: int, channel_stride: int = 1
) -> torch.Tensor:
    """``(H, d)`` positions of every channel along a slot's axis (:func:`~nas_headprune.space.slot_positions`)."""
    every = torch.arange(width).expand(heads, width)  # (H, d)
    return slot_positions(every, offset, head_stride, channel_stride)


def reduce_coupled(
    space: HeadSpace,
    tensors: Mapping[str, torch.Tensor],
    fn: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """For every dimension, ``sum over coupled slots of fn(slice).sum()`` per channel (per unit:
    a unit of several rows, one slot each, such as a rotary pair, sums over its rows).

    ``tensors`` maps full parameter names to tensors (the weights, or e.g. ``|w * grad|``);
    ``fn`` is applied elementwise before summing over everything but the channel axis. Returns
    ``(H, d)`` per attention dimension and ``(m,)`` per MLP dimension.
    """
    graph = space.coupling_graph()
    out: dict[str, torch.Tensor] = {}
    for label, d in space.dims.items():
        if label not in graph:  # a head count owns no parameter slice
            continue
        total = torch.zeros(d.heads, d.max_width, dtype=torch.float64)
        for node in graph.successors(label):
            slot = graph.nodes[node]
            t = tensors[slot["param"]].detach()
            per_pos = fn(t.movedim(slot["axis"], 0).reshape(t.shape[slot["axis"]], -1).double()).sum(1)
            idx = channel_index(
                d.heads, d.max_width, slot["offset"], slot["head_stride"], slot["channel_stride"]
            )
            total += per_pos.cpu()[idx]
        out[label] = total if space.per_head(label) else total[0]
    return out


def parameters_by_name(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())
