from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from zoo import MODEL_ZOO, make_model

from nas_headprune.allocate import BudgetError
from nas_headprune.errors import ArchitectureError, ConfigError, UsageError
from nas_headprune.evaluator.cost import analytic_cost
from nas_headprune.registry import make_strategy
from nas_headprune.space import Architecture, build_space
from nas_headprune.strategies.nni_space import (
    BUDGET_LABEL,
    INSTALL_COMMAND,
    MissingDependencyError,
    budget_constraint,
    budget_prior,
    from_nni,
    require_nni,
    to_nni,
)
from nas_headprune.strategy import validate_result
from nas_headprune.testing import run_conformance, tiny_context

HAVE_NNI = importlib.util.find_spec("nni") is not None
needs_nni = pytest.mark.skipif(not HAVE_NNI, reason=f"needs the nni extra: {INSTALL_COMMAND}")
if HAVE_NNI:
    from nni import mutable

# tiny searches: the conformance kit runs each strategy 10 times
QUICK = {"trials": 2, "reweight": {"mode": "none"}}
QUICK_EVOLUTION = {**QUICK, "trials": 3, "population_size": 2, "sample_size": 1}


def _space(key: str, step: int = 1):
    _, _, size = MODEL_ZOO[key]
    space = build_space(make_model(key), size)
    return space.with_step(step) if step > 1 else space


def _draw(exported, seed: int, tries: int = 200) -> tuple[dict, int]:
    """One valid NNI sample (NNI's own sampling, retried on constraint violations) and the number
    of rejected draws before it."""
    rng = np.random.RandomState(seed)
    for rejected in range(tries):
        sample: dict = {}
        try:
            exported.random(sample, rng)
        except mutable.SampleValidationError:
            continue
        return sample, rejected
    raise AssertionError(f"no valid sample in {tries} draws")


# ------------------------------------------------------------------------------- export / import
@needs_nni
@pytest.mark.parametrize(
    ("key", "step"), [("vit", 1), ("deit_distilled", 1), ("swin", 1), ("flatten_swin", 4)]
)
def test_export_has_one_labelled_categorical_per_dimension(key: str, step: int) -> None:
    space = _space(key, step)
    exported = to_nni(space)
    simplified = exported.simplify()
    assert list(simplified) == list(space.dims)
    for label, d in space.dims.items():
        categorical = simplified[label]
        assert isinstance(categorical, mutable.Categorical)
        assert categorical.label == label
        assert categorical.values == d.allowed()
        assert categorical.default() == d.max_width
    assert BUDGET_LABEL not in exported and budget_constraint(exported) is None


@needs_nni
@pytest.mark.parametrize(
    "key", ["vit", "vit_bias_wide", "deit_distilled", "swin", "flatten_swin", "flatten_deit"]
)
def test_round_trip(key: str) -> None:
    space = _space(key)
    exported = to_nni(space)
    for seed in range(3):
        sample, _ = _draw(exported, seed)
        arch = from_nni(space, sample)
        assert isinstance(arch, Architecture)
        assert arch.to_dict() == {k: int(v) for k, v in sample.items()}
        # and back: the project's architecture is a valid NNI sample that freezes to itself
        assert exported.contains(arch.to_dict())
        assert exported.freeze(arch.to_dict()) == arch.to_dict()
    project = space.sample(7)
    assert from_nni(space, exported.freeze(project.to_dict())) == project


@needs_nni
def test_frozen_value_with_constraint_round_trips() -> None:
    ctx = tiny_context(budget=0.6)
    exported = to_nni(ctx.space, ctx.target_macs)
    sample, _ = _draw(exported, 0)
    frozen = exported.freeze(sample)
    assert frozen[BUDGET_LABEL] is None  # the constraint freezes to nothing
    assert from_nni(ctx.space, frozen) == Architecture(sample)


