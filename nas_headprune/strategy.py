"""The strategy plugin interface.

Lifecycle of a strategy, as the runner drives it:

1. **Look-up.** The runner finds the class by name in the entry point group
   ``nas_headprune.strategies`` (or as ``package.module:Class``) and validates the user's options
   against the class's nested ``Config`` (a pydantic model with ``extra="forbid"``). A typo is an
   error naming the dotted field before any work starts.
2. **Construction.** ``Strategy(config)``; keep construction cheap, do no work on data here.
3. **Search.** ``search(ctx)`` receives a :class:`SearchContext`: the dense model (read-only: do
   not modify it, work on a copy if you must train), its :class:`~nas_headprune.space.HeadSpace`,
   the MACs budget, calibration batches, an optional training loader, the seed, the device and a
   work folder for your own checkpoints. It returns a :class:`SearchResult` whose selection is
   head-balanced and within budget.
4. **Validation.** The runner re-checks every result (labels, balance, index ranges, MACs within
   budget) and raises :class:`~nas_headprune.errors.StrategyError` naming the strategy otherwise.
5. **Evaluation.** The shared evaluator materialises the selection, reweights, fine-tunes and
   evaluates: that part is the same for every strategy.

Most pruning methods only need to rank channels: subclass :class:`ScoringStrategy` and implement
``score(ctx)``; the shared allocator turns the scores into a head-balanced selection that meets the
budget (uniform ratio across layers, or global allocation by score per MAC).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch
    from torch import nn

    from nas_headprune.evaluator.cost import CostReport
    from nas_headprune.space import HeadSpace, Selection


#: a default width step (one the user did not set) applies to the dimensions that hold at least
#: this many steps; narrower ones step by 1, so that a head of 8 channels under a step of 8 is not
#: kept whole for want of a smaller multiple
DEFAULT_STEP_MIN_STEPS = 2


def resolve_width_step(step: int | None, device: str, cpu_default: int = 1) -> int:
    """A strategy's ``width_step``: as configured, or by default 8 on CUDA (tensor cores run
    matrix products of multiples of 8 fastest) and ``cpu_default`` on every other device."""
    if step is not None:
        return step
    return 8 if str(device).startswith("cuda") else cpu_default


class StrategyConfig(BaseModel):
    """Base of every strategy's ``Config``: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class WidthConfig(StrategyConfig):
    """The widths a strategy may choose: the step and the minimum (for every strategy that builds
    architectures; applied with :meth:`stepped`)."""

    #: the default ``width_step`` off CUDA; a strategy whose widths were chosen for speed raises it
    cpu_width_step: ClassVar[int] = 1

    width_step: int | None = Field(
        None,
        ge=1,
        description="per-head widths are multiples of this; default (null): 8 on CUDA, where tensor "
        "cores want multiples of 8, and 1 elsewhere (a default step skips dimensions narrower than two "
        "steps)",
    )
    min_width: int = Field(1, ge=1, description="smallest per-head width / MLP width kept")

    def stepped(self, space: HeadSpace, device: str) -> HeadSpace:
        """``space`` with this config's widths (:meth:`~nas_headprune.space.HeadSpace.with_step`).
        A step set in the config applies to every dimension; the default one only to dimensions of
        at least :data:`DEFAULT_STEP_MIN_STEPS` steps, the others step by 1."""
        step = resolve_width_step(self.width_step, device, self.cpu_width_step)
        min_steps = 1 if self.width_step is not None else DEFAULT_STEP_MIN_STEPS
        return space.with_step(step, self.min_width, min_steps=min_steps)


class ScoringConfig(WidthConfig):
    """Options of the shared allocator, inherited by every scoring strategy."""

    allocation: Literal["uniform", "global"] = Field(
        "global",
        description="uniform: one keep ratio for every layer; global: remove the channels with the "
        "lowest score per MAC saved, across layers",
    )
    tie_qk_v: bool = Field(
        False,
        description="keep equal query/key and value widths in every attention layer (the allocator "
        "narrows both together), so the fused attention kernel runs without padding (docs/speed.md)",
    )


