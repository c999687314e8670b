"""What a sublayer dropped whole leaves in a pruned model: :class:`DroppedSublayer`, its constant
output (``space.drop_sublayers``, :meth:`~nas_headprune.space.HeadSpace.with_drops`).

A masked dense layer with every unit masked (an attention layer with 0 heads, an MLP with 0 hidden
units) multiplies zeros into its output projection, so it outputs that projection's bias (zeros
without one) for every token. The pruned model computes the same without the matmuls: this module
returns the bias, expanded (a view, no copy) to the shape the layer's output had. It imports torch,
so ``nas_headprune.space`` does not re-export it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class DroppedSublayer(nn.Module):
    """A constant sublayer: ``value`` (``(out_dim,)``, a trainable parameter; zeros when ``None``)
    for every token of its input, shaped ``(*x.shape[:-1], out_dim)``.

    Extra positional and keyword arguments of the call (an attention mask) are accepted and ignored.
    ``drop`` is the dropout the dense layer applied after its output projection; in training mode it
    applies to the constant as it did to the masked layer's output.
    """

    def __init__(self, out_dim: int, value: torch.Tensor | None, drop: float = 0.0) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.drop = float(drop)
        self.value: nn.Parameter | None
        if value is None:
            self.value = None
        else:
            if tuple(value.shape) != (out_dim,):
                raise ValueError(
                    f"a dropped sublayer's value must have shape ({out_dim},), got {tuple(value.shape)}"
                )
            self.value = nn.Parameter(value.detach().clone())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shape = (*x.shape[:-1], self.out_dim)
        if self.value is None:
            return x.new_zeros(shape)
        out = self.value.to(x.dtype).expand(shape)  # (..., out_dim), a view
        return F.dropout(out, self.drop, self.training) if self.drop > 0 else out

    def extra_repr(self) -> str:
        return f"out_dim={self.out_dim}, bias={self.value is not None}, drop={self.drop}"
