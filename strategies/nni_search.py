"""``evolution`` and ``nni_random``: multi-trial architecture search driven by NNI 3.0's engine.

The search space is the run's head-balanced space exported to NNI
(:func:`~nas_headprune.strategies.nni_space.to_nni`): one categorical per dimension label, and the
MACs budget as an NNI constraint, so NNI's samplers reject over-budget candidates themselves (they
are never evaluated nor returned). By default the categoricals' sampling weights are tilted so that
random draws centre on the budget (``prior: budget``); ``prior: uniform`` keeps NNI's uniform draws.

NNI's own strategy (``nni.nas.strategy.RegularizedEvolution`` or ``nni.nas.strategy.Random``) runs
in this process on NNI's ``SequentialExecutionEngine``, over an ``nni.nas.space.RawFormatModelSpace``
whose evaluator is an ``nni.nas.evaluator.FunctionalEvaluator``. Each candidate (a width per
dimension) is turned into a model the same way for every trial:

1. channels are ranked once, before the search, by a scoring strategy (``ranking``, magnitude by
   default, with ``ranking_options``); each head keeps its top channels at the candidate's width;
2. the selection is materialised (surgery) and refitted with the shared reweight step on the first
   calibration batches;
3. the cheap proxy, the cross-entropy (``proxy: loss``) or top-1 (``proxy: accuracy``) on the last
   ``proxy_batches`` calibration batches, which ranking and reweight never see, is reported to NNI
   as the trial's metric (NNI maximises it; a loss is reported negated).

The engine stops after ``trials`` candidates; the best one (first on ties) is the result. The search
is seeded from ``ctx.seed``: the same seed gives the same candidates, metrics and result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Iterator
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field, model_validator

from nas_headprune.errors import ConfigError, UnknownNameError, UsageError
from nas_headprune.evaluator.reweight import ReweightConfig
from nas_headprune.strategy import (
    ScoringStrategy,
    SearchContext,
    SearchResult,
    Strategy,
    StrategyConfig,
    WidthConfig,
)

log = logging.getLogger(__name__)


class NniSearchConfig(WidthConfig):
    """Options shared by the NNI multi-trial strategies (these are all of ``nni_random``'s)."""

    trials: int = Field(
        30, ge=1, description="candidates evaluated (the NNI engine's model count); about 1 s each here"
    )
    ranking: str = Field(
        "magnitude",
        description="scoring strategy that ranks the channels kept inside each candidate's widths",
    )
    ranking_options: dict[str, Any] = Field(
        default_factory=dict, description="options of the ranking strategy (its own Config)"
    )
    proxy: Literal["loss", "accuracy"] = Field(
        "loss", description="candidate score on the held-out batches: cross-entropy or top-1"
    )
    proxy_batches: int = Field(
        1, ge=1, description="calibration batches held out (the last ones) to score candidates"
    )
    fit_batches: int | None = Field(
        None,
        ge=1,
        description="calibration batches (the first ones) for ranking and reweight; default: all "
        "that are not held out",
    )
    reweight: ReweightConfig = Field(
        default_factory=ReweightConfig, description="reweight step applied to every candidate"
    )
    prior: Literal["budget", "uniform"] = Field(
        "budget",
        description="sampling weights of the widths: centred on the MACs budget, or uniform",
    )


class EvolutionConfig(NniSearchConfig):
    """Options of ``evolution`` (NNI's regularized evolution)."""

    population_size: int = Field(10, ge=1, description="individuals kept alive (the first ones are random)")
    sample_size: int = Field(3, ge=1, description="tournament size when picking a parent")
    mutation_prob: float = Field(0.1, gt=0, le=1, description="chance that each dimension is resampled")
    crossover: bool = Field(False, description="mix two tournament winners before mutating")

    @model_validator(mode="after")
    def _tournament_fits(self) -> EvolutionConfig:
        if self.sample_size > self.population_size:
            raise ValueError(
                f"sample_size ({self.sample_size}) must be at most population_size ({self.population_size})"
            )
        return self


@dataclasses.dataclass
class _Trial:
    index: int
    arch: dict[str, int]
    macs: float
    loss: float
    top1: float
    metric: float


NniConfigT = TypeVar("NniConfigT", bound=NniSearchConfig)


class _NniSearch(Strategy[NniConfigT]):
    """The search loop shared by both strategies; subclasses name NNI's strategy."""

    Config: ClassVar[type[StrategyConfig]] = NniSearchConfig
    name: ClassVar[str] = ""

    def __init__(self, config: StrategyConfig | dict[str, Any] | None = None) -> None:
        super().__init__(config)
        from nas_headprune.strategies.nni_space import require_nni

        require_nni(nas=True)
        cfg = self.config
        self.ranking = _ranking_strategy(cfg.ranking, cfg.ranking_options)

    def _nni_strategy(self, seed: int) -> Any:
        raise NotImplementedError

    def search(self, ctx: SearchContext) -> SearchResult:
        from nas_headprune.allocate import BudgetError
        from nas_headprune.evaluator import metrics
        from nas_headprune.evaluator.cost import analytic_cost
        from nas_headprune.evaluator.materialize import materialize
        from nas_headprune.evaluator.reweight import reweight
        from nas_headprune.progress import stderr_progress
        from nas_headprune.strategies.nni_space import budget_constraint, from_nni, require_nni, to_nni

        cfg = self.config
        if ctx.space.has_drops:
            raise ConfigError(
                f"{self.name} cannot drop whole sublayers (space.drop_sublayers: true); use a scoring "
                "strategy, e.g. magnitude, taylor or random, or space.drop_sublayers: false"
            )
        nni = require_nni(nas=True)
        from nni.nas.evaluator import FunctionalEvaluator
        from nni.nas.execution import SequentialExecutionEngine
        from nni.nas.space import RawFormatModelSpace

        fit, held = _split_calibration(self.name, ctx, cfg)
        space = cfg.stepped(ctx.space, ctx.device)
        exported = to_nni(space, ctx.target_macs, prior=cfg.prior)
        rejected: set[tuple] = set()
        budget_constraint(exported).observer = lambda sample, macs: rejected.add(
            tuple(sorted((k, v) for k, v in sample.items() if k in space.dims))
        )
        scores = self.ranking.score(dataclasses.replace(ctx, calib=fit))
        # under torchrun every rank runs the same seeded NNI engine; each scores its share of the
        # held-out batches and metrics.evaluate sums the counts over the ranks, so every rank sees
        # the same proxy values and takes the same decisions
        dense_proxy = metrics.evaluate(ctx.model, ctx.shard(held), device=ctx.device)

        trials: list[_Trial] = []

        def evaluate(candidate: Any) -> None:
            arch = candidate.arch
            selection = space.selection_from_scores(scores, arch)
            pruned = materialize(ctx.model, ctx.space, selection)
            reweight(ctx.model, pruned, ctx.space, fit, cfg.reweight, device=ctx.device)
            result = metrics.evaluate(pruned, ctx.shard(held), device=ctx.device)
            loss, top1 = float(result["loss"]), float(result["top1"])
            metric = -loss if cfg.proxy == "loss" else top1
            macs = float(analytic_cost(space, arch).macs)
            trials.append(_Trial(len(trials), arch.to_dict(), macs, loss, top1, metric))
            bar.advance(task)
            nni.report_final_result(metric)

        seed = ctx.rng(f"nni:{self.name}").getrandbits(31)
        model_space = RawFormatModelSpace(
            _candidate_space_class()(space, exported, from_nni), FunctionalEvaluator(evaluate)
        )
        engine = SequentialExecutionEngine(max_model_count=cfg.trials)
        nni_strategy = self._nni_strategy(seed)
        with (
            stderr_progress(enabled=ctx.progress, transient=True) as bar,
            _quiet_trials(),
        ):
            task = bar.add_task(f"{self.name} search", total=cfg.trials)
            nni_strategy(model_space, engine)
        if not trials:
            raise BudgetError(
                f"{self.name}: NNI drew no architecture within the budget of {ctx.target_macs:.6g} MACs "
                f"({ctx.budget} of dense) in its {len(rejected)} attempts; raise the budget or use "
                f"strategy_options.prior=budget"
            )
        best = max(trials, key=lambda t: t.metric)  # first of the best on ties
        arch = space.validate(best.arch)
        selection = space.selection_from_scores(scores, arch)
        dense = float(ctx.dense_macs)

        def proxy_record(loss: float, top1: float) -> dict[str, float]:
            return {"loss": round(loss, 6), "top1": round(top1, 4)}

        info = {
            "engine": f"{type(engine).__module__}.{type(engine).__name__}",
            "nni_strategy": repr(nni_strategy),
            "nni_version": getattr(nni, "__version__", "unknown"),
            "ranking": cfg.ranking,
            "proxy": cfg.proxy,
            "prior": cfg.prior,
            "fit_batches": len(fit),
            "proxy_batches": len(held),
            "trials_requested": cfg.trials,
            "trials_run": len(trials),
            "rejected_over_budget": len(rejected),
            "best_trial": best.index,
            "best_proxy": proxy_record(best.loss, best.top1),
            "best_macs_ratio": round(best.macs / dense, 6),
            "dense_proxy": proxy_record(float(dense_proxy["loss"]), float(dense_proxy["top1"])),
            "history": [
                {"trial": t.index, **proxy_record(t.loss, t.top1), "macs_ratio": round(t.macs / dense, 6)}
                for t in trials
            ],
        }
        log.info(
            "%s: %d trials, best #%d: loss %.4f, top-1 %.2f%% on %d held-out batch(es), %.3f of dense MACs",
            self.name,
            len(trials),
            best.index,
            best.loss,
            best.top1,
            len(held),
            best.macs / dense,
        )
        return SearchResult(selection, info=info)


class Evolution(_NniSearch[EvolutionConfig]):
    summary = "NNI regularized evolution over per-layer widths, candidates ranked by a scoring strategy"
    Config = EvolutionConfig
    name = "evolution"

    def _nni_strategy(self, seed: int) -> Any:
        from nni.nas.strategy import RegularizedEvolution

        cfg = self.config
        return RegularizedEvolution(
            population_size=cfg.population_size,
            sample_size=cfg.sample_size,
            mutation_prob=cfg.mutation_prob,
            crossover=cfg.crossover,
            dedup=True,
            seed=seed,
        )


class NniRandom(_NniSearch[NniSearchConfig]):
    summary = "NNI random search over per-layer widths within the budget; best proxy wins"
    Config = NniSearchConfig
    name = "nni_random"

    def _nni_strategy(self, seed: int) -> Any:
        from nni.nas.strategy import Random

        return Random(dedup=True, seed=seed)


# ---------------------------------------------------------------------------------- helpers
def _ranking_strategy(name: str, options: dict[str, Any]) -> ScoringStrategy:
    """The scoring strategy ``name`` with ``options``; config errors name ``strategy_options.ranking``."""
    from nas_headprune.registry import make_strategy, strategy_class

    try:
        cls = strategy_class(name)
    except UnknownNameError:
        cls = None
    if cls is None or not issubclass(cls, ScoringStrategy):
        what = "is not a known strategy" if cls is None else "does not score channels"
        raise ConfigError(
            f"strategy_options.ranking: {name!r} {what}; choose a scoring strategy: "
            f"{', '.join(_scoring_strategy_names()) or '(none installed)'}"
        )
    ranking = make_strategy(name, options, prefix="strategy_options.ranking_options")
    assert isinstance(ranking, ScoringStrategy)  # its class was checked above
    return ranking


def _scoring_strategy_names() -> list[str]:
    from nas_headprune.registry import STRATEGY_GROUP, list_plugins, strategy_class

    names = []
    for plugin in list_plugins(STRATEGY_GROUP):
        try:
            cls = strategy_class(plugin.name)
        except Exception as exc:  # a broken plugin must not hide the others
            log.debug("strategy %r failed to load: %s", plugin.name, exc)
            continue
        if issubclass(cls, ScoringStrategy):
            names.append(plugin.name)
    return names


def _split_calibration(name: str, ctx: SearchContext, cfg: NniSearchConfig) -> tuple[list, list]:
    """(batches for ranking and reweight, held-out batches for the proxy)."""
    have = len(ctx.calib)
    if have < cfg.proxy_batches + 1:
        raise UsageError(
            f"{name}: strategy_options.proxy_batches={cfg.proxy_batches} holds out that many "
            f"calibration batches and at least one more is needed for ranking and reweight, but the "
            f"run has {have}; lower proxy_batches or raise data.calib_batches"
        )
    fit = list(ctx.calib[: have - cfg.proxy_batches])
    if cfg.fit_batches is not None:
        fit = fit[: cfg.fit_batches]
    return fit, list(ctx.calib[have - cfg.proxy_batches :])


@contextlib.contextmanager
def _quiet_trials() -> Iterator[None]:
    """Keep the per-trial chatter out of the run's log during a search, warnings and above only.

    NNI logs every sample at INFO to its own stdout handler (added when ``nni`` is imported); its
    records go through the application's logging instead. The reweight step logs a summary at INFO
    each time it runs, which is once per trial here.
    """
    nni_logger = logging.getLogger("nni")
    reweight_logger = logging.getLogger("nas_headprune.evaluator.reweight")
    handlers = list(nni_logger.handlers)
    levels = {nni_logger: nni_logger.level, reweight_logger: reweight_logger.level}
    for handler in handlers:
        nni_logger.removeHandler(handler)
    for logger in levels:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in levels.items():
            logger.setLevel(level)
        for handler in handlers:
            nni_logger.addHandler(handler)


class _Candidate:
    """A frozen sample of the candidate space: what NNI's evaluator receives as the "model"."""

    def __init__(self, arch: Any) -> None:
        self.arch = arch

    def __repr__(self) -> str:
        return f"_Candidate({self.arch.to_dict()})"


@functools.cache
def _candidate_space_class() -> type:
    """An ``nni.nas.space.BaseModelSpace`` over an exported space; freezing a sample gives a
    :class:`_Candidate` holding the checked :class:`~nas_headprune.space.Architecture`. Defined on
    first use so that importing this module does not import NNI."""
    from nni.nas.space import BaseModelSpace

    class CandidateSpace(BaseModelSpace):
        def __init__(self, space: Any, exported: Any, from_nni: Any) -> None:
            self.space = space
            self.exported = exported
            self.from_nni = from_nni

        def leaf_mutables(self, is_leaf: Any) -> Any:
            yield from self.exported.leaf_mutables(is_leaf)

        def check_contains(self, sample: Any) -> Any:
            return self.exported.check_contains(sample)

        def freeze(self, sample: Any) -> _Candidate:
            self.validate(sample)
            return _Candidate(self.from_nni(self.space, {k: sample[k] for k in self.space.dims}))

        def extra_repr(self) -> str:
            return f"{len(self.space.dims)} dimensions"

    return CandidateSpace
