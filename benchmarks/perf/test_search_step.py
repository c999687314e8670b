"""Search cost of every registered strategy, in units of one dense training step.

Model: the embedded Fashion-MNIST ViT; data: random batches of 128 images (the default preset's
batch size), four of them as calibration batches. What one "step" is depends on the strategy:

* strategies with a per-step hook and a ``steps`` option (``similarity_indicator``): one search
  step, timed from one call of the hook to the next while the search runs in a worker thread that
  pauses at the hook;
* multi-trial strategies (a ``trials``-like option): the whole search with a few trials, divided by
  the number of trials, i.e. the cost of one candidate;
* scoring strategies with a ``batches`` option (``taylor``): the score pass over one calibration
  batch;
* anything else (``magnitude``, ``random``): the whole search (scores, shared allocator, selection).

Strategies whose plugin cannot be imported here (an optional dependency is missing) are skipped
with the import error as the reason.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nas_headprune.evaluator.measure import measure_macs
from nas_headprune.models.dense import embedded_dir, load_dense
from nas_headprune.registry import STRATEGY_GROUP, list_plugins, make_strategy, strategy_class
from nas_headprune.space import HeadSpace, build_space
from nas_headprune.strategy import ScoringStrategy, SearchContext, Strategy

BATCH = 128
CALIB_BATCHES = 4
DEVICES = ("cpu", "cuda")
#: option names that count the candidates of a multi-trial search, and how many to run here
TRIAL_OPTIONS = ("trials", "max_trials", "num_trials", "n_trials")
FEW_TRIALS = 2
DENSE_STEP = "forward, cross entropy, backward, AdamW step"


@dataclass
class Base:
    model: nn.Module
    space: HeadSpace
    input_size: tuple[int, ...]
    dense_macs: int
    calib: list[tuple[torch.Tensor, torch.Tensor]]
    description: str

    def context(self, device: torch.device) -> SearchContext:
        model = self.model if device.type == "cpu" else copy.deepcopy(self.model).to(device)
        return SearchContext(
            model=model,
            space=self.space,
            budget=0.5,
            dense_macs=self.dense_macs,
            calib=self.calib,
            seed=0,
            device=str(device),
        )


@pytest.fixture(scope="module")
def base() -> Base:
    model, record = load_dense(embedded_dir("embedded"))
    size = tuple(record["input_size"])
    classes = int(record["kwargs"]["num_classes"])
    gen = torch.Generator().manual_seed(0)
    calib = [
        (torch.randn(BATCH, *size, generator=gen), torch.randint(0, classes, (BATCH,), generator=gen))
        for _ in range(CALIB_BATCHES)
    ]
    macs = measure_macs(model, size)
    description = (
        f"The embedded Fashion-MNIST ViT (input {'x'.join(map(str, size))}, {macs / 1e6:.1f}M MACs per "
        "image), budget 0.5, random data"
    )
    return Base(model, build_space(model, size), size, macs, calib, description)


# --------------------------------------------------------------------------- what a step is
@dataclass
class StepPlan:
    kind: str  # "stepped", "per_trial", "score_pass" or "whole"
    what: str
    options: dict[str, Any] = field(default_factory=dict)
    trials: int = 1


def plan_for(cls: type[Strategy]) -> StepPlan:
    fields = cls.Config.model_fields
    if getattr(cls, "reports_steps", False) and "steps" in fields:
        options: dict[str, Any] = {"steps": 1_000_000}  # never reached: the timed search is stopped
        if "checkpoint_every" in fields:
            options["checkpoint_every"] = 0
        return StepPlan(
            "stepped", "one search step (from one call of its per-step hook to the next)", options
        )
    trial = next((name for name in TRIAL_OPTIONS if name in fields), None)
    if trial is not None:
        return StepPlan(
            "per_trial",
            f"one candidate: whole search with {trial}={FEW_TRIALS}, divided by {FEW_TRIALS}",
            {trial: FEW_TRIALS},
            trials=FEW_TRIALS,
        )
    if issubclass(cls, ScoringStrategy) and "batches" in fields:
        return StepPlan("score_pass", "score pass over one calibration batch", {"batches": 1})
    if issubclass(cls, ScoringStrategy):
        return StepPlan("whole", "whole search: scores, shared allocator, selection")
    return StepPlan("whole", "whole search")


class _Stop(Exception):
    """Raised at the step hook to end a search that was only run to be timed."""


class SteppedSearch:
    """Runs ``strategy.search(ctx)`` in a worker thread that pauses after every step.

    The context's per-step callback (``SearchContext.on_step``) is wrapped so that the worker signals
    the end of a step and waits there; :meth:`step` lets it run exactly one more step. Entering the
    context runs the setup and the first step; leaving it stops the search at its next pause.
    """

    def __init__(self, strategy: Strategy, ctx: SearchContext) -> None:
        self._paused = threading.Semaphore(0)
        self._resume = threading.Semaphore(0)
        self._stop = False
        self._done = False
        self._error: BaseException | None = None
        device = torch.device(ctx.device)
        hook = ctx.on_step

        def pausing_hook(step: int, masks: Any) -> None:
            if hook is not None:
                hook(step, masks)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self._paused.release()
            self._resume.acquire()
            if self._stop:
                raise _Stop

        ctx = dataclasses.replace(ctx, on_step=pausing_hook)
        self._thread = threading.Thread(target=self._run, args=(strategy, ctx), name="stepped-search")

    def _run(self, strategy: Strategy, ctx: SearchContext) -> None:
        try:
            strategy.search(ctx)
        except _Stop:
            pass
        except BaseException as exc:  # handed to the caller's thread
            self._error = exc
        finally:
            self._done = True
            self._paused.release()

    def _wait(self) -> None:
        self._paused.acquire()
        if self._error is not None:
            raise self._error
        if self._done:
            raise RuntimeError("the search finished before the timed steps did; give it more steps")

    def step(self) -> None:
        self._resume.release()
        self._wait()

    def __enter__(self) -> SteppedSearch:
        self._thread.start()
        self._wait()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self._stop = True
            self._resume.release()
        self._thread.join()


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_dense_training_step(device: torch.device, perf, base: Base):
    model = copy.deepcopy(base.model).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = (t.to(device) for t in base.calib[0])

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    perf(
        step,
        section="search",
        group=f"search step {device.type}",
        device=device,
        strategy=None,
        step=DENSE_STEP,
        batch=BATCH,
        model_desc=base.description,
    )


def _strategy_cases() -> list:
    names = [info.name for info in list_plugins(STRATEGY_GROUP)]
    return [pytest.param(dev, name, id=f"{dev}-{name}") for dev in DEVICES for name in names]


def _missing_module(exc: BaseException) -> ImportError | None:
    """The ImportError behind ``exc`` (itself, its cause or its context), if there is one."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ImportError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


