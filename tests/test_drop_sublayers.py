"""Whole sublayers dropped (``space.drop_sublayers``): an attention layer keeping 0 heads, an MLP 0
hidden units; the pruned model holds a constant instead and loses the norm only that sublayer read."""

from __future__ import annotations

import json
import logging
import random

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from test_cli import _search_args
from zoo import MODEL_ZOO, input_size, make_model, masked_pruned_gap

from nas_headprune.allocate import BudgetError, allocate, head_scores
from nas_headprune.cli import main
from nas_headprune.config import RunConfig
from nas_headprune.errors import ArchitectureError
from nas_headprune.evaluator.cost import analytic_cost
from nas_headprune.evaluator.latency import grid_widths, measure_table, table_key
from nas_headprune.evaluator.materialize import META_ATTR, materialize
from nas_headprune.evaluator.measure import count_params, measure_macs
from nas_headprune.evaluator.reweight import layer_errors, reweight
from nas_headprune.io import load_pruned, save_pruned
from nas_headprune.space import DROP_NORM, HEADS, build_space
from nas_headprune.space.dropped import DroppedSublayer
from nas_headprune.testing import tiny_context

_CACHE: dict = {}


def _setup(key: str, fused: bool = True):
    if (key, fused) not in _CACHE:
        model = make_model(key, fused=fused)
        space = build_space(model, input_size(key)).with_heads()
        _CACHE[(key, fused)] = (model, space.with_drops(model))
    return _CACHE[(key, fused)]


def _layer_scale_vit(drop_path_rate: float):
    """A small timm ViT with LayerScale (as DeiT III) and drop-path, seeded, in eval mode."""
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=16,
        patch_size=4,
        in_chans=1,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2,
        num_classes=5,
        init_values=0.3,
        drop_path_rate=drop_path_rate,
    ).eval()


def _dropping_selection(space, seed: int, drop: str = "both"):
    """A random selection that drops each droppable layer of the kinds in ``drop`` with probability
    1/2 (at least one of them), other widths random, kept channels by random scores."""
    rng = random.Random(seed)
    arch = dict(space.sample(rng))
    kinds = {"both": ("attention", "mlp"), "attention": ("attention",), "mlp": ("mlp",)}[drop]
    droppable = [n for n, ly in space.layers.items() if ly.droppable() and ly.kind in kinds]
    chosen = [n for n in droppable if rng.random() < 0.5] or [rng.choice(droppable)]
    for name, layer in space.layers.items():
        for d in layer.dims.values():
            if d.zero:
                arch[d.label] = 0 if name in chosen else max(arch[d.label], 1)
    gen = torch.Generator().manual_seed(seed)
    scores = {k: torch.rand(d.heads * d.max_width, generator=gen) for k, d in space.dims.items()}
    return space.selection_from_scores(scores, arch), chosen


def test_with_drops_lets_head_counts_and_mlp_widths_reach_zero_and_moves_the_norms() -> None:
    model, space = _setup("vit")
    heads_only = build_space(model, input_size("vit")).with_heads()
    for name, layer in space.layers.items():
        kind = HEADS if layer.kind == "attention" else "hidden"
        d = layer.dims[kind]
        assert d.zero and d.allowed()[0] == 0 and d.allowed()[1] == 1
        assert layer.meta[DROP_NORM] == name.replace("attn", "norm1").replace("mlp", "norm2")
        assert all(not dd.zero for k, dd in layer.dims.items() if k != kind)
    assert space.has_drops and not heads_only.has_drops
    assert space.smallest()["blocks.0.attn:heads"] == 0 and space.smallest()["blocks.0.mlp:hidden"] == 0
    # the norms' parameters move from the fixed part into their layers: totals unchanged
    assert analytic_cost(space).params == analytic_cost(heads_only).params == count_params(model)
    assert space.fixed_params < heads_only.fixed_params
    # a width step keeps 0 allowed and the minimum applies to the kept widths
    stepped = space.with_step(8, min_width=4)
    hidden = stepped.dims["blocks.0.mlp:hidden"]
    assert hidden.zero and hidden.allowed()[:3] == [0, 8, 16]
    assert stepped.dims["blocks.0.attn:heads"].allowed() == [0, 1, 2, 3, 4]
    with pytest.raises(ArchitectureError, match=r"outside the allowed range \[1, 4\] or 0"):
        space.validate({**space.dense(), "blocks.0.attn:heads": 5})
    with pytest.raises(ArchitectureError, match="outside the allowed range"):
        heads_only.validate({**heads_only.dense(), "blocks.0.attn:heads": 0})


