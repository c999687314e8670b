"""Latency budgets: the measured table, its interpolation and cache, the allocator on it, the runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import timm
import torch
from test_cli import _search_args

from nas_headprune.allocate import MACS, BudgetError, allocate
from nas_headprune.cli import main
from nas_headprune.evaluator import latency as lat
from nas_headprune.evaluator.latency import LatencyTable, grid_widths, latency_table, measure_table
from nas_headprune.space import DimSpec, build_space


def _vit() -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5
    ).eval()
    return model, build_space(model, (3, 32, 32))


@pytest.fixture(scope="module")
def vit_table() -> tuple[torch.nn.Module, object, LatencyTable]:
    model, space = _vit()
    table = measure_table(model, space, batch_size=2, threads=1, points=3, rounds=3, warmup=1)
    return model, space, table


def test_grid_widths_spread_over_the_allowed_widths_with_both_ends() -> None:
    d = DimSpec("b:qk", "qk", 2, 16, min_width=1, step=1)
    assert grid_widths(d, 5) == [1, 5, 9, 12, 16]  # indices 0, 3.75, 7.5, 11.25, 15 rounded
    assert grid_widths(d, 2) == [1, 16]
    stepped = DimSpec("b:qk", "qk", 2, 20, min_width=4, step=4)  # allowed 4, 8, 12, 16, 20
    assert grid_widths(stepped, 9) == [4, 8, 12, 16, 20]
    assert grid_widths(stepped, 3) == [4, 12, 20]
    with pytest.raises(ValueError, match="points"):
        grid_widths(d, 1)


def test_interpolation_is_exact_at_grid_points_and_multilinear_between() -> None:
    grids = [[1, 3], [2, 6]]
    values = torch.tensor([[1.0, 5.0], [3.0, 11.0]], dtype=torch.float64)
    assert lat._interpolate(grids, values, [1, 2]) == 1.0
    assert lat._interpolate(grids, values, [3, 6]) == 11.0
    # halfway along both axes: the mean of the four corners
    assert lat._interpolate(grids, values, [2, 4]) == pytest.approx((1 + 5 + 3 + 11) / 4)
    # a quarter along the second axis on the first row: 1 + 0.25 * (5 - 1)
    assert lat._interpolate(grids, values, [1, 3]) == pytest.approx(2.0)
    # outside the grid: clamped to the nearest edge
    assert lat._interpolate(grids, values, [0, 9]) == 5.0


def test_monotone_makes_every_axis_non_decreasing_and_keeps_increasing_values() -> None:
    raw = torch.tensor([[1.0, 0.5, 2.0], [0.8, 3.0, 2.5]])
    out = lat._monotone(raw)
    assert torch.equal(out, torch.tensor([[1.0, 1.0, 2.0], [1.0, 3.0, 3.0]]))
    assert torch.equal(lat._monotone(torch.arange(6.0).reshape(2, 3)), torch.arange(6.0).reshape(2, 3))


def test_table_covers_every_layer_on_its_grid_and_is_calibrated_at_both_ends(vit_table) -> None:
    _, space, table = vit_table
    assert set(table.layers) == set(space.layers)
    for name, layer in space.layers.items():
        entry = table.layers[name]
        assert entry.kinds == list(layer.dims)
        assert entry.grids == [grid_widths(d, 3) for d in layer.dims.values()]
        ms = torch.tensor(entry.ms)
        assert tuple(ms.shape) == tuple(len(g) for g in entry.grids)
        assert bool((ms > 0).all())
        for axis in range(ms.dim()):  # non-decreasing in every width
            assert bool((ms.diff(dim=axis) >= 0).all())
    assert table.predict(space, space.dense()) == pytest.approx(table.dense_ms, rel=1e-9)
    assert table.dense(space) == pytest.approx(table.dense_ms, rel=1e-9)


def _flat_layers(space, ms_per_layer: dict[str, tuple[float, float]]) -> dict[str, lat.LayerLatency]:
    """Synthetic layer tables on 2-point grids: (time at the smallest widths, time at dense)."""
    out = {}
    for name, layer in space.layers.items():
        lo, hi = ms_per_layer[name]
        grids = [[d.allowed()[0], d.max_width] for d in layer.dims.values()]
        values = torch.full([2] * len(grids), lo, dtype=torch.float64)
        values[(1,) * len(grids)] = hi
        out[name] = lat.LayerLatency(list(layer.dims), grids, values.tolist(), values.tolist())
    return out


def test_calibration_matches_the_whole_models_at_both_ends() -> None:
    _, space = _vit()
    names = list(space.layers)
    layers = _flat_layers(space, {n: (1.0, 3.0) for n in names})  # alone: sum 1*L at smallest, 3*L dense
    smallest = space.smallest()
    table = lat.calibrate(layers, space, dense_ms=20.0, smallest_ms=12.0, setting={})
    assert table.scale == pytest.approx(8.0 / (2.0 * len(names)))
    assert table.predict(space, space.dense()) == pytest.approx(20.0)
    assert table.predict(space, smallest) == pytest.approx(12.0)
    # one layer at its smallest widths saves that layer's scaled span
    one = dict(space.dense())
    one.update({d.label: d.allowed()[0] for d in space.layers[names[0]].dims.values()})
    assert table.predict(space, one) == pytest.approx(20.0 - 2.0 * table.scale)


def test_calibration_with_noisy_ends_keeps_the_layers_own_times(caplog) -> None:
    _, space = _vit()
    layers = _flat_layers(space, {n: (1.0, 3.0) for n in space.layers})
    with caplog.at_level(logging.WARNING, logger="nas_headprune.evaluator.latency"):
        table = lat.calibrate(layers, space, dense_ms=20.0, smallest_ms=21.0, setting={})
    assert table.scale == 1.0 and "did not time faster" in caplog.text
    assert table.predict(space, space.dense()) == pytest.approx(20.0)


def test_refitted_table_passes_through_dense_and_the_measured_architecture() -> None:
    _, space = _vit()
    names = list(space.layers)
    table = lat.calibrate(_flat_layers(space, {n: (1.0, 3.0) for n in names}), space, 20.0, 12.0, {})
    arch = dict(space.dense())
    arch.update({d.label: d.allowed()[0] for d in space.layers[names[0]].dims.values()})
    assert table.predict(space, arch) == pytest.approx(20.0 - 2.0 * table.scale)
    refit = table.refitted(space, arch, 0.95)
    assert refit is not None and refit.layers is table.layers and refit.dense_ms == table.dense_ms
    assert refit.predict(space, space.dense()) == pytest.approx(20.0)
    assert refit.predict(space, arch) == pytest.approx(0.95 * 20.0)
    assert refit.scale == pytest.approx(1.0 / 2.0)  # 1 ms saved where the layers' own times save 2
    assert table.predict(space, arch) == pytest.approx(20.0 - 2.0 * table.scale)  # the original is unchanged
    # two points that fix no line: no saving in the layers' own times, or no measured saving
    assert table.refitted(space, space.dense(), 0.9) is None
    assert table.refitted(space, arch, 1.0) is None and table.refitted(space, arch, 0.0) is None


def _refine_setup(monkeypatch, budget: float, true_saving: float, rounds: int = 3):
    """refine_search on synthetic tables: the "true" latency saves ``true_saving`` times what the
    calibrated table predicts, measured without noise."""
    from types import SimpleNamespace

    from nas_headprune.config import LatencyConfig
    from nas_headprune.pipeline import latency as pipeline_latency
    from nas_headprune.strategy import SearchContext

    _, space = _vit()
    table = lat.calibrate(_flat_layers(space, {n: (1.0, 3.0) for n in space.layers}), space, 20.0, 4.0, {})
    scores = {
        label: torch.rand(d.heads * d.max_width, generator=torch.Generator().manual_seed(2))
        for label, d in space.dims.items()
    }

    def search(ctx):
        arch = allocate(space, scores, ctx.budget * ctx.latency.dense_ms, cost=ctx.latency)
        return "result", space.selection_from_scores(scores, arch)

    def measured(run, pruned):  # the "pruned model" is the selection itself (materialize patched below)
        predicted = table.predict(space, pruned.architecture()) / table.dense_ms
        return {"measured_fraction": 1.0 - true_saving * (1.0 - predicted)}

    monkeypatch.setattr(pipeline_latency, "measured_fraction", measured)
    monkeypatch.setattr("nas_headprune.evaluator.materialize.materialize", lambda model, space, sel: sel)
    cfg = SimpleNamespace(budget=budget, latency=LatencyConfig(refine_rounds=rounds, refine_tolerance=0.03))
    run = SimpleNamespace(cfg=cfg, space=space, model=None, latency=table)
    ctx = SearchContext(
        model=None, space=space, budget=budget, dense_macs=1, calib=[], budget_kind="latency", latency=table
    )
    return run, ctx, search, table


def test_refinement_corrects_a_table_that_overpredicts_the_savings(monkeypatch) -> None:
    from nas_headprune.pipeline.latency import refine_search

    # the table predicts twice the savings the whole model shows: its first answer is too slow
    run, ctx, search, table = _refine_setup(monkeypatch, budget=0.7, true_saving=0.5)
    result, selection, record = refine_search(run, ctx, search)
    rounds = record["rounds"]
    assert result == "result" and rounds[0]["predicted_fraction"] <= 0.7 + 1e-9
    assert rounds[0]["measured_fraction"] > 0.7 * 1.03  # off by more than the tolerance
    # one refit makes the table exact here (the true latency is linear in the layers' times)
    assert len(rounds) == 2 and record["chosen"] == 1 and record["stopped"] == "within_tolerance"
    assert "stop_reason" not in record
    assert rounds[1]["measured_fraction"] == pytest.approx(0.7, rel=0.03)
    assert rounds[1]["scale"] == pytest.approx(0.5 * table.scale)
    assert run.latency.scale == rounds[1]["scale"] and record["table"] == run.latency.to_dict()
    assert run.latency.predict(run.space, selection.architecture()) <= 0.7 * 20.0 * (1 + 1e-9)


@pytest.mark.parametrize(
    "rounds, true_saving, stopped",
    [(0, 0.5, "rounds_spent"), (3, 0.0, "refit_failed")],  # no measured saving fixes no line
)
def test_refinement_says_why_it_stopped(monkeypatch, rounds, true_saving, stopped) -> None:
    from nas_headprune.pipeline.latency import refine_search, refinement_summary

    run, ctx, search, _ = _refine_setup(monkeypatch, budget=0.7, true_saving=true_saving, rounds=rounds)
    _, _, record = refine_search(run, ctx, search)
    assert len(record["rounds"]) == 1 and record["stopped"] == stopped
    assert ("stop_reason" in record) == (stopped == "refit_failed")
    assert refinement_summary(record) == {k: v for k, v in record.items() if k != "table"} != record
    with pytest.raises(KeyError, match="chosen"):  # a damaged search.json's record
        refinement_summary({k: v for k, v in record.items() if k != "chosen"})


def test_refinement_keeps_the_round_measured_closest_when_a_refit_cannot_reach_the_budget(
    monkeypatch, caplog
) -> None:
    from nas_headprune.pipeline.latency import refine_search

    # the whole model saves a fifth of what the table says: after the refit the budget is out of reach
    run, ctx, search, table = _refine_setup(monkeypatch, budget=0.5, true_saving=0.2)
    with caplog.at_level(logging.WARNING, logger="nas_headprune.pipeline.latency"):
        _, _, record = refine_search(run, ctx, search)
    assert len(record["rounds"]) == 1 and record["chosen"] == 0 and "refinement stops" in caplog.text
    assert record["stopped"] == "budget_unreachable" and record["stop_reason"] in caplog.text
    assert run.latency is table


def test_table_round_trips_through_json_and_damage_is_a_value_error(vit_table) -> None:
    _, space, table = vit_table
    again = LatencyTable.from_dict(json.loads(json.dumps(table.to_dict())))
    arch = space.sample(3)
    assert again.predict(space, arch) == pytest.approx(table.predict(space, arch), rel=1e-12)
    broken = table.to_dict()
    first = next(iter(broken["layers"]))
    broken["layers"][first]["ms"] = [1.0]
    with pytest.raises(ValueError, match="grid"):
        LatencyTable.from_dict(broken)
    with pytest.raises(ValueError, match="version"):
        LatencyTable.from_dict({**table.to_dict(), "version": 99})
    with pytest.raises(ValueError, match="not a latency table"):
        LatencyTable.from_dict({"version": lat.TABLE_VERSION})


def test_measuring_leaves_the_model_as_it_was(vit_table) -> None:
    model, space = _vit()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    measure_table(model, space, batch_size=1, threads=1, points=2, rounds=1, warmup=0)
    assert model.training
    assert torch.get_num_threads() == threads
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cache_is_reused_and_a_damaged_file_is_measured_again(tmp_path, monkeypatch, caplog) -> None:
    model, space = _vit()
    kwargs = dict(batch_size=1, device="cpu", threads=1, points=2, rounds=1, warmup=0, cache_dir=tmp_path)
    first, path = latency_table(model, space, **kwargs)
    assert path is not None and path.is_file() and path.parent == tmp_path
    calls = []

    def counting(*args, **kw):
        calls.append(1)
        return first

    monkeypatch.setattr(lat, "measure_table", counting)
    again, same = latency_table(model, space, **kwargs)
    assert same == path and calls == []
    assert again.to_dict() == first.to_dict()
    # another batch size is another table
    _, other = latency_table(model, space, **{**kwargs, "batch_size": 2})
    assert other != path and calls == [1]
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="nas_headprune.evaluator.latency"):
        latency_table(model, space, **kwargs)
    assert calls == [1, 1]
    assert str(path) in caplog.text and "damaged" in caplog.text
    assert json.loads(path.read_text())["version"] == lat.TABLE_VERSION  # rewritten whole
    _, none = latency_table(model, space, **{**kwargs, "cache_dir": ""})
    assert none is None


class _MlpOnly:
    """A cost model under which only MLP widths cost anything: 1 unit per hidden unit."""

    unit = "units"

    def layer(self, space, name, widths):
        return float(widths.get("mlp", 0)) if space.layers[name].kind == "mlp" else 0.0

    def total(self, space, arch):
        return sum(float(arch[d.label]) for d in space.dims.values() if d.kind == "mlp")

    def dense(self, space):
        return self.total(space, space.dense())


@pytest.mark.parametrize("mode", ["global", "uniform"])
def test_allocator_spends_a_cost_model_budget_where_the_cost_is(mode) -> None:
    _, space = _vit()
    scores = {
        label: torch.rand(d.heads * d.max_width, generator=torch.Generator().manual_seed(1))
        for label, d in space.dims.items()
    }
    cost = _MlpOnly()
    arch = allocate(space, scores, 0.5 * cost.dense(space), mode=mode, cost=cost)
    assert cost.total(space, arch) <= 0.5 * cost.dense(space)
    if mode == "global":  # narrowing attention saves nothing here, so the greedy leaves it dense
        assert all(arch[d.label] == d.max_width for d in space.dims.values() if d.kind != "mlp")
    # the default cost model is MACs: passing it changes nothing
    target = 0.5 * MACS.dense(space)
    assert allocate(space, scores, target, mode=mode) == allocate(space, scores, target, mode=mode, cost=MACS)


def test_unreachable_latency_budget_names_the_floor_in_ms(vit_table) -> None:
    _, space, table = vit_table
    scores = {label: torch.ones(d.heads * d.max_width) for label, d in space.dims.items()}
    # well below what the table predicts for the smallest architecture (the allocator's floor), so
    # the budget is out of reach whatever the timings on a busy machine were
    floor = table.total(space, space.smallest())
    with pytest.raises(BudgetError, match=r"ms .*smallest architecture.*ms"):
        allocate(space, scores, floor - 0.5 * abs(floor), cost=table)


# ------------------------------------------------------------------------------------ runs
def _latency_args(tmp_path: Path, *extra: str, strategy: str = "taylor") -> list[str]:
    return _search_args(
        tmp_path,
        # wide enough that narrowing saves time well above the timing noise (the tiny test model's
        # smallest architecture is within a few percent of its dense latency); medians of 7 rounds,
        # so a time slice lost to the other test worker does not decide the table
        "model.kwargs={img_size: 8, patch_size: 1, in_chans: 1, embed_dim: 96, depth: 2, num_heads: 2, "
        "mlp_ratio: 4, num_classes: 10}",
        "budget=0.9",
        "budget_kind=latency",
        "latency.batch_size=8",
        "latency.threads=1",
        "latency.points=2",
        "latency.rounds=7",
        "latency.check_rounds=3",
        f"latency.cache_dir={tmp_path / 'cache'}",
        *extra,
        strategy=strategy,
    )


def test_latency_budget_run_records_predicted_and_measured_latency(tmp_path, capsys) -> None:
    assert main(_latency_args(tmp_path)) == 0
    summary = json.loads(capsys.readouterr().out)
    run = tmp_path / "run"
    result = json.loads((run / "result.json").read_text())
    record = result["latency"]
    assert result["budget_kind"] == "latency"
    assert record["batch_size"] == 8 and record["device"] == "cpu" and record["threads"] == 1
    measured_table = LatencyTable.from_dict(json.loads((run / "latency_table.json").read_text()))
    # the search was refined against whole-model timings; the evaluate stage predicts with the table
    # of the round it kept, which search.json holds
    refinement = json.loads((run / "search.json").read_text())["latency_refinement"]
    table = LatencyTable.from_dict(refinement["table"])
    rounds, chosen = refinement["rounds"], refinement["chosen"]
    assert record["refinement"] == {k: v for k, v in refinement.items() if k != "table"}
    assert record["refinement"]["stopped"] in (
        "within_tolerance",
        "rounds_spent",
        "budget_unreachable",
        "refit_failed",
    )
    assert 1 <= len(rounds) <= 4 and [r["round"] for r in rounds] == list(range(len(rounds)))
    assert (rounds[0]["scale"], rounds[0]["fixed_ms"]) == (measured_table.scale, measured_table.fixed_ms)
    assert (rounds[chosen]["scale"], rounds[chosen]["fixed_ms"]) == (table.scale, table.fixed_ms)
    offs = [abs(r["measured_fraction"] / 0.9 - 1) for r in rounds]
    assert offs[chosen] == min(offs)
    assert record["predicted_fraction"] == pytest.approx(rounds[chosen]["predicted_fraction"])
    assert table.layers.keys() == measured_table.layers.keys() and table.dense_ms == measured_table.dense_ms
    assert record["table_dense_ms"] == table.dense_ms
    assert record["predicted_ms"] <= record["target_ms"] * (1 + 1e-9)
    assert record["target_ms"] == pytest.approx(0.9 * table.dense_ms)
    assert record["predicted_fraction"] == pytest.approx(record["predicted_ms"] / table.dense_ms)
    assert record["measured_fraction"] == pytest.approx(record["measured_ms"] / record["measured_dense_ms"])
    assert "predicted" in summary["latency"] and "budget 0.9" in summary["latency"]
    assert list((tmp_path / "cache").glob("*.json"))  # the table was cached
    # no MACs budget applies: the selection was checked against the latency table only
    assert result["pruned"]["macs"] <= result["dense"]["macs"]


def test_latency_run_resumes_from_its_own_table_and_refuses_other_settings(tmp_path, capsys) -> None:
    assert main(_latency_args(tmp_path)) == 0
    run = tmp_path / "run"
    (run / "result.json").unlink()  # redo the evaluate stage only
    (tmp_path / "cache").rename(tmp_path / "gone")  # the search must not need the cache again
    capsys.readouterr()
    first = json.loads((run / "search.json").read_text())["latency_refinement"]
    assert main(_latency_args(tmp_path)) == 0
    assert not (tmp_path / "cache").exists()
    again = json.loads((run / "result.json").read_text())["latency"]
    assert again["refinement"] == {k: v for k, v in first.items() if k != "table"}
    assert again["predicted_fraction"] == pytest.approx(
        first["rounds"][first["chosen"]]["predicted_fraction"]
    )
    assert "refined on" in json.loads(capsys.readouterr().out)["latency"]
    assert main(_latency_args(tmp_path, "latency.batch_size=4")) == 2
    err = capsys.readouterr().err
    assert "search" in err and "latency.batch_size" in err and "Traceback" not in err


def test_latency_run_without_refinement_predicts_with_the_measured_table(tmp_path, capsys) -> None:
    assert main(_latency_args(tmp_path, "latency.refine_rounds=0")) == 0
    run = tmp_path / "run"
    record = json.loads((run / "result.json").read_text())["latency"]
    table = LatencyTable.from_dict(json.loads((run / "latency_table.json").read_text()))
    assert record["refinement"] is None and "latency_refinement" not in json.loads(
        (run / "search.json").read_text()
    )
    assert record["predicted_ms"] <= 0.9 * table.dense_ms * (1 + 1e-9)
    assert "refined" not in json.loads(capsys.readouterr().out)["latency"]


def test_latency_budget_needs_a_scoring_strategy(tmp_path, capsys) -> None:
    assert main(_latency_args(tmp_path, strategy="similarity_indicator")) == 2
    err = capsys.readouterr().err
    assert "'similarity_indicator'" in err and "budget_kind 'latency'" in err and "macs" in err
    assert not (tmp_path / "run").exists()


def test_unreachable_latency_budget_is_a_usage_error(tmp_path, capsys) -> None:
    args = _latency_args(tmp_path, "budget=0.05")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "ms" in err and "smallest architecture" in err and "Traceback" not in err


def test_damaged_run_folder_table_is_named(tmp_path, capsys) -> None:
    assert main(_latency_args(tmp_path)) == 0
    run = tmp_path / "run"
    (run / "result.json").unlink()
    table = json.loads((run / "latency_table.json").read_text())
    table["layers"] = {}
    (run / "latency_table.json").write_text(json.dumps(table))
    capsys.readouterr()
    assert main(_latency_args(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "latency_table.json" in err and "--restart" in err and "Traceback" not in err


def test_measuring_on_a_busy_machine_warns_and_records_the_load(tmp_path, monkeypatch, caplog) -> None:
    model, space = _vit()
    monkeypatch.setattr(lat.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    with caplog.at_level(logging.WARNING, logger="nas_headprune.evaluator.latency"):
        table, path = latency_table(
            model,
            space,
            batch_size=1,
            device="cpu",
            threads=1,
            points=2,
            rounds=1,
            warmup=0,
            cache_dir=tmp_path,
        )
    assert "busy machine" in caplog.text and str(path) in caplog.text
    assert table.setting["load_average"] == 64.0
    assert json.loads(path.read_text())["setting"]["load_average"] == 64.0
