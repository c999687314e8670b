"""Test kits for plugin authors: strategies (:class:`StrategyTestCase`, :func:`run_conformance`)
and space adapters (:class:`SpaceAdapterTestCase`).

Strategies: run the conformance kit from your plugin's own tests::

    from nas_headprune.testing import run_conformance

    def test_my_strategy_conforms():
        run_conformance(MyStrategy)              # or a registered name, or an instance

Each check raises ``AssertionError`` with a message saying what the strategy got wrong:

* the result is a valid, head-balanced selection of the space, within the MACs budget;
* the same seed gives the same selection;
* the input model is untouched (weights and module types);
* the strategy's ``Config`` round-trips through JSON.

or subclass :class:`StrategyTestCase` in your tests, one test method per property (and a check
of whole-head spaces for strategies that search them).

Space adapters: subclass :class:`SpaceAdapterTestCase` in your tests (one test method per property:
masked == pruned on both attention paths, analytic == counted MACs, scale folding, save/load).

The kits live in :mod:`~nas_headprune.testing.strategy_kit` and
:mod:`~nas_headprune.testing.adapter_kit`; :mod:`~nas_headprune.testing.context` builds the tiny
search context the strategy kit runs on. Every name is importable from ``nas_headprune.testing``.
"""

from __future__ import annotations

from nas_headprune.testing.adapter_kit import SpaceAdapterTestCase, adapters_registered, output_tensor
from nas_headprune.testing.context import tiny_context
from nas_headprune.testing.strategy_kit import (
    StrategyTestCase,
    check_config_roundtrip,
    check_input_untouched,
    check_seed_repeatable,
    check_valid_and_within_budget,
    run_conformance,
)

__all__ = [
    "SpaceAdapterTestCase",
    "StrategyTestCase",
    "adapters_registered",
    "check_config_roundtrip",
    "check_input_untouched",
    "check_seed_repeatable",
    "check_valid_and_within_budget",
    "output_tensor",
    "run_conformance",
    "tiny_context",
]
