"""The attention paths of pruned models (math, SDPA, zero-padded SDPA) and the ``tie_qk_v`` option.

Every path computes the same function (pruned == masked, fused and unfused), the path is chosen at
materialisation and derived again on load, MACs counts see the kept widths only, and the tied
allocation keeps equal q/k and v widths within the budget. Speed is measured by
``benchmarks/bench_attention_paths.py`` and ``benchmarks/bench_speed.py``, never here.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import input_size, make_model

from nas_headprune.allocate import allocate, tied_groups
from nas_headprune.evaluator.cost import analytic_cost
from nas_headprune.evaluator.materialize import META_ATTR, materialize
from nas_headprune.evaluator.measure import measure_macs
from nas_headprune.evaluator.metrics import attention_paths, measure_throughput
from nas_headprune.io import load_pruned, save_pruned
from nas_headprune.registry import make_strategy
from nas_headprune.space import build_space
from nas_headprune.spaces._fused_qkv import (
    ATTENTION_PATHS,
    attend,
    attention_path,
)
from nas_headprune.spaces._fused_qkv import (
    attention_paths as paths_for,
)
from nas_headprune.strategy import validate_result
from nas_headprune.testing import run_conformance, tiny_context

DROP = nn.Dropout(0.0)


def _qkv(d_qk: int, d_v: int, batch: int = 2, heads: int = 3, tokens: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tokens, d_qk, generator=gen)
    k = torch.randn(batch, heads, tokens, d_qk, generator=gen)
    v = torch.randn(batch, heads, tokens, d_v, generator=gen)
    return q, k, v


@pytest.mark.parametrize(("d_qk", "d_v"), [(5, 3), (3, 5), (4, 4), (1, 6)])
@pytest.mark.parametrize("mask", ["none", "additive", "bool", "causal"])
def test_every_path_computes_the_same_attention(d_qk: int, d_v: int, mask: str) -> None:
    q, k, v = _qkv(d_qk, d_v)
    gen = torch.Generator().manual_seed(1)
    bias = None
    if mask == "additive":
        bias = torch.randn(1, 1, 7, 7, generator=gen)
    elif mask == "bool":
        bias = torch.rand(2, 1, 7, 7, generator=gen) > 0.3
        bias[..., 0] = True  # every query sees at least one key
    scale = 0.37  # not 1/sqrt(width): every path must use the given scale
    outs = {
        path: attend(
            q, k, v, scale, fused=True, dropout=DROP, bias=bias, is_causal=mask == "causal", path=path
        )
        for path in ATTENTION_PATHS
    }
    for path, out in outs.items():
        assert out.shape == (2, 3, 7, d_v), path
        assert (out - outs["math"]).abs().max().item() < 1e-5, path


@pytest.mark.parametrize(("d_qk", "d_v"), [(5, 3), (3, 5)])
def test_padded_path_gradients_equal_math(d_qk: int, d_v: int) -> None:
    grads = {}
    for path in ("math", "sdpa_padded"):
        q, k, v = (t.requires_grad_() for t in _qkv(d_qk, d_v))
        attend(q, k, v, 0.5, fused=True, dropout=DROP, path=path).square().sum().backward()
        grads[path] = [t.grad for t in (q, k, v)]
    for a, b in zip(grads["math"], grads["sdpa_padded"], strict=True):
        assert a is not None and b is not None and a.shape == b.shape
        assert (a - b).abs().max().item() < 1e-5


def test_path_choice() -> None:
    assert attention_path("cpu", 8, 8) == "sdpa"
    assert attention_path("cpu", 8, 7) == attention_path("cpu", 7, 8) == "sdpa_padded"
    assert attention_path("cuda", 8, 7) == "sdpa"
    assert attention_path("cpu", 8, 7, fused=False) == attention_path("cuda", 8, 8, fused=False) == "math"
    assert paths_for(8, 7) == {"cpu": "sdpa_padded", "cuda": "sdpa"}
    q, k, v = _qkv(4, 4)
    with pytest.raises(ValueError, match="unknown attention path 'flash'"):
        attend(q, k, v, 0.5, fused=True, dropout=DROP, path="flash")


def _unequal_arch(space):
    """Layer 0 keeps wider q/k than v, layer 1 wider v than q/k; MLPs pruned too."""
    arch = dict(space.dense())
    arch["blocks.0.attn:qk"], arch["blocks.0.attn:v"] = 9, 4
    arch["blocks.1.attn:qk"], arch["blocks.1.attn:v"] = 3, 10
    arch["blocks.0.mlp:hidden"] = 40
    return arch


def _selection(space, arch, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    scores = {k: torch.rand(d.heads * d.max_width, generator=gen) for k, d in space.dims.items()}
    return space.selection_from_scores(scores, space.validate(arch))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_every_path_of_a_pruned_model_equals_the_masked_model(fused: bool) -> None:
    model = make_model("vit", fused=fused)
    size = input_size("vit")
    space = build_space(model, size)
    selection = _selection(space, _unequal_arch(space))
    pruned = materialize(model, space, selection)
    expected = "sdpa_padded" if fused else "math"
    assert attention_paths(pruned, "cpu") == {"blocks.0.attn": expected, "blocks.1.attn": expected}
    x = torch.randn(3, *size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        with space.apply_masks(model, space.masks_from_selection(selection)):
            masked = model(x)
        assert (pruned(x) - masked).abs().max().item() < 1e-5
        for path in ATTENTION_PATHS:  # any path a device could choose gives the same model
            for name in ("blocks.0.attn", "blocks.1.attn"):
                pruned.get_submodule(name).attn_paths = {"cpu": path, "cuda": path}
            assert attention_paths(pruned, "cpu")["blocks.0.attn"] == (path if fused else "math")
            assert (pruned(x) - masked).abs().max().item() < 1e-5, path


@pytest.mark.parametrize("key", ["vit", "vit_bias_wide", "deit_distilled"])
def test_counted_macs_are_the_kept_widths_on_the_padded_path(key: str) -> None:
    model = make_model(key)
    size = input_size(key)
    space = build_space(model, size)
    arch = dict(space.sample(3))
    label = next(k for k in space.dims if k.endswith(":qk"))
    layer = label[: -len(":qk")]
    d = space.dims[label].max_width
    arch[label], arch[f"{layer}:v"] = d, d // 2  # at least one layer with unequal widths
    pruned = materialize(model, space, _selection(space, arch))
    assert attention_paths(pruned, "cpu")[layer] == "sdpa_padded"
    assert analytic_cost(space, arch).macs == measure_macs(pruned, size)


def test_recorded_paths_survive_save_and_load(tmp_path) -> None:
    model = make_model("vit")
    space = build_space(model, input_size("vit"))
    arch = _unequal_arch(space)
    arch["blocks.1.attn:qk"] = arch["blocks.1.attn:v"] = 6  # one padded layer, one plain
    pruned = materialize(model, space, _selection(space, arch))
    recorded = getattr(pruned, META_ATTR)["attention_paths"]
    assert recorded == {
        "blocks.0.attn": {"cpu": "sdpa_padded", "cuda": "sdpa"},
        "blocks.1.attn": {"cpu": "sdpa", "cuda": "sdpa"},
    }
    save_pruned(pruned, tmp_path / "m")
    again = load_pruned(tmp_path / "m")
    assert getattr(again, META_ATTR)["attention_paths"] == recorded
    assert attention_paths(again, "cpu") == attention_paths(pruned, "cpu")
    x = torch.randn(2, *input_size("vit"))
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))


def test_throughput_record_names_the_paths() -> None:
    model = make_model("vit")
    space = build_space(model, input_size("vit"))
    pruned = materialize(model, space, _selection(space, _unequal_arch(space)))
    result = measure_throughput({"dense": model, "pruned": pruned}, input_size("vit"), 2, warmup=0, iters=1)
    assert result["pruned"]["attention_paths"] == {"sdpa_padded": 2}
    assert "attention_paths" not in result["dense"]  # timm's own attention records no path


# --------------------------------------------------------------------------- tie_qk_v
@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("step", [1, 2])
def test_tied_allocation_keeps_equal_widths_within_budget(allocation: str, step: int) -> None:
    ctx = tiny_context(budget=0.55)
    space = ctx.space.with_step(step)
    gen = torch.Generator().manual_seed(0)
    scores = {k: torch.rand(d.heads, d.max_width, generator=gen) for k, d in space.dims.items()}
    skewed = torch.full((4, 8), 1e-3)
    skewed[:, 0] = 1.0  # one channel per head carries the q/k score: untied, q/k would shrink first
    scores["blocks.0.attn:qk"] = skewed
    untied = allocate(space, scores, ctx.target_macs, mode=allocation)
    tied = allocate(space, scores, ctx.target_macs, mode=allocation, tie_qk_v=True)
    for arch in (untied, tied):
        assert float(analytic_cost(space, arch).macs) <= ctx.target_macs
    for layer in ("blocks.0.attn", "blocks.1.attn"):
        assert tied[f"{layer}:qk"] == tied[f"{layer}:v"]
        assert tied[f"{layer}:qk"] % step == 0
    if allocation == "global":
        assert untied["blocks.0.attn:qk"] != untied["blocks.0.attn:v"]
        # the tied search still spends the budget: within one width step of every unit
        assert float(analytic_cost(space, tied).macs) > 0.9 * ctx.target_macs


def test_tied_groups() -> None:
    space = tiny_context().space
    assert tied_groups(space) == [(label,) for label in space.dims]
    assert tied_groups(space, tie_qk_v=True) == [
        ("blocks.0.attn:qk", "blocks.0.attn:v"),
        ("blocks.0.mlp:hidden",),
        ("blocks.1.attn:qk", "blocks.1.attn:v"),
        ("blocks.1.mlp:hidden",),
    ]


@pytest.mark.parametrize("strategy", ["magnitude", "taylor"])
def test_tie_option_of_scoring_strategies(strategy: str) -> None:
    ctx = tiny_context(budget=0.5)
    result = make_strategy(strategy, {"tie_qk_v": True}).search(ctx)
    selection, cost = validate_result(strategy, ctx, result)
    arch = selection.architecture()
    assert all(arch[f"{n}:qk"] == arch[f"{n}:v"] for n in ("blocks.0.attn", "blocks.1.attn"))
    assert float(cost.macs) <= ctx.target_macs
    pruned = materialize(ctx.model, ctx.space, selection)
    assert set(attention_paths(pruned, "cpu").values()) == {"sdpa"}
    assert measure_macs(pruned, ctx.space.input_size) == cost.macs


def test_tie_option_conforms() -> None:
    run_conformance("magnitude", {"tie_qk_v": True, "width_step": 2}, models=("vit",))


def test_padded_path_compiles_without_graph_breaks() -> None:
    import torch._dynamo as dynamo

    model = make_model("vit")
    space = build_space(model, input_size("vit"))
    pruned = materialize(model, space, _selection(space, _unequal_arch(space))).eval()
    x = torch.randn(2, *input_size("vit"))
    dynamo.reset()
    explained = dynamo.explain(pruned)(x)
    assert explained.graph_break_count == 0
    with torch.no_grad():
        assert (torch.compile(pruned, backend="eager")(x) - pruned(x)).abs().max().item() < 1e-6
    dynamo.reset()
