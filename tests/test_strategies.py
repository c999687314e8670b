from __future__ import annotations

import pytest
import torch

from nas_headprune.allocate import BudgetError, allocate
from nas_headprune.errors import ConfigError, NonFiniteLossError, StrategyError, UnknownNameError
from nas_headprune.registry import STRATEGY_GROUP, list_plugins, make_strategy, strategy_class
from nas_headprune.strategy import ScoringStrategy, SearchResult, Strategy, validate_result
from nas_headprune.testing import run_conformance, tiny_context

BUILTIN = [p.name for p in list_plugins(STRATEGY_GROUP)]


def test_builtins_are_registered():
    assert {"magnitude", "random", "taylor"} <= set(BUILTIN)


# short searches for strategies whose defaults train for a while
QUICK = {
    "similarity_indicator": {"steps": 6},
    "evolution": {"trials": 3, "population_size": 2, "sample_size": 1, "reweight": {"mode": "none"}},
    "nni_random": {"trials": 2, "reweight": {"mode": "none"}},
}
NEEDS_NNI = {"evolution", "nni_random"}


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_conformance(name: str) -> None:
    if name in NEEDS_NNI:
        pytest.importorskip("nni", reason="the nni extra is not installed")
    run_conformance(name, QUICK.get(name))


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_allocation_modes_meet_budget(allocation: str) -> None:
    run_conformance("magnitude", {"allocation": allocation, "width_step": 2}, models=("vit",))


def test_uniform_allocation_shares_one_ratio() -> None:
    ctx = tiny_context(budget=0.5)
    scores = {k: torch.rand(d.heads, d.max_width) for k, d in ctx.space.dims.items()}
    arch = allocate(ctx.space, scores, ctx.target_macs, mode="uniform")
    # one ratio r with width = floor(r * dense width) for every dimension
    lower = max(arch[k] / d.max_width for k, d in ctx.space.dims.items())
    upper = min((arch[k] + 1) / d.max_width for k, d in ctx.space.dims.items())
    assert lower < upper
    assert float(ctx.cost(arch).macs) <= ctx.target_macs


def test_global_allocation_prunes_low_scores_first() -> None:
    ctx = tiny_context(budget=0.7)
    scores = {k: torch.ones(d.heads, d.max_width) for k, d in ctx.space.dims.items()}
    low = torch.ones(64)
    low[:40] = 1e-3  # 40 nearly worthless units (scores are compared after dividing by the layer mean)
    scores["blocks.0.mlp:hidden"] = low
    arch = allocate(ctx.space, scores, ctx.target_macs, mode="global")
    assert arch["blocks.0.mlp:hidden"] <= 24
    assert arch["blocks.1.mlp:hidden"] > arch["blocks.0.mlp:hidden"]
    selection = ctx.space.selection_from_scores(scores, arch)
    assert (selection["blocks.0.mlp:hidden"] >= 40).all()


def test_unreachable_budget() -> None:
    ctx = tiny_context(budget=0.01)
    with pytest.raises(BudgetError, match="cannot be met: the smallest architecture of this space costs"):
        make_strategy("magnitude").search(ctx)


def test_magnitude_ranks_by_norm() -> None:
    ctx = tiny_context(budget=0.5)
    scores = make_strategy("magnitude").score(ctx)
    w = ctx.model.blocks[0].mlp.fc1.weight
    b = ctx.model.blocks[0].mlp.fc1.bias
    w2 = ctx.model.blocks[0].mlp.fc2.weight
    expected = w.abs().sum(1) + b.abs() + w2.abs().sum(0)
    torch.testing.assert_close(scores["blocks.0.mlp:hidden"].float(), expected.detach())


def test_taylor_refuses_a_model_whose_loss_is_not_finite() -> None:
    ctx = tiny_context()
    with torch.no_grad():
        ctx.model.head.weight[0, 0] = float("nan")  # NaN logits: every gradient and score would be NaN
    with pytest.raises(NonFiniteLossError, match=r"taylor: the loss of calibration batch 0 is nan \(2 of 2"):
        make_strategy("taylor").search(ctx)


