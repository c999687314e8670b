"""Whole-head pruning: a head count per attention layer next to the per-head widths."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import _search_args
from test_surgery import _random_selection
from zoo import MODEL_ZOO, input_size, make_model, masked_pruned_gap

from nas_headprune.allocate import allocate, head_scores
from nas_headprune.cli import main
from nas_headprune.evaluator.cost import analytic_cost
from nas_headprune.evaluator.latency import measure_table
from nas_headprune.evaluator.materialize import materialize
from nas_headprune.evaluator.measure import count_params, measure_macs
from nas_headprune.io import load_pruned, save_pruned
from nas_headprune.space import HEADS, build_space
from nas_headprune.testing import tiny_context

_CACHE: dict = {}


def _setup(key: str, fused: bool):
    if (key, fused) not in _CACHE:
        model = make_model(key, fused=fused)
        _CACHE[(key, fused)] = (model, build_space(model, input_size(key)).with_heads())
    return _CACHE[(key, fused)]


def test_with_heads_adds_a_head_count_to_supported_attention_layers_only(caplog) -> None:
    _, space = _setup("vit", True)
    for name, layer in space.layers.items():
        if layer.kind == "attention":
            d = layer.dims[HEADS]
            assert (d.label, d.heads, d.max_width, d.min_width) == (
                f"{name}:heads",
                1,
                layer.dims["qk"].heads,
                1,
            )
        else:
            assert HEADS not in layer.dims
    assert space.has_heads and not space.without_heads().has_heads
    assert set(space.without_heads().dims) == {label for label in space.dims if not label.endswith(":heads")}
    # a width step or minimum is about channels: head counts keep step 1 and minimum 1
    stepped = space.with_step(8, min_width=4)
    assert all(d.step == 1 and d.min_width == 1 for d in stepped.dims.values() if d.kind == HEADS)
    swin = build_space(make_model("swin"), input_size("swin"))
    with caplog.at_level(logging.WARNING, logger="nas_headprune.space"):
        kept = swin.with_heads()
    assert not kept.has_heads and "not supported" in caplog.text


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("key", ["vit", "vit_bias_wide", "deit_distilled"])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1))
def test_dropping_heads_pruned_equals_masked_and_counts_are_exact(key: str, fused: bool, seed: int) -> None:
    model, space = _setup(key, fused)
    selection = _random_selection(space, seed)
    pruned = materialize(model, space, selection)
    x = torch.randn(2, *input_size(key), generator=torch.Generator().manual_seed(seed))
    assert masked_pruned_gap(model, space, selection, pruned, x) < 1e-5
    arch = selection.architecture()
    for name, layer in space.layers.items():
        if HEADS in layer.dims:
            module = pruned.get_submodule(name)
            widths = arch.layer_widths(name)
            assert module.num_heads == widths[HEADS]
            assert module.qkv.out_features == widths[HEADS] * (2 * widths["qk"] + widths["v"])
            assert module.proj.in_features == widths[HEADS] * widths["v"]
    cost = analytic_cost(space, arch)
    assert cost.macs == measure_macs(pruned, input_size(key))
    assert cost.params == count_params(pruned)


def test_a_dropped_head_takes_its_own_channels_with_it() -> None:
    """The kept heads' rows are those of the dense heads they were, not the first ones."""
    model, space = _setup("vit", True)
    layer = next(name for name, ly in space.layers.items() if HEADS in ly.dims)
    dims = space.layers[layer].dims
    heads = dims[HEADS].max_width
    arch = dict(space.dense())
    arch[dims[HEADS].label] = heads - 1
    keep = [h for h in range(heads) if h != 0]  # drop head 0
    indices = {label: space.first_channels(space.dense())[label] for label in space.dims}
    indices[dims[HEADS].label] = torch.tensor([keep])
    selection = space.selection(indices)
    pruned = materialize(model, space, selection)
    d_qk = dims["qk"].max_width
    dense_q = model.get_submodule(layer).qkv.weight[: heads * d_qk].reshape(heads, d_qk, -1)
    pruned_q = pruned.get_submodule(layer).qkv.weight[: (heads - 1) * d_qk].reshape(heads - 1, d_qk, -1)
    assert torch.equal(pruned_q, dense_q[keep])


