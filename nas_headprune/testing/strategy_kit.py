"""The strategy kit: the checks every strategy must pass (:func:`run_conformance`, one call) and
:class:`StrategyTestCase` (one test method per property), run on :func:`tiny_context` models.
"""

from __future__ import annotations

import unittest
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from nas_headprune.strategy import SearchContext, Strategy, validate_result
from nas_headprune.testing.context import tiny_context


def _instantiate(strategy: type[Strategy] | Strategy | str, config: Any) -> Callable[[], Strategy]:
    from nas_headprune.registry import make_strategy

    if isinstance(strategy, str):
        return lambda: make_strategy(strategy, config)
    if isinstance(strategy, Strategy):
        return lambda: type(strategy)(strategy.config)
    return lambda: strategy(config)


def check_valid_and_within_budget(make: Callable[[], Strategy], ctx: SearchContext) -> None:
    name = type(make()).__name__
    result = make().search(ctx)
    try:
        selection, cost = validate_result(name, ctx, result)
    except Exception as exc:
        raise AssertionError(str(exc)) from exc
    for label, idx in selection.items():
        if idx.dim() == 2:
            assert idx.shape[0] == ctx.space.dims[label].heads, f"{name}: {label} lost heads"
    assert float(cost.macs) <= ctx.target_macs, f"{name}: {float(cost.macs)} MACs over {ctx.target_macs}"


def check_seed_repeatable(make: Callable[[], Strategy], ctx: SearchContext) -> None:
    name = type(make()).__name__
    a = ctx.space.selection(dict(make().search(ctx).selection.items()))
    b = ctx.space.selection(dict(make().search(ctx).selection.items()))
    assert a == b, f"{name}: the same seed gave two different selections"


def check_input_untouched(make: Callable[[], Strategy], ctx: SearchContext) -> None:
    name = type(make()).__name__
    before = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
    types = [type(m) for m in ctx.model.modules()]
    training = ctx.model.training
    make().search(ctx)
    assert [type(m) for m in ctx.model.modules()] == types, f"{name} replaced modules of the input model"
    after = ctx.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"{name} modified the input model's {changed[:3]}"
    assert ctx.model.training == training, f"{name} changed the input model's train/eval mode"
    hooks = [m for m in ctx.model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooks, f"{name} left hooks on the input model"


def check_config_roundtrip(make: Callable[[], Strategy]) -> None:
    strategy = make()
    cfg = strategy.config
    again = type(cfg).model_validate_json(cfg.model_dump_json())
    assert again == cfg, f"{type(strategy).__name__}.Config does not round-trip through JSON"
    assert type(cfg).model_config.get("extra") == "forbid", (
        f"{type(strategy).__name__}.Config must forbid extra fields"
    )


def run_conformance(
    strategy: type[Strategy] | Strategy | str,
    config: Any = None,
    *,
    budgets: tuple[float, ...] = (0.5, 0.8),
    models: tuple[str, ...] = ("vit", "swin"),
    seed: int = 0,
) -> None:
    """Run every check; ``strategy`` is a class, an instance or a registered name."""
    make = _instantiate(strategy, config)
    check_config_roundtrip(make)
    for model in models:
        for budget in budgets:
            ctx = tiny_context(seed=seed, budget=budget, model=model)
            check_valid_and_within_budget(make, ctx)
        ctx = tiny_context(seed=seed, budget=budgets[0], model=model)
        check_seed_repeatable(make, ctx)
        check_input_untouched(make, ctx)


class StrategyTestCase:
    """Properties every strategy must have, checked on tiny ViT and Swin models (random weights).

    Subclass it in your own tests, under a name pytest collects (``Test...``), and name the
    strategy; each test method checks one property and raises ``AssertionError`` saying what the
    strategy got wrong::

        from nas_headprune.testing import StrategyTestCase

        class TestMyStrategy(StrategyTestCase):
            strategy = MyStrategy              # a class, an instance or a registered name
            config = {"steps": 4}              # its options (optional)

    Properties (one test method each): :meth:`test_config_roundtrips`,
    :meth:`test_valid_and_within_budget` (every model and budget), :meth:`test_seed_repeatable`,
    :meth:`test_input_untouched`, and :meth:`test_whole_heads` for a strategy that searches whole
    heads with its config (:meth:`~nas_headprune.strategy.Strategy.searches_heads`; the same checks
    on a space whose layers may drop whole heads).
    :func:`run_conformance` runs the first four in one call.
    """

    strategy: ClassVar[Any] = None
    config: ClassVar[Any] = None
    budgets: ClassVar[tuple[float, ...]] = (0.5, 0.8)
    models: ClassVar[tuple[str, ...]] = ("vit", "swin")
    seed: ClassVar[int] = 0

    def _make(self) -> Callable[[], Strategy]:
        if self.strategy is None:
            raise NotImplementedError(f"{type(self).__name__} must set `strategy`")
        return _instantiate(self.strategy, self.config)

    def test_config_roundtrips(self) -> None:
        check_config_roundtrip(self._make())

    def test_valid_and_within_budget(self) -> None:
        make = self._make()
        for model in self.models:
            for budget in self.budgets:
                check_valid_and_within_budget(make, tiny_context(seed=self.seed, budget=budget, model=model))

    def test_seed_repeatable(self) -> None:
        make = self._make()
        for model in self.models:
            check_seed_repeatable(make, tiny_context(seed=self.seed, budget=self.budgets[0], model=model))

    def test_input_untouched(self) -> None:
        make = self._make()
        for model in self.models:
            check_input_untouched(make, tiny_context(seed=self.seed, budget=self.budgets[0], model=model))

    def test_whole_heads(self) -> None:
        make = self._make()
        if not make().searches_heads():
            raise unittest.SkipTest(f"{type(make()).__name__} does not search whole heads (head_pruning)")
        ctx = tiny_context(seed=self.seed, budget=self.budgets[0], model="vit")
        ctx.space = ctx.space.with_heads()
        check_valid_and_within_budget(make, ctx)
        check_seed_repeatable(make, ctx)