@dataclass
class SearchContext:
    """Everything a strategy may use. Treat ``model`` as read-only.

    Under ``torchrun`` every rank calls ``search`` with its own context: ``rank`` and
    ``world_size`` tell them apart, ``train_loader`` yields the rank's shard of the training data and
    ``calib`` holds the same calibration batches on every rank. Every rank must return the same
    selection (the runner compares them and raises :class:`~nas_headprune.errors.StrategyError`
    otherwise). A strategy that looks only at the weights, or is deterministic, gets that for free;
    one that wants to share the work uses :meth:`shard` and :meth:`all_reduce_sum`.
    """

    model: nn.Module
    space: HeadSpace
    budget: float
    dense_macs: int
    calib: list[tuple[torch.Tensor, torch.Tensor]]
    seed: int = 0
    device: str = "cpu"
    train_loader: Iterable | None = None
    work_dir: Path | None = None
    progress: bool = False
    #: called after every step of a strategy that searches in steps (``Strategy.reports_steps``),
    #: once the step and its checkpoint are done, with the step number and the step's state
    #: (similarity_indicator: its hard masks); for progress displays, tests and benchmarks
    on_step: Callable[[int, Mapping[str, Any]], None] | None = None
    rank: int = 0
    world_size: int = 1
    #: "macs" (``budget`` is a fraction of ``dense_macs``) or "latency" (a fraction of the dense
    #: model's measured latency; ``latency`` then holds the measured table, a CostModel in ms)
    budget_kind: str = "macs"
    latency: Any = None

    def step_done(self, step: int, state: Mapping[str, Any]) -> None:
        """What a stepping strategy calls after each step: hands the step to :attr:`on_step`."""
        if self.on_step is not None:
            self.on_step(step, state)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's share of ``items`` (every ``world_size``-th one, starting at ``rank``)."""
        return items[self.rank :: self.world_size]

    def all_reduce_sum(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Sum each tensor over the ranks, in place (nothing to do in one process)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for name in sorted(tensors):  # the same order on every rank
            dist.all_reduce(tensors[name], op=dist.ReduceOp.SUM)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank (so all ranks raise together)."""
        if not self.distributed:
            return flag
        import torch
        import torch.distributed as dist

        value = torch.tensor([1.0 if flag else 0.0], device=self._collective_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` as rank ``src`` has it, on every rank (a picklable object)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def _collective_device(self) -> str:
        import torch.distributed as dist

        return self.device if dist.get_backend() == "nccl" else "cpu"

    @property
    def target_macs(self) -> float:
        """The MACs a result may cost: ``budget`` of dense, or no limit under a latency budget."""
        if self.budget_kind == "latency":
            return float(self.dense_macs)
        return self.budget * self.dense_macs

    @property
    def target_latency_ms(self) -> float | None:
        """Under a latency budget, the milliseconds per batch a result may take (else ``None``)."""
        if self.budget_kind != "latency" or self.latency is None:
            return None
        return self.budget * float(self.latency.dense_ms)

    def cost(self, arch: Mapping[str, Any]) -> CostReport:
        from nas_headprune.evaluator.cost import analytic_cost

        return analytic_cost(self.space, arch)

    def rng(self, salt: str = "") -> random.Random:
        return random.Random(f"{self.seed}:{salt}")

    def torch_generator(self, salt: str = "") -> torch.Generator:
        import torch

        return torch.Generator().manual_seed(self.rng(salt).getrandbits(62))


@dataclass
class SearchResult:
    """A head-balanced selection plus whatever the strategy wants recorded (JSON-able ``info``).

    ``scales`` (optional): per dimension label, reweight scales ``(H, d)`` over the dense channels to
    fold into the pruned weights at materialisation (used by similarity_indicator).
    ``reported_macs`` (optional): the MACs the result really costs when it differs from the
    analytic cost of its architecture (e.g. padding of unbalanced heads).
    ``weights`` (optional): a state dict for the dense model that the search trained (strategies
    that learn weights jointly with the architecture); the evaluator materialises a copy of the
    model holding these weights instead of the original ones.
    ``weight_steps``: how many optimizer steps of the search updated the model's weights (0 for a
    strategy that only scores); results report it next to the fine-tune's steps, so strategies can
    be compared at equal training.
    """

    selection: Selection | Mapping[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    scales: dict[str, torch.Tensor] | None = None
    reported_macs: float | None = None
    weights: dict[str, torch.Tensor] | None = None
    weight_steps: int = 0


ConfigT = TypeVar("ConfigT", bound=StrategyConfig)
ScoringConfigT = TypeVar("ScoringConfigT", bound=ScoringConfig)


class Strategy(ABC, Generic[ConfigT]):
    """A pruning search strategy. See the module docstring for the lifecycle.

    Generic in its config: ``class Mine(Strategy[MyConfig])`` with ``Config = MyConfig`` makes
    ``self.config`` a ``MyConfig`` for type checkers (the runtime check is the validation against
    ``Config`` in ``__init__``).
    """

    #: short description shown by ``nas-headprune strategies``
    summary: ClassVar[str] = ""
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    #: the budget kinds the strategy can meet (``budget_kind`` of a run config)
    budget_kinds: ClassVar[tuple[str, ...]] = ("macs",)
    #: whether the strategy can search spaces whose layers may drop whole heads (``space.prune_heads``)
    head_pruning: ClassVar[bool] = False
    #: the boolean option of ``Config`` without which it does not (None: ``head_pruning`` alone decides)
    head_pruning_option: ClassVar[str | None] = None
    #: whether the strategy can search spaces whose layers may be dropped whole
    #: (``space.drop_sublayers``; :meth:`drops_sublayers` adds the config's say)
    sublayer_drops: ClassVar[bool] = False
    #: whether ``search`` calls ``ctx.step_done`` after every step (a search that runs in steps)
    reports_steps: ClassVar[bool] = False

    def __init__(self, config: StrategyConfig | Mapping[str, Any] | None = None) -> None:
        if config is None:
            validated = self.Config()
        elif isinstance(config, self.Config):
            validated = config
        else:
            validated = self.Config.model_validate(dict(config))
        self.config: ConfigT = cast(ConfigT, validated)

    @abstractmethod
    def search(self, ctx: SearchContext) -> SearchResult:
        """Return a head-balanced selection of ``ctx.space`` costing at most ``ctx.target_macs``."""

    def searches_heads(self) -> bool:
        """Whether this strategy, with its config, searches whole heads (``space.prune_heads``)."""
        option = type(self).head_pruning_option
        return type(self).head_pruning and (option is None or bool(getattr(self.config, option)))

    def drops_sublayers(self) -> bool:
        """Whether this strategy, with its config, can drop whole sublayers (``space.drop_sublayers``):
        it must search whole heads too, an attention layer being dropped by keeping 0 heads."""
        return type(self).sublayer_drops and self.searches_heads()

    def planned_weight_steps(self) -> int:
        """How many optimizer steps on the model's weights :meth:`search` will take with this config
        (the ``weight_steps`` of its result). The ablation runner's ``equal_steps`` gives the rest of
        a common step budget to the fine-tune. Strategies that train weights override this."""
        return 0


class ScoringStrategy(Strategy[ScoringConfigT]):
    """A strategy that only scores channels; the shared allocator does the rest."""

    Config: ClassVar[type[StrategyConfig]] = ScoringConfig
    budget_kinds: ClassVar[tuple[str, ...]] = ("macs", "latency")
    head_pruning: ClassVar[bool] = True
    sublayer_drops: ClassVar[bool] = True

    @abstractmethod
    def score(self, ctx: SearchContext) -> dict[str, torch.Tensor]:
        """Per dimension label, a score per channel: ``(H, d)`` for attention, ``(m,)`` for MLPs.
        Higher means more important."""

    def search(self, ctx: SearchContext) -> SearchResult:
        from dataclasses import replace

        from nas_headprune.allocate import allocate, head_scores

        # score() sees channel dimensions only; a head's score is derived from its channels' scores
        channels = replace(ctx, space=ctx.space.without_heads()) if ctx.space.has_heads else ctx
        scores = head_scores(ctx.space, self.score(channels))
        cfg = self.config
        space = cfg.stepped(ctx.space, ctx.device)
        latency_ms = ctx.target_latency_ms
        if latency_ms is not None:  # score lost per millisecond saved, against the measured table
            arch = allocate(
                space, scores, latency_ms, mode=cfg.allocation, tie_qk_v=cfg.tie_qk_v, cost=ctx.latency
            )
        else:
            arch = allocate(space, scores, ctx.target_macs, mode=cfg.allocation, tie_qk_v=cfg.tie_qk_v)
        selection = space.selection_from_scores(scores, arch)
        return SearchResult(selection, info={"allocation": cfg.allocation})


def validate_result(name: str, ctx: SearchContext, result: object) -> tuple[Selection, CostReport]:
    """Re-check a strategy's result; raise :class:`StrategyError` naming the strategy if invalid."""
    from nas_headprune.errors import ArchitectureError, StrategyError
    from nas_headprune.space import Selection

    if not isinstance(result, SearchResult):
        raise StrategyError(f"strategy {name!r} returned {type(result).__name__}, expected a SearchResult")
    raw = result.selection
    try:
        selection = ctx.space.selection(dict(raw.items()) if isinstance(raw, Selection) else raw)
    except ArchitectureError as exc:
        raise StrategyError(f"strategy {name!r} returned an invalid selection: {exc}") from exc
    cost = ctx.cost(selection.architecture())
    latency_ms = ctx.target_latency_ms
    if latency_ms is not None:
        predicted = float(ctx.latency.predict(ctx.space, selection.architecture()))
        if predicted > latency_ms * (1 + 1e-9):
            raise StrategyError(
                f"strategy {name!r} returned an architecture predicted at {predicted:.4g} ms per batch, above "
                f"the latency budget of {latency_ms:.4g} ms ({ctx.budget} of dense {ctx.latency.dense_ms:.4g} ms)"
            )
    macs = float(result.reported_macs) if result.reported_macs is not None else float(cost.macs)
    if macs > ctx.target_macs * (1 + 1e-9):
        raise StrategyError(
            f"strategy {name!r} returned an architecture of {macs:.6g} MACs, above the budget of "
            f"{ctx.target_macs:.6g} MACs ({ctx.budget} of dense {ctx.dense_macs})"
        )
    return selection, cost