@needs_nni
def test_from_nni_rejects_bad_samples() -> None:
    ctx = tiny_context()
    dense = ctx.space.dense().to_dict()
    with pytest.raises(ArchitectureError, match="unknown layer label 'blocks.9.attn:qk'"):
        from_nni(ctx.space, {**dense, "blocks.9.attn:qk": 2})
    missing = dict(dense)
    del missing["blocks.1.mlp:hidden"]
    with pytest.raises(ArchitectureError, match="missing 1 dimension.*blocks.1.mlp:hidden"):
        from_nni(ctx.space, missing)
    with pytest.raises(
        ArchitectureError, match=r"blocks.0.attn:qk = 99 is outside the allowed range \[1, 8\]"
    ):
        from_nni(ctx.space, {**dense, "blocks.0.attn:qk": 99})
    with pytest.raises(ArchitectureError, match="above the budget"):
        from_nni(ctx.space, dense, target_macs=ctx.target_macs)


# ----------------------------------------------------------------------------------- constraint
@needs_nni
def test_constraint_rejects_over_budget_samples() -> None:
    ctx = tiny_context(budget=0.5)
    exported = to_nni(ctx.space, ctx.target_macs)
    constraint = budget_constraint(exported)
    assert isinstance(constraint, mutable.Constraint)
    assert constraint.label == BUDGET_LABEL
    # the constraint counts MACs exactly as the project does
    arch = ctx.space.sample(3)
    assert constraint.macs(arch.to_dict()) == float(analytic_cost(ctx.space, arch).macs)
    dense = ctx.space.dense().to_dict()
    assert not exported.contains(dense)
    with pytest.raises(mutable.ConstraintViolation, match="above the budget"):
        exported.validate(dense)
    smallest = {label: d.allowed()[0] for label, d in ctx.space.dims.items()}
    assert exported.contains(smallest)
    # NNI's own sampling never returns an over-budget sample, and does reject some
    rejected_total = 0
    for seed in range(20):
        sample, rejected = _draw(exported, seed)
        rejected_total += rejected
        assert float(ctx.cost(sample).macs) <= ctx.target_macs
    assert rejected_total > 0


@needs_nni
def test_unreachable_budget_is_refused() -> None:
    ctx = tiny_context(budget=0.01)
    with pytest.raises(BudgetError, match="cannot be met"):
        to_nni(ctx.space, ctx.target_macs)
    with pytest.raises(UsageError, match="prior='budget' needs a target_macs"):
        to_nni(ctx.space, prior="budget")


@needs_nni
def test_budget_prior_centres_draws_on_the_budget() -> None:
    ctx = tiny_context(budget=0.3)
    weights = budget_prior(ctx.space, ctx.target_macs)
    expected = {
        label: sum(p * w for p, w in zip(weights[label], d.allowed(), strict=True))
        for label, d in ctx.space.dims.items()
    }
    assert float(analytic_cost(ctx.space, expected).macs) == pytest.approx(ctx.target_macs, rel=1e-3)
    # a uniform draw almost never fits 30% of the MACs; the budget prior fits about half the time
    accepted = {}
    for prior in ("uniform", "budget"):
        exported = to_nni(ctx.space, ctx.target_macs, prior=prior)
        rng = np.random.RandomState(0)
        ok = 0
        for _ in range(200):
            try:
                exported.random({}, rng)
                ok += 1
            except mutable.SampleValidationError:
                pass
        accepted[prior] = ok / 200
    assert accepted["uniform"] < 0.1
    assert 0.3 < accepted["budget"] < 0.7


# ----------------------------------------------------------------------------------- strategies
@needs_nni
@pytest.mark.parametrize(("name", "options"), [("nni_random", QUICK), ("evolution", QUICK_EVOLUTION)])
def test_conformance(name: str, options: dict) -> None:
    run_conformance(name, options)


@needs_nni
def test_evolution_result_and_record() -> None:
    ctx = tiny_context(budget=0.5)
    strategy = make_strategy("evolution", {"trials": 4, "population_size": 2, "sample_size": 2})
    result = strategy.search(ctx)
    selection, cost = validate_result("evolution", ctx, result)
    info = result.info
    assert info["engine"] == "nni.nas.execution.sequential.SequentialExecutionEngine"
    assert info["nni_strategy"].startswith("RegularizedEvolution(population_size=2, sample_size=2")
    assert info["trials_run"] == 4 and len(info["history"]) == 4
    assert (info["fit_batches"], info["proxy_batches"]) == (1, 1)
    losses = [t["loss"] for t in info["history"]]
    assert info["best_proxy"]["loss"] == min(losses)
    assert info["history"][info["best_trial"]]["loss"] == min(losses)
    assert all(t["macs_ratio"] * ctx.dense_macs <= ctx.target_macs * (1 + 1e-6) for t in info["history"])
    assert info["best_macs_ratio"] == pytest.approx(float(cost.macs) / ctx.dense_macs, abs=1e-6)
    # channels inside the chosen widths are the ranking strategy's top channels
    scores = make_strategy("magnitude").score(ctx)
    assert selection == ctx.space.selection_from_scores(scores, selection.architecture())


