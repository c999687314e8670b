"""The search loop: indicators trained with the weights under the MACs penalty (METHOD.md 3)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from nas_headprune.allocate import check_reachable
from nas_headprune.errors import (
    ConfigError,
    NonFiniteLossError,
    StrategyError,
)
from nas_headprune.evaluator.cost import analytic_cost
from nas_headprune.evaluator.losses import kl_to_teacher
from nas_headprune.space import (
    HEADS,
    QUERY_SCALE,
    HeadSpace,
    MaskSet,
)
from nas_headprune.strategy import (
    SearchContext,
    SearchResult,
    Strategy,
)

from .config import (
    SimilarityIndicatorConfig,
    _indicator_lr,
    _lam,
)
from .masks import (
    _logits,
    _search_macs,
    allowed_widths,
    dimension_masks,
    fit_budget,
    nearest_width,
    padded_width,
)
from .run import SearchRun, save_run, setup_run
from .state import (
    _same_state_on_every_rank,
)

log = logging.getLogger(__name__)


# =========================================================================== strategy


def _always_balanced(cfg: SimilarityIndicatorConfig, space: HeadSpace, label: str) -> bool:
    """Whether a dimension's mask keeps the same count in every head: with ``balance``, and always
    for an MLP (one group of units) and a head count (one group of heads, at least one kept)."""
    return cfg.balance or space.layer_of(label).kind == "mlp" or space.dims[label].kind == HEADS


class SimilarityIndicator(Strategy[SimilarityIndicatorConfig]):
    """Learnable channel indicators with similarity weights, head-balanced masks and reweight
    scales, trained jointly with the weights under a differentiable MACs penalty."""

    summary = (
        "learned channel indicators x similarity weights, head-balanced every step, reweight scales, "
        "MACs penalty (METHOD.md 3)"
    )
    Config = SimilarityIndicatorConfig
    reports_steps = True  # ctx.step_done(step, hard masks) after every step and its checkpoint
    head_pruning = True  # with strategy_options.head_indicator: a learned indicator per head
    head_pruning_option = "head_indicator"

    def planned_weight_steps(self) -> int:
        """Every search step updates the model's weights unless they are frozen."""
        cfg = self.config
        return cfg.steps if cfg.train_weights and cfg.lr_weights > 0 else 0

    # -------------------------------------------------------------------- search
    def search(self, ctx: SearchContext) -> SearchResult:
        """Search on a copy of ``ctx.model``; resumes from ``ctx.work_dir`` when it holds this search."""
        cfg = self.config
        if ctx.space.has_heads and not self.searches_heads():
            raise ConfigError(
                "similarity_indicator searches whole heads (space.prune_heads: true) only with its head "
                "indicator: set strategy_options.head_indicator: true, or space.prune_heads: false"
            )
        if ctx.space.has_drops:
            raise ConfigError(
                "similarity_indicator cannot drop whole sublayers (space.drop_sublayers: true); use a "
                "scoring strategy, e.g. magnitude, taylor or random, or space.drop_sublayers: false"
            )
        space = cfg.stepped(ctx.space, ctx.device)
        check_reachable(space, ctx.target_macs)
        dev = torch.device(ctx.device)
        forked = (
            [dev.index if dev.index is not None else torch.cuda.current_device()]
            if dev.type == "cuda"
            else []
        )
        with torch.random.fork_rng(devices=forked):
            run = setup_run(ctx, space, cfg)
            try:
                with space.apply_masks(run.model, MaskSet()) as handle:
                    self._train(run, handle.masks)
            finally:
                run.batches.close()
            save_run(run)  # the finished state: trained weights; a rerun only re-finalises
            return self._finish(run)

    def _train(self, run: SearchRun, masks: MaskSet) -> None:
        """The search loop. Nothing in a step waits for the device: the loss, task loss and MACs
        ratio stay on it until :meth:`_flush` reads them, every ``log_every = max(1, steps // 10)``
        steps, before every checkpoint and after the last step."""
        from nas_headprune.progress import stderr_progress

        cfg, space, history = run.cfg, run.space, run.history
        dims = space.dims
        balanced = {label: _always_balanced(cfg, space, label) for label in dims}
        allowed = {label: allowed_widths(d, run.device) for label, d in dims.items()}
        trainable = [p for group in run.opt.param_groups for p in group["params"]]
        log_every = max(1, cfg.steps // 10)
        dtype = run.amp_dtype
        non_blocking = run.device.type == "cuda"
        with stderr_progress(enabled=run.ctx.progress, transient=True) as bar:
            task_id = bar.add_task("similarity_indicator search", total=cfg.steps, completed=run.step)
            while run.step < cfg.steps:
                x, y = (t.to(run.device, non_blocking=non_blocking) for t in run.batches.next()[:2])
                hard: dict[str, Tensor] = {}
                widths: dict[str, Tensor] = {}
                masks.clear()
                for label, score in run.scores().items():
                    hard[label], ste, widths[label] = dimension_masks(
                        score, dims[label], cfg.tau, balanced[label], allowed[label]
                    )
                    gamma = run.gammas.get(label)
                    if gamma is not None and label.endswith(":v"):
                        ste = ste * gamma  # value scales ride on the value mask
                    elif gamma is not None:
                        masks[label + QUERY_SCALE] = gamma  # query scales: queries only
                    masks[label] = ste
                autocast = (
                    torch.autocast(device_type=run.device.type, dtype=dtype)
                    if dtype is not None
                    else nullcontext()
                )
                with autocast:
                    logits = _logits(run.model(x)).float()  # (B, classes); a no-op in float32
                    teacher = None
                    if run.teacher is not None:
                        with torch.no_grad():
                            teacher = _logits(run.teacher(x)).float()
                task = F.cross_entropy(logits, y)
                loss = task
                if teacher is not None:
                    loss = loss + kl_to_teacher(logits, teacher)
                ratio = _search_macs(space, widths) / run.target  # differentiable in the scores
                excess = ratio - 1.0
                penalty = torch.relu(excess).square() if cfg.penalty == "above" else excess.square()
                loss = loss + _lam(cfg, run.step) * penalty
                run.opt.zero_grad(set_to_none=True)
                (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
                run.comm.average_grads_(trainable)  # under torchrun: the mean gradient of all ranks
                if run.scaler is not None:
                    run.scaler.step(run.opt)
                    run.scaler.update()
                else:
                    run.opt.step()
                if cfg.lr_schedule != "constant":  # the next step's rate: a function of the step alone
                    run.opt.param_groups[0]["lr"] = _indicator_lr(cfg, run.step + 1)

                run.step += 1
                run.pending.add(loss, task, ratio)
                checkpoint = bool(cfg.checkpoint_every) and run.step % cfg.checkpoint_every == 0
                logged = run.step % log_every == 0
                if checkpoint or logged or run.step == cfg.steps:
                    self._flush(run)  # raises before a checkpoint of a non-finite step is written
                if checkpoint:
                    save_run(run)
                if logged and run.ctx.rank == 0:
                    log.info(
                        "step %d/%d: loss %.4f (task %.4f), MACs %.3f of the target",
                        run.step,
                        cfg.steps,
                        history.loss[-1],
                        history.task[-1],
                        history.ratio[-1],
                    )
                bar.update(task_id, completed=run.step)
                run.ctx.step_done(run.step, {k: v.detach() for k, v in hard.items()})

    def _flush(self, run: SearchRun) -> None:
        """Read the pending steps' values (one host sync), averaged over the ranks under torchrun,
        into the history. A NaN or infinite loss on any rank makes the mean non-finite on every rank,
        so all of them raise :class:`NonFiniteLossError` here, together, naming the first such step."""
        pending = len(run.pending.loss)
        if not pending:
            return
        first = run.step - pending + 1
        values = run.pending.take()  # (3, n): loss, task, ratio
        if run.comm.active:
            run.comm.sum_([values[:2]])  # the ratio is the same on every rank
            values[:2] /= run.comm.world
        loss, task, ratio = values.tolist()
        cfg = run.cfg
        for i, value in enumerate(loss):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"similarity_indicator: the search loss is {value} at step {first + i} of "
                    f"{cfg.steps} (task loss {task[i]}); the search stops without saving that step or "
                    f"any later one. Lower strategy_options.lr_weights (now {cfg.lr_weights:g}) or "
                    f"strategy_options.lr_indicator (now {cfg.lr_indicator:g}), or check the model "
                    "and data for NaN or inf values"
                )
        if run.comm.mismatch is not None and bool(run.comm.mismatch):
            raise StrategyError(
                "similarity_indicator: the ranks' backward passes reached different parameters (the "
                "model took another path on some rank), so their copies would drift apart; the search "
                "stops without saving"
            )
        run.history.extend(first, loss, task, ratio)

    def _finish(self, run: SearchRun) -> SearchResult:
        cfg, ctx = run.cfg, run.ctx
        scores = {k: v.detach().float().cpu() for k, v in run.scores().items()}
        scales = {k: v.detach().float().cpu().clone() for k, v in run.gammas.items()} or None
        weights = None
        if cfg.train_weights:
            weights = {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()}
        info: dict[str, Any] = {
            "similarity": cfg.similarity,
            "combine": cfg.combine,
            "alpha": cfg.alpha,
            "balance": cfg.balance,
            "reweight": cfg.reweight,
            "init": cfg.init,
            "head_indicator": cfg.head_indicator,
            "steps": cfg.steps,
            "resumed_from_step": run.resumed_from,
        }
        if run.comm.active:
            _same_state_on_every_rank(scores, scales, weights)
            # rank 0 picks the architecture (and any fix-up) and hands it to the others
            decided = ctx.broadcast(self._decide(run, scores) if ctx.rank == 0 else None)
            info.update(world_size=ctx.world_size)
        else:
            decided = self._decide(run, scores)
        if run.resumed_world is not None:
            info.update(resumed_from_world_size=run.resumed_world)
        if run.amp_dtype is not None:
            info.update(amp=str(run.amp_dtype).removeprefix("torch."))
        selection, decision, macs = decided
        info.update(decision)
        info.update(
            first_step_within_budget=run.history.first_within,
            loss=run.history.summary(),
            scales_left_out=run.unfoldable if cfg.reweight else [],
            init_layers=run.init_layers,
            init_skipped=run.init_skipped,
            similarity_skipped=run.similarity_skipped,
            trained_weights=bool(cfg.train_weights),
        )
        return SearchResult(
            selection,
            info=info,
            scales=scales,
            reported_macs=None if cfg.balance else macs,
            weights=weights,
            weight_steps=self.planned_weight_steps(),
        )

    @staticmethod
    def _decide(run: SearchRun, scores: Mapping[str, Tensor]) -> tuple[Any, dict[str, Any], float]:
        """The final selection from the final scores: the architecture the next forward would use,
        padded without balance, narrowed by :func:`fit_budget` when above the budget. Returns the
        selection, its ``info`` entries and its MACs."""
        cfg, space, ctx = run.cfg, run.space, run.ctx
        decision: dict[str, Any] = {}
        # the architecture the next forward would use: the same rule as dimension_masks
        arch: dict[str, int] = {}
        raw_widths: dict[str, float] = {}
        for label, d in space.dims.items():
            counts = (scores[label].reshape(d.heads, d.max_width) > cfg.tau).sum(1)  # (H,)
            raw_widths[label] = float(counts.sum()) / d.heads
            if _always_balanced(cfg, space, label):
                arch[label] = nearest_width(raw_widths[label], d)
            else:  # pad every head to the widest one, each with its next-best channels
                arch[label] = padded_width(int(counts.max()), d)
        searched_macs = float(analytic_cost(space, arch).macs)
        if not cfg.balance:
            raw_macs = float(analytic_cost(space, raw_widths).macs)
            decision.update(padded=True, raw_macs=raw_macs, padded_macs_before_fixup=searched_macs)
            log.info(
                "unbalanced search: the raw masks cost %.4g MACs, padded to equal heads %.4g",
                raw_macs,
                searched_macs,
            )
        widths, removed = fit_budget(space, scores, arch, run.target)
        if removed:
            log.warning(
                "the searched architecture costs %.4g MACs, above the target of %.4g: removed %d width "
                "step(s) head-balanced, lowest score per MAC first",
                searched_macs,
                run.target,
                len(removed),
            )
        selection = space.selection_from_scores(scores, widths)
        macs = float(analytic_cost(space, selection.architecture()).macs)
        dense = float(ctx.dense_macs)
        decision.update(
            macs=macs,
            macs_ratio=macs / dense,
            searched_macs_ratio=searched_macs / dense,
            under_budget=(run.target - macs) / dense,
            fixup=bool(removed),
            fixup_steps=removed,
        )
        return selection, decision, macs
