"""The strategy kit (``nas_headprune.testing.StrategyTestCase``): it passes on working strategies
and each property fails, with a message, on a strategy that breaks it."""

from __future__ import annotations

import random
import unittest

import pytest
import torch
from pydantic import ConfigDict

from nas_headprune.strategy import ScoringConfig, ScoringStrategy, SearchContext
from nas_headprune.testing import StrategyTestCase


class TestTaylorKit(StrategyTestCase):
    strategy = "taylor"


class TestMagnitudeUniformKit(StrategyTestCase):
    strategy = "magnitude"
    config = {"allocation": "uniform", "width_step": 2}
    models = ("vit",)


class _Unseeded(ScoringStrategy):
    """Scores from a generator that ignores the context's seed."""

    def score(self, ctx: SearchContext) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(random.getrandbits(32))
        return {label: torch.rand(ctx.space.shape(label), generator=gen) for label in ctx.space.dims}


class _Mutating(ScoringStrategy):
    """Scales the input model's first parameter while scoring."""

    def score(self, ctx: SearchContext) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            next(ctx.model.parameters()).mul_(2.0)
        return {label: torch.ones(ctx.space.shape(label)) for label in ctx.space.dims}


class _OverBudget(ScoringStrategy):
    """Keeps everything: the dense architecture, whatever the budget."""

    def search(self, ctx: SearchContext):
        from nas_headprune.strategy import SearchResult

        return SearchResult(ctx.space.first_channels(ctx.space.dense()))

    def score(self, ctx: SearchContext) -> dict[str, torch.Tensor]:  # pragma: no cover - unused
        raise NotImplementedError


class _LooseConfig(ScoringConfig):
    model_config = ConfigDict(extra="allow")


class _Loose(ScoringStrategy):
    Config = _LooseConfig

    def score(self, ctx: SearchContext) -> dict[str, torch.Tensor]:
        return {label: torch.ones(ctx.space.shape(label)) for label in ctx.space.dims}


@pytest.mark.parametrize(
    ("strategy", "method", "message"),
    [
        (_Unseeded, "test_seed_repeatable", "same seed gave two different selections"),
        (_Mutating, "test_input_untouched", "modified the input model"),
        (_OverBudget, "test_valid_and_within_budget", "above the budget"),
        (_OverBudget, "test_whole_heads", "above the budget"),
        (_Loose, "test_config_roundtrips", "must forbid extra fields"),
    ],
)
def test_each_property_fails_on_a_strategy_that_breaks_it(strategy, method, message) -> None:
    case = type("Case", (StrategyTestCase,), {"strategy": strategy, "models": ("vit",)})()
    with pytest.raises(AssertionError, match=message):
        getattr(case, method)()


class _ChannelsOnly(ScoringStrategy):
    """Scores channels but does not declare ``head_pruning``."""

    head_pruning = False

    def score(self, ctx: SearchContext) -> dict[str, torch.Tensor]:
        raise AssertionError("the kit must skip before searching")


def test_whole_heads_is_skipped_for_a_strategy_that_does_not_search_heads() -> None:
    case = type("Case", (StrategyTestCase,), {"strategy": _ChannelsOnly})()
    with pytest.raises(unittest.SkipTest, match="whole heads"):
        case.test_whole_heads()


def test_similarity_indicator_with_its_head_indicator_passes_the_whole_heads_kit() -> None:
    config = {"steps": 3, "head_indicator": True, "calib_batches_for_similarity": 1}
    case = type("Case", (StrategyTestCase,), {"strategy": "similarity_indicator", "config": config})()
    case.test_whole_heads()


def test_a_case_without_a_strategy_says_so() -> None:
    with pytest.raises(NotImplementedError, match="must set `strategy`"):
        StrategyTestCase().test_config_roundtrips()