@pytest.mark.parametrize(("device", "name"), _strategy_cases(), indirect=["device"])
def test_strategy_step(device: torch.device, perf, base: Base, name: str):
    try:
        cls = strategy_class(name)
        plan = plan_for(cls)
        strategy = make_strategy(name, plan.options)
    except Exception as exc:  # e.g. the plugin module, or its constructor, imports a missing package
        if _missing_module(exc) is None:
            raise
        pytest.skip(f"strategy {name!r} cannot be loaded here (a dependency is missing): {exc}")
    ctx = base.context(device)
    info = dict(
        section="search",
        group=f"search step {device.type}",
        device=device,
        strategy=name,
        step=plan.what,
        batch=BATCH,
        model_desc=base.description,
    )
    try:
        if plan.kind == "stepped":
            with SteppedSearch(strategy, ctx) as search:
                perf(search.step, **info)
        elif plan.kind == "score_pass":
            assert isinstance(strategy, ScoringStrategy)
            perf(lambda: strategy.score(ctx), **info)
        else:
            perf(lambda: strategy.search(ctx), divide_by=plan.trials, **info)
    except Exception as exc:  # a plugin that imports its optional dependency only when it runs
        if _missing_module(exc) is None:
            raise
        pytest.skip(f"strategy {name!r} needs a package that is not installed: {exc}")
