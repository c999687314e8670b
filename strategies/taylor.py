"""``taylor``: first-order Taylor importance, ``|w * dL/dw|`` summed over a channel's coupled
weights and over the calibration batches (METHOD.md section 5)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field

from nas_headprune.errors import NonFiniteLossError
from nas_headprune.scoring import reduce_coupled
from nas_headprune.strategy import ScoringConfig, ScoringStrategy, SearchContext


class TaylorConfig(ScoringConfig):
    batches: int | None = Field(None, ge=1, description="calibration batches to use (default: all)")


class Taylor(ScoringStrategy[TaylorConfig]):
    summary = "first-order Taylor |w * grad| on calibration batches"
    Config = TaylorConfig

    def score(self, ctx: SearchContext) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(ctx.model).to(ctx.device).eval()  # never touch the caller's model
        params = dict(model.named_parameters())
        graph = ctx.space.coupling_graph()
        wanted = {a["param"] for _, a in graph.nodes(data=True) if a["kind"] == "slot"}
        acc = {name: torch.zeros_like(params[name], dtype=torch.float64) for name in wanted}
        cfg = self.config
        # under torchrun each rank scores its share of the batches and the sums are added up
        batches = ctx.shard(ctx.calib[: cfg.batches] if cfg.batches else ctx.calib)
        losses: list[torch.Tensor] = []
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x.to(ctx.device)), y.to(ctx.device))
            loss.backward()
            losses.append(loss.detach())
            with torch.no_grad():
                for name in wanted:
                    p = params[name]
                    if p.grad is not None:
                        acc[name] += (p.detach() * p.grad).abs().double()
        _check_finite(losses, ctx)
        ctx.all_reduce_sum(acc)
        return reduce_coupled(ctx.space, acc, lambda t: t)


def _check_finite(losses: list[torch.Tensor], ctx: SearchContext) -> None:
    """Raise :class:`NonFiniteLossError` when a calibration batch's loss is NaN or infinite: its
    gradients would turn every score into NaN. One host sync for all batches, after the loop; under
    torchrun every rank raises when any rank saw such a batch."""
    values = torch.stack(losses).cpu() if losses else torch.zeros(0)  # (batches,)
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if ctx.any_rank(bool(bad)):
        where = (
            f"the loss of calibration batch {bad[0]} is {float(values[bad[0]])} "
            f"({len(bad)} of {len(losses)} batches non-finite)"
            if bad
            else "a calibration batch on another rank had a non-finite loss"
        )
        raise NonFiniteLossError(
            f"taylor: {where}, so the Taylor scores would be NaN; "
            "check the model (model.checkpoint) and the calibration data for NaN or inf values"
        )