def test_unknown_strategy_and_bad_options() -> None:
    with pytest.raises(UnknownNameError, match="unknown name 'magnitud'.*choose one of: .*magnitude"):
        strategy_class("magnitud")
    with pytest.raises(ConfigError, match=r"strategy_options\.nrom: unknown key; valid keys here: .*norm"):
        make_strategy("magnitude", {"nrom": "l2"})
    with pytest.raises(ConfigError, match=r"strategy_options\.norm: Input should be 'l1' or 'l2'"):
        make_strategy("magnitude", {"norm": "l3"})


def test_module_path_lookup() -> None:
    cls = strategy_class("nas_headprune.strategies.magnitude:Magnitude")
    assert cls.__name__ == "Magnitude"
    with pytest.raises(UnknownNameError, match="has no attribute 'Nope'"):
        strategy_class("nas_headprune.strategies.magnitude:Nope")


class _Unbalanced(Strategy):
    def search(self, ctx):
        sel = {k: v for k, v in ctx.space.first_channels(ctx.space.dense()).items()}
        sel["blocks.0.attn:qk"] = [[0, 1], [0], [0], [0]]
        return SearchResult(sel)


class _OverBudget(ScoringStrategy):
    def score(self, ctx):
        return {k: torch.rand(d.heads, d.max_width) for k, d in ctx.space.dims.items()}

    def search(self, ctx):
        return SearchResult(ctx.space.first_channels(ctx.space.dense()))


def test_runner_rejects_bad_plugins() -> None:
    ctx = tiny_context(budget=0.5)
    with pytest.raises(
        StrategyError, match=r"strategy 'unbalanced' returned an invalid selection: .*unbalanced"
    ):
        validate_result("unbalanced", ctx, _Unbalanced().search(ctx))
    with pytest.raises(
        StrategyError, match=r"strategy 'greedy' returned an architecture of .* above the budget"
    ):
        validate_result("greedy", ctx, _OverBudget().search(ctx))
    with pytest.raises(AssertionError, match="above the budget"):
        run_conformance(_OverBudget, models=("vit",))


def test_width_step_defaults_to_8_on_cuda_and_1_elsewhere() -> None:
    from nas_headprune.strategy import resolve_width_step

    assert resolve_width_step(None, "cuda") == resolve_width_step(None, "cuda:1") == 8
    assert resolve_width_step(None, "cpu") == 1 and resolve_width_step(None, "cpu", cpu_default=8) == 8
    assert resolve_width_step(4, "cuda") == 4 and resolve_width_step(3, "cpu") == 3
    ctx = tiny_context()
    selection = make_strategy("taylor", {}).search(ctx).selection
    widths = {k: v.shape[-1] for k, v in selection.items()}
    assert any(w % 8 for w in widths.values())  # width step 1 on the CPU: any width may come out


def test_magnitude_defaults_to_tied_widths_in_steps_of_8_where_dimensions_are_wide_enough() -> None:
    """Magnitude's default widths (chosen for speed on the validation split, docs/speed.md): q/k and
    v tied, steps of 8 on every device, except in dimensions narrower than two steps, whose widths
    step by 1 (the tiny ViT's heads have 8 channels, its MLPs 64 units)."""
    ctx = tiny_context(budget=0.5)
    assert {d.max_width for k, d in ctx.space.dims.items() if k.endswith((":qk", ":v"))} == {8}
    arch = make_strategy("magnitude", {}).search(ctx).selection.architecture()
    mlp = [arch[k] for k in ctx.space.dims if k.endswith(":hidden")]
    assert mlp and all(w % 8 == 0 for w in mlp)
    attn = [k[: -len(":qk")] for k in ctx.space.dims if k.endswith(":qk")]
    assert all(arch[f"{a}:qk"] == arch[f"{a}:v"] for a in attn)
    assert any(arch[f"{a}:qk"] < 8 for a in attn)  # the 8-wide heads were narrowed, in steps of 1
    free = make_strategy("magnitude", {"tie_qk_v": False, "width_step": 1}).search(ctx).selection
    assert free.architecture() != arch  # the options reach the allocator
    # a step set explicitly applies to every dimension: the heads stay whole (so 0.5 is out of reach)
    wide = tiny_context(budget=0.7)
    explicit = make_strategy("magnitude", {"width_step": 8}).search(wide).selection.architecture()
    assert all(explicit[f"{a}:qk"] == 8 for a in attn)
