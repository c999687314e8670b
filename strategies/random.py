"""``random``: random channel scores (seeded), the same allocation as the other baselines."""

from __future__ import annotations

import torch

from nas_headprune.strategy import ScoringConfig, ScoringStrategy, SearchContext


class RandomScores(ScoringStrategy[ScoringConfig]):
    summary = "uniformly random channel scores (seeded); the floor every method must beat"

    def score(self, ctx: SearchContext) -> dict[str, torch.Tensor]:
        gen = ctx.torch_generator("random-scores")
        out = {}
        for label in ctx.space.dims:
            out[label] = torch.rand(ctx.space.shape(label), generator=gen, dtype=torch.float64)
        return out