def test_dropping_attention_needs_head_counts_and_other_adapters_keep_their_layers(caplog) -> None:
    model = make_model("vit")
    with pytest.raises(ArchitectureError, match=r"blocks\.0\.attn: .*with_heads\(\)"):
        build_space(model, input_size("vit")).with_drops(model)
    swin = make_model("swin")
    with caplog.at_level(logging.WARNING, logger="nas_headprune.space"):
        space = build_space(swin, input_size("swin")).with_heads().with_drops(swin)
    assert "timm_window_attention" in caplog.text or "not supported" in caplog.text
    for layer in space.layers.values():
        assert layer.droppable() == (layer.kind == "mlp")
        if layer.kind == "mlp":  # Swin's blocks are not timm Blocks: the norm stays
            assert layer.meta[DROP_NORM] is None


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("drop", ["attention", "mlp", "both"])
@pytest.mark.parametrize("key", ["vit", "vit_bias_wide", "deit_distilled"])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1))
def test_dropped_sublayers_pruned_equals_masked_and_counts_are_exact(
    key: str, drop: str, fused: bool, seed: int
) -> None:
    model, space = _setup(key, fused)
    selection, chosen = _dropping_selection(space, seed, drop)
    pruned = materialize(model, space, selection)
    x = torch.randn(2, *input_size(key), generator=torch.Generator().manual_seed(seed))
    assert masked_pruned_gap(model, space, selection, pruned, x) < 1e-5
    for name in chosen:  # a constant, no matmuls, and the norm only it read is gone
        assert isinstance(pruned.get_submodule(name), DroppedSublayer)
        assert isinstance(pruned.get_submodule(space.layers[name].meta[DROP_NORM]), torch.nn.Identity)
    assert sorted(getattr(pruned, META_ATTR)["dropped"]) == sorted(chosen)
    arch = selection.architecture()
    cost = analytic_cost(space, arch)
    assert cost.macs == measure_macs(pruned, input_size(key))
    assert cost.params == count_params(pruned)
    for name in chosen:
        assert cost.layers[name]["macs"] == 0


def test_layer_scale_multiplies_the_constant_and_everything_dropped_is_exact() -> None:
    model = _layer_scale_vit(drop_path_rate=0.1)
    with torch.no_grad():  # biases far from zero, so a lost scale would show
        for block in model.blocks:
            block.attn.proj.bias.normal_()
            block.mlp.fc2.bias.normal_()
            block.ls1.gamma.uniform_(0.5, 2.0)
    space = build_space(model, (1, 16, 16)).with_heads().with_drops(model)
    for arch in (space.smallest(), {**space.dense(), "blocks.1.attn:heads": 0, "blocks.0.mlp:hidden": 0}):
        selection = space.first_channels(arch)
        pruned = materialize(model, space, selection).eval()
        x = torch.randn(3, 1, 16, 16)
        assert masked_pruned_gap(model, space, selection, pruned, x) < 1e-5
        assert type(pruned.blocks[1].ls1).__name__ == "LayerScale"  # kept: it scales the constant
        assert count_params(pruned) == analytic_cost(space, arch).params
        assert measure_macs(pruned, (1, 16, 16)) == analytic_cost(space, arch).macs


