"""``taylor``: first-order Taylor importance, ``|w * dL/dw|`` summed over a channel's coupled
weights and over the calibration batches (METHOD.md section 5)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field

from nas_headprune.scoring import reduce_coupled
from nas_headprune.strategy import ScoringConfig, ScoringStrategy, SearchContext


class TaylorConfig(ScoringConfig):
    batches: int | None = Field(None, ge=1, description="calibration batches to use (default: all)")


class Taylor(ScoringStrategy):
    summary = "first-order Taylor |w * grad| on calibration batches"
    Config = TaylorConfig

    def score(self, ctx: SearchContext) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(ctx.model).to(ctx.device).eval()  # never touch the caller's model
        params = dict(model.named_parameters())
        graph = ctx.space.coupling_graph()
        wanted = {a["param"] for _, a in graph.nodes(data=True) if a["kind"] == "slot"}
        acc = {name: torch.zeros_like(params[name], dtype=torch.float64) for name in wanted}
        cfg = self.config
        assert isinstance(cfg, TaylorConfig)  # Strategy.__init__ validated it against Config
        batches = ctx.calib[: cfg.batches] if cfg.batches else ctx.calib
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x.to(ctx.device)), y.to(ctx.device))
            loss.backward()
            with torch.no_grad():
                for name in wanted:
                    p = params[name]
                    if p.grad is not None:
                        acc[name] += (p.detach() * p.grad).abs().double()
        return reduce_coupled(ctx.space, acc, lambda t: t)