def test_pruned_model_with_dropped_heads_saves_and_loads_bit_exact(tmp_path) -> None:
    model, space = _setup("vit", True)
    selection = _random_selection(space, 5)
    assert any(
        v < space.dims[k].max_width for k, v in selection.architecture().items() if k.endswith(":heads")
    )
    pruned = materialize(model, space, selection)
    name, kwargs, _ = MODEL_ZOO["vit"]
    save_pruned(pruned, tmp_path / "m", base={"name": name, "kwargs": kwargs})
    again = load_pruned(tmp_path / "m")
    x = torch.randn(2, *input_size("vit"))
    with torch.no_grad():
        assert torch.equal(pruned.eval()(x), again.eval()(x))


def test_head_scores_sum_the_heads_normalised_channel_scores() -> None:
    _, space = _setup("vit", True)
    gen = torch.Generator().manual_seed(0)
    scores = {
        k: torch.rand(d.heads * d.max_width, generator=gen) for k, d in space.without_heads().dims.items()
    }
    full = head_scores(space, scores)
    for layer in space.layers.values():
        if HEADS not in layer.dims:
            continue
        expected = torch.zeros(layer.dims[HEADS].max_width, dtype=torch.float64)
        for kind in ("qk", "v"):
            d = layer.dims[kind]
            s = scores[d.label].double().reshape(d.heads, d.max_width)
            expected += (s / s.abs().mean()).sum(dim=1)
        assert torch.allclose(full[layer.dims[HEADS].label], expected)
    # a score given for a head count is kept as it is
    label = next(label for label in space.dims if label.endswith(":heads"))
    given_scores = {**scores, label: torch.arange(space.dims[label].max_width, dtype=torch.float64)}
    assert torch.equal(head_scores(space, given_scores)[label], given_scores[label])


def test_allocator_drops_a_head_whose_channels_score_nothing() -> None:
    _, space = _setup("vit", True)
    scores = {k: torch.ones(d.heads * d.max_width) for k, d in space.without_heads().dims.items()}
    dead = 1
    for layer in space.layers.values():
        if HEADS in layer.dims:
            for kind in ("qk", "v"):
                d = layer.dims[kind]
                s = scores[d.label].reshape(d.heads, d.max_width)
                s[dead] = 0.0
    target = 0.8 * float(analytic_cost(space).macs)
    arch = allocate(space, scores, target)
    selection = space.selection_from_scores(head_scores(space, scores), arch)
    assert float(analytic_cost(space, arch).macs) <= target
    for layer in space.layers.values():
        if HEADS in layer.dims:
            assert arch[layer.dims[HEADS].label] < layer.dims[HEADS].max_width
            assert dead not in selection[layer.dims[HEADS].label].reshape(-1).tolist()
    # uniform allocation keeps every head
    uniform = allocate(space, scores, target, mode="uniform")
    assert all(uniform[d.label] == d.max_width for d in space.dims.values() if d.kind == HEADS)


def test_scoring_strategies_search_head_counts() -> None:
    from strategies.magnitude import Magnitude
    from strategies.taylor import Taylor

    ctx = tiny_context(budget=0.4)
    ctx.space = ctx.space.with_heads()
    for strategy in (Magnitude(), Taylor()):
        result = strategy.search(ctx)
        selection = ctx.space.selection(dict(result.selection.items()))
        assert set(selection) == set(ctx.space.dims)
        assert float(ctx.cost(selection.architecture()).macs) <= ctx.target_macs