def test_dropped_sublayer_module_shapes_gradients_and_no_bias() -> None:
    value = torch.arange(4.0)
    module = DroppedSublayer(4, value, drop=0.0)
    x = torch.randn(2, 5, 3)
    out = module(x, attn_mask=None)
    assert out.shape == (2, 5, 4) and torch.equal(out[1, 2], value)
    out.sum().backward()
    assert module.value is not None and torch.equal(module.value.grad, torch.full((4,), 10.0))
    zeros = DroppedSublayer(4, None)
    assert torch.equal(zeros(x), torch.zeros(2, 5, 4)) and not list(zeros.parameters())
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        DroppedSublayer(4, torch.zeros(3))


def test_pruned_model_with_dropped_sublayers_saves_and_loads_bit_exact(tmp_path) -> None:
    model, space = _setup("vit")
    selection, chosen = _dropping_selection(space, 3)
    pruned = materialize(model, space, selection)
    name, kwargs, _ = MODEL_ZOO["vit"]
    save_pruned(pruned, tmp_path / "m", base={"name": name, "kwargs": kwargs})
    again = load_pruned(tmp_path / "m")
    for layer in chosen:
        assert isinstance(again.get_submodule(layer), DroppedSublayer)
    assert set(again.state_dict()) == set(pruned.state_dict())
    x = torch.randn(2, *input_size("vit"))
    with torch.no_grad():
        assert torch.equal(pruned.eval()(x), again.eval()(x))