@needs_nni
def test_accuracy_proxy_and_other_ranking() -> None:
    ctx = tiny_context(budget=0.6)
    options = {**QUICK, "trials": 3, "proxy": "accuracy", "ranking": "random"}
    result = make_strategy("nni_random", options).search(ctx)
    selection, _ = validate_result("nni_random", ctx, result)
    info = result.info
    assert info["proxy"] == "accuracy" and info["ranking"] == "random"
    assert info["best_proxy"]["top1"] == max(t["top1"] for t in info["history"])
    scores = make_strategy("random").score(ctx)
    assert selection == ctx.space.selection_from_scores(scores, selection.architecture())


@needs_nni
def test_needs_a_batch_besides_the_held_out_ones() -> None:
    ctx = tiny_context()
    strategy = make_strategy("nni_random", {**QUICK, "proxy_batches": 2})
    with pytest.raises(UsageError, match="proxy_batches=2 holds out .* the run has 2"):
        strategy.search(ctx)


# ------------------------------------------------------------------------------------- errors
@needs_nni
def test_bad_ranking_is_a_config_error() -> None:
    with pytest.raises(
        ConfigError,
        match=r"strategy_options.ranking: 'magnitud' is not a known strategy; choose a "
        r"scoring strategy: .*magnitude",
    ):
        make_strategy("evolution", {"ranking": "magnitud"})
    with pytest.raises(ConfigError, match=r"'similarity_indicator' does not score channels.*taylor"):
        make_strategy("nni_random", {"ranking": "similarity_indicator"})
    with pytest.raises(
        ConfigError, match=r"strategy_options.ranking_options.norm: Input should be 'l1' or 'l2'"
    ):
        make_strategy("evolution", {"ranking_options": {"norm": "l3"}})


@needs_nni
def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"strategy_options.trails: unknown key; valid keys here: .*trials"):
        make_strategy("evolution", {"trails": 3})
    with pytest.raises(ConfigError, match=r"sample_size \(5\) must be at most population_size \(4\)"):
        make_strategy("evolution", {"population_size": 4, "sample_size": 5})
    with pytest.raises(ConfigError, match=r"strategy_options.proxy: Input should be 'loss' or 'accuracy'"):
        make_strategy("nni_random", {"proxy": "top5"})


def test_missing_nni_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nni", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'nas-headprune\[nni\]'") as info:
        require_nni()
    assert isinstance(info.value, UsageError)
    with pytest.raises(MissingDependencyError, match="exporting a search space to NNI needs"):
        to_nni(tiny_context().space)
    for name in ("evolution", "nni_random"):
        with pytest.raises(
            MissingDependencyError, match=r"NNI strategies need .*pip install 'nas-headprune\[nni\]'"
        ):
            make_strategy(name)


def test_missing_nni_on_the_command_line_exits_2(tmp_path, monkeypatch, capsys) -> None:
    from nas_headprune.cli import main

    monkeypatch.setitem(sys.modules, "nni", None)  # `import nni` (and nni.*) fails as if not installed
    assert main(["search", "--strategy", "evolution", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'nas-headprune[nni]'" in err
    assert "Traceback" not in err


@needs_nni
def test_missing_pytorch_lightning_is_named() -> None:
    code = (
        "import sys; sys.modules['pytorch_lightning'] = None\n"
        "from nas_headprune.strategies.nni_space import require_nni\n"
        "require_nni()\n"  # nni.mutable alone does not need it
        "require_nni(nas=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1
    assert "MissingDependencyError" in out.stderr
    assert "pytorch_lightning" in out.stderr and "pip install 'nas-headprune[nni]'" in out.stderr
