"""``random``: random channel scores (seeded), the same allocation as the other baselines."""

from __future__ import annotations

import torch

from nas_headprune.strategy import ScoringConfig, ScoringStrategy, SearchContext


class RandomScores(ScoringStrategy[ScoringConfig]):
    summary = "uniformly random channel scores (seeded); the floor every method must beat"

    def score(self, ctx: SearchContext) -> dict[str, torch.Tensor]:
        gen = ctx.torch_generator("random-scores")
        out = {}
        for label, d in ctx.space.dims.items():
            shape = (d.max_width,) if ctx.space.layer_of(label).kind == "mlp" else (d.heads, d.max_width)
            out[label] = torch.rand(shape, generator=gen, dtype=torch.float64)
        return out