def test_latency_table_has_a_head_axis() -> None:
    model, space = _setup("vit", True)
    table = measure_table(model, space, batch_size=1, threads=1, points=2, rounds=1, warmup=0)
    for name, layer in space.layers.items():
        assert table.layers[name].kinds == list(layer.dims)
    arch = dict(space.dense())
    label = next(label for label in space.dims if label.endswith(":heads"))
    arch[label] = 1
    assert table.predict(space, arch) <= table.predict(space, space.dense())


def test_prune_heads_run_and_strategies_that_cannot(tmp_path, capsys) -> None:
    assert main(_search_args(tmp_path, "budget=0.4", "space.prune_heads=true", strategy="taylor")) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert any(label.endswith(":heads") for label in result["architecture"])
    assert result["pruned"]["macs"] == result["pruned"]["analytic_macs"] <= 0.4 * result["dense"]["macs"]
    stages = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert "prune_heads" in json.dumps(stages)
    capsys.readouterr()
    assert main(_search_args(tmp_path / "b", "space.prune_heads=true", strategy="nni_random")) == 2
    err = capsys.readouterr().err
    assert "'nni_random'" in err and "whole heads" in err and "Traceback" not in err
    # similarity_indicator searches whole heads only with its head indicator switched on
    assert main(_search_args(tmp_path / "c", "space.prune_heads=true", strategy="similarity_indicator")) == 2
    err = capsys.readouterr().err
    assert "'similarity_indicator'" in err and "strategy_options.head_indicator: true" in err
    assert "Traceback" not in err and not (tmp_path / "c" / "run" / "search.json").exists()
    on = ["space.prune_heads=true", "strategy_options={steps: 4, head_indicator: true}", "budget=0.4"]
    assert main(_search_args(tmp_path / "d", *on, strategy="similarity_indicator")) == 0
    result = json.loads((tmp_path / "d" / "run" / "result.json").read_text())
    assert any(label.endswith(":heads") for label in result["architecture"])
    assert result["pruned"]["macs"] == result["pruned"]["analytic_macs"] <= 0.4 * result["dense"]["macs"]


def test_similarity_head_indicators_start_from_head_scores_and_learn(tmp_path) -> None:
    from nas_headprune.registry import make_strategy
    from nas_headprune.strategies.similarity_indicator import CHECKPOINT_NAME
    from nas_headprune.strategies.taylor import Taylor

    ctx = tiny_context(budget=0.4)
    ctx.space = ctx.space.with_heads()
    ctx.work_dir = tmp_path
    heads = [d.label for d in ctx.space.dims.values() if d.kind == HEADS]
    options = {"head_indicator": True, "calib_batches_for_similarity": 1, "checkpoint_every": 0}
    result = make_strategy("similarity_indicator", {**options, "steps": 0}).search(ctx)
    assert result.info["head_indicator"] is True
    start = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["indicators"]
    # init_other taylor: each layer's heads start in the order of their summed Taylor channel scores
    channels = Taylor().score(dataclasses.replace(ctx, space=ctx.space.without_heads(), calib=ctx.calib[:1]))
    expected = head_scores(ctx.space, channels)
    for label in heads:
        assert start[label].shape == (1, ctx.space.dims[label].max_width)
        order = torch.argsort(start[label].reshape(-1), stable=True)
        assert torch.equal(order, torch.argsort(expected[label].reshape(-1), stable=True))
    (tmp_path / CHECKPOINT_NAME).unlink()
    make_strategy("similarity_indicator", {**options, "steps": 4, "lr_indicator": 0.05}).search(ctx)
    trained = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["indicators"]
    assert all(not torch.equal(trained[label], start[label]) for label in heads)  # gradients reach them


def test_runs_without_head_pruning_keep_their_fingerprints(tmp_path) -> None:
    assert main(_search_args(tmp_path, "budget=0.6")) == 0
    assert "prune_heads" not in (tmp_path / "run" / "stages.json").read_text()
