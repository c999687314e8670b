"""``magnitude``: channels ranked by the norm of their weights (METHOD.md section 5).

A query/key channel's weights are its q and k rows of ``qkv`` (and biases); a value channel's are
its v row and its ``proj`` column; an MLP unit's are its ``fc1`` row and ``fc2`` column.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from nas_headprune.scoring import parameters_by_name, reduce_coupled
from nas_headprune.strategy import ScoringConfig, ScoringStrategy, SearchContext


class MagnitudeConfig(ScoringConfig):
    norm: Literal["l1", "l2"] = Field("l1", description="L1 or L2 norm of each channel's weights")


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
