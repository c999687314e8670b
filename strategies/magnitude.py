"""``magnitude``: channels ranked by the norm of their weights (METHOD.md section 5).

A query/key channel's weights are its q and k rows of ``qkv`` (and biases); a value channel's are
its v row and its ``proj`` column; an MLP unit's are its ``fc1`` row and ``fc2`` column.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from nas_headprune.scoring import parameters_by_name, reduce_coupled
from nas_headprune.strategy import ScoringConfig, ScoringStrategy, SearchContext


class MagnitudeConfig(ScoringConfig):
    """Magnitude's widths default to the fast ones (docs/speed.md): equal query/key and value widths
    in multiples of 8 on every device; on the embedded ViT they were as accurate on the validation
    split as the free widths (``speed_defaults`` ablation) and faster."""

    cpu_width_step: ClassVar[int] = 8

    norm: Literal["l1", "l2"] = Field("l1", description="L1 or L2 norm of each channel's weights")
    width_step: int | None = Field(
        None,
        ge=1,
        description="per-head widths are multiples of this; default (null): 8 on every device, for "
        "dimensions of at least 16 units (narrower ones step by 1)",
    )
    tie_qk_v: bool = Field(
        True,
        description="keep equal query/key and value widths in every attention layer, so the fused "
        "attention kernel runs without padding (docs/speed.md); false lets them differ",
    )


class Magnitude(ScoringStrategy[MagnitudeConfig]):
    summary = "L1/L2 norm of each channel's coupled weights, head-balanced top-k per head"
    Config = MagnitudeConfig

    def score(self, ctx: SearchContext) -> dict[str, torch.Tensor]:
        cfg = self.config
        fn = torch.abs if cfg.norm == "l1" else torch.square
        sums = reduce_coupled(ctx.space, parameters_by_name(ctx.model), fn)
        if cfg.norm == "l2":
            return {k: v.sqrt() for k, v in sums.items()}
        return sums