def _scores(space, gen_seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(gen_seed)
    return {
        k: torch.rand(d.heads * d.max_width, generator=gen) + 0.5
        for k, d in space.without_heads().dims.items()
    }


def test_allocator_drops_a_sublayer_whose_units_score_nothing() -> None:
    model, space = _setup("vit")
    scores = _scores(space)
    scores["blocks.1.mlp:hidden"] = torch.zeros_like(scores["blocks.1.mlp:hidden"])
    for kind in ("qk", "v"):
        scores[f"blocks.0.attn:{kind}"] = torch.zeros_like(scores[f"blocks.0.attn:{kind}"])
    # the zero-scored units go first, down to 0 heads and 0 hidden units, until the budget is met
    target = float(
        analytic_cost(space, {**space.dense(), "blocks.0.attn:heads": 0, "blocks.1.mlp:hidden": 0}).macs
    )
    arch = allocate(space, scores, target)
    assert float(analytic_cost(space, arch).macs) <= target
    assert arch["blocks.1.mlp:hidden"] == 0 and arch["blocks.0.attn:heads"] == 0
    assert all(
        arch[d.label] > 0
        for d in space.dims.values()
        if d.label.startswith(("blocks.1.attn", "blocks.0.mlp"))
    )
    # without drops the same scores keep every sublayer
    kept = allocate(build_space(model, input_size("vit")).with_heads(), scores, target)
    assert all(v > 0 for v in kept.values())


def test_the_smallest_budget_drops_every_droppable_layer() -> None:
    _, space = _setup("vit")
    scores = _scores(space)
    assert set(head_scores(space, scores)) == set(space.dims)
    arch = allocate(space, scores, float(analytic_cost(space, space.smallest()).macs))
    assert all(arch[d.label] == 0 for d in space.dims.values() if d.zero)
    assert analytic_cost(space, arch).macs == analytic_cost(space, space.smallest()).macs


def test_uniform_allocation_keeps_every_sublayer_and_says_so_below_its_floor() -> None:
    _, space = _setup("vit")
    scores = _scores(space)
    dense = float(analytic_cost(space).macs)
    arch = allocate(space, scores, 0.5 * dense, mode="uniform")
    assert all(arch[d.label] > 0 for d in space.dims.values() if d.zero)
    # between the smallest architecture (everything dropped) and the uniform ratio's smallest one
    floor = {label: d.max_width if d.kind == HEADS else 1 for label, d in space.dims.items()}
    target = (
        float(analytic_cost(space, space.smallest()).macs) + float(analytic_cost(space, floor).macs)
    ) / 2
    with pytest.raises(BudgetError, match="uniform allocation, which keeps every head and sublayer"):
        allocate(space, scores, target, mode="uniform")
    assert float(analytic_cost(space, allocate(space, scores, target)).macs) <= target


def test_scoring_strategies_drop_sublayers_under_a_small_budget() -> None:
    from strategies.magnitude import Magnitude
    from strategies.taylor import Taylor

    ctx = tiny_context(budget=0.03)
    ctx.space = ctx.space.with_heads().with_drops(ctx.model)
    for strategy in (Magnitude(), Taylor()):
        result = strategy.search(ctx)
        selection = ctx.space.selection(dict(result.selection.items()))
        arch = selection.architecture()
        assert float(ctx.cost(arch).macs) <= ctx.target_macs
        assert any(arch[d.label] == 0 for d in ctx.space.dims.values() if d.zero)
        assert strategy.drops_sublayers()


def test_latency_table_times_dropped_layers_with_their_norms() -> None:
    model, space = _setup("vit")
    grid = grid_widths(space.dims["blocks.0.mlp:hidden"], 3)  # 0 and 3 kept widths, both ends
    assert len(grid) == 4 and grid[:2] == [0, 1] and grid[-1] == 96
    table = measure_table(model, space, batch_size=1, threads=1, points=2, rounds=3, warmup=0)
    for name, layer in space.layers.items():
        kind = HEADS if layer.kind == "attention" else "hidden"
        axis = table.layers[name].kinds.index(kind)
        assert table.layers[name].grids[axis][0] == 0
    assert table.smallest_ms < table.dense_ms
    arch = dict(space.dense())
    arch["blocks.0.mlp:hidden"] = 0
    arch["blocks.0.attn:heads"] = 0
    assert table.predict(space, arch) < table.predict(space, space.dense())
    # a space with drops is another table
    heads_only = build_space(model, input_size("vit")).with_heads()
    setting = {"batch_size": 1}
    assert table_key(model, space, setting) != table_key(model, heads_only, setting)


def test_reweight_sets_a_dropped_layers_constant_to_the_dense_mean() -> None:
    model, space = _setup("vit")
    arch = {**space.dense(), "blocks.0.attn:heads": 0, "blocks.1.mlp:hidden": 0}
    pruned = materialize(model, space, space.first_channels(arch))
    batches = [
        torch.randn(4, *input_size("vit"), generator=torch.Generator().manual_seed(i)) for i in range(2)
    ]
    report = reweight(model, pruned, space, batches)
    seen = []
    hook = model.blocks[0].attn.proj.register_forward_hook(
        lambda m, a, out: seen.append(out.reshape(-1, out.shape[-1]))
    )
    with torch.no_grad():
        for b in batches:
            model(b)
    hook.remove()
    mean = torch.cat(seen).double().mean(dim=0).float()
    constant = pruned.blocks[0].attn.value
    assert torch.allclose(constant, mean, atol=1e-5)
    assert report.layers["blocks.0.attn"].after <= report.layers["blocks.0.attn"].before
    assert report.layers["blocks.0.attn"].consumer == "blocks.0.attn.proj"
    errors = layer_errors(model, pruned, space, batches)
    assert errors["blocks.0.attn"] == pytest.approx(report.layers["blocks.0.attn"].after)


def test_drop_sublayers_needs_prune_heads_in_the_config() -> None:
    with pytest.raises(ValidationError, match=r"drop_sublayers=true needs prune_heads=true"):
        RunConfig.model_validate({"strategy": "taylor", "space": {"drop_sublayers": True}})
    cfg = RunConfig.model_validate(
        {"strategy": "taylor", "space": {"drop_sublayers": True, "prune_heads": True}}
    )
    assert cfg.space.drop_sublayers


def test_drop_sublayers_run_drops_a_sublayer_and_strategies_that_cannot_refuse(tmp_path, capsys) -> None:
    on = ["space.prune_heads=true", "space.drop_sublayers=true"]
    assert main(_search_args(tmp_path / "a", "budget=0.03", *on, strategy="taylor")) == 0
    result = json.loads((tmp_path / "a" / "run" / "result.json").read_text())
    arch = result["architecture"]
    assert any(v == 0 for k, v in arch.items() if k.endswith((":heads", ":hidden")))
    assert result["pruned"]["macs"] == result["pruned"]["analytic_macs"] <= 0.03 * result["dense"]["macs"]
    assert "drop_sublayers" in (tmp_path / "a" / "run" / "stages.json").read_text()
    again = load_pruned(tmp_path / "a" / "run" / "reweighted")
    assert any(isinstance(m, DroppedSublayer) for m in again.modules())
    capsys.readouterr()
    for strategy, extra in (
        ("nni_random", []),
        ("evolution", []),
        ("similarity_indicator", ["strategy_options={head_indicator: true}"]),
    ):
        folder = tmp_path / strategy
        assert main(_search_args(folder, *on, *extra, strategy=strategy)) == 2
        err = capsys.readouterr().err
        assert f"'{strategy}'" in err and "space.drop_sublayers" in err and "Traceback" not in err
        assert not (folder / "run" / "search.json").exists()
    assert main(_search_args(tmp_path / "b", "space.drop_sublayers=true", strategy="taylor")) == 2
    err = capsys.readouterr().err
    assert "space.prune_heads=true" in err and "Traceback" not in err
    assert main(_search_args(tmp_path / "c", "budget=0.6")) == 0
    assert "drop_sublayers" not in (tmp_path / "c" / "run" / "stages.json").read_text()


def test_latency_budget_run_with_drops_reports_prediction(tmp_path, capsys) -> None:
    from test_latency import _latency_args

    args = _latency_args(tmp_path, "space.prune_heads=true", "space.drop_sublayers=true")
    args[args.index("budget=0.9")] = "budget=0.5"
    assert main(args) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    record = result["latency"]
    assert record["predicted_ms"] <= record["target_ms"] * (1 + 1e-9)
    assert record["predicted_fraction"] <= 0.5 + 1e-9 and record["measured_fraction"] > 0
    assert any(v == 0 for k, v in result["architecture"].items() if k.endswith((":heads", ":hidden")))


@pytest.mark.parametrize("strategy", ["similarity_indicator", "nni_random", "evolution"])
def test_strategies_that_cannot_drop_refuse_a_space_with_drops(strategy: str) -> None:
    from nas_headprune.errors import ConfigError
    from nas_headprune.registry import make_strategy

    ctx = tiny_context(budget=0.4)
    ctx.space = ctx.space.with_heads().with_drops(ctx.model)
    options = {"head_indicator": True} if strategy == "similarity_indicator" else {}
    made = make_strategy(strategy, options)
    assert not made.drops_sublayers()
    with pytest.raises(ConfigError, match=r"space\.drop_sublayers"):
        made.search(ctx)


def test_drop_path_acts_on_the_constant_as_on_the_masked_output_in_training() -> None:
    model = _layer_scale_vit(drop_path_rate=0.5)  # whole samples' branches dropped at random in training
    space = build_space(model, (1, 16, 16)).with_heads().with_drops(model)
    selection = space.first_channels({**space.dense(), "blocks.1.attn:heads": 0, "blocks.0.mlp:hidden": 0})
    pruned = materialize(model, space, selection).train()
    model.train()
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        with space.apply_masks(model, space.masks_from_selection(selection)):
            torch.manual_seed(5)
            masked = model(x)
        torch.manual_seed(5)
        out = pruned(x)
    model.eval()
    assert (masked - out).abs().max().item() < 1e-5
