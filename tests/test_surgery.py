"""Masked dense model == materialised model, for many random head-balanced selections."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zoo import input_size, make_model, masked_pruned_gap

from nas_headprune.errors import ArchitectureError
from nas_headprune.evaluator.materialize import materialize
from nas_headprune.space import build_space

_CACHE: dict = {}


def _setup(key: str, fused: bool):
    if (key, fused) not in _CACHE:
        model = make_model(key, fused=fused)
        _CACHE[(key, fused)] = (model, build_space(model, input_size(key)))
    return _CACHE[(key, fused)]


def _random_selection(space, seed: int):
    gen = torch.Generator().manual_seed(seed)
    arch = space.sample(seed)
    scores = {k: torch.rand(d.heads * d.max_width, generator=gen) for k, d in space.dims.items()}
    return space.selection_from_scores(scores, arch)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize(
    "key", ["vit", "vit_bias_wide", "deit_distilled", "swin", "flatten_swin", "flatten_deit"]
)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1))
def test_pruned_equals_masked(key: str, fused: bool, seed: int) -> None:
    model, space = _setup(key, fused)
    selection = _random_selection(space, seed)
    pruned = materialize(model, space, selection)
    x = torch.randn(2, *input_size(key), generator=torch.Generator().manual_seed(seed))
    assert masked_pruned_gap(model, space, selection, pruned, x) < 1e-5
    # the pruned modules are physically smaller, with the right head counts and widths
    arch = selection.architecture()
    for name in space.layers:
        module = pruned.get_submodule(name)
        widths = arch.layer_widths(name)
        if "qk" in widths:
            assert module.num_heads == space.dims[f"{name}:qk"].heads
            assert (module.head_dim_qk, module.head_dim_v) == (widths["qk"], widths["v"])
            assert module.qkv.out_features == module.num_heads * (2 * widths["qk"] + widths["v"])
            assert module.proj.in_features == module.num_heads * widths["v"]
        else:
            assert module.fc1.out_features == widths["hidden"] == module.fc2.in_features


def test_input_model_is_not_modified() -> None:
    model, space = _setup("vit", True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    materialize(model, space, _random_selection(space, 1))
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_masks_are_removed() -> None:
    model, space = _setup("swin", False)
    x = torch.randn(1, *input_size("swin"))
    with torch.no_grad():
        plain = model(x)
        with space.apply_masks(model, space.masks_from_selection(_random_selection(space, 2))):
            masked = model(x)
        again = model(x)
    assert not torch.allclose(plain, masked)
    assert torch.equal(plain, again)


def test_soft_masks_are_differentiable() -> None:
    model, space = _setup("vit", True)
    masks = {
        k: torch.full(
            (d.heads, d.max_width) if d.heads > 1 or k.endswith(("qk", "v")) else (d.max_width,),
            0.5,
            requires_grad=True,
        )
        for k, d in space.dims.items()
    }
    with space.apply_masks(model, dict(masks)):
        model(torch.randn(2, *input_size("vit"))).sum().backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in masks.values())
    model.zero_grad(set_to_none=True)


def test_dense_selection_is_identity() -> None:
    model, space = _setup("swin", True)
    pruned = materialize(model, space, space.first_channels(space.dense()))
    x = torch.randn(2, *input_size("swin"))
    with torch.no_grad():
        assert (model(x) - pruned(x)).abs().max().item() < 1e-5


def test_materialize_rejects_bad_selection() -> None:
    model, space = _setup("vit", True)
    rows = {k: v for k, v in space.first_channels(space.dense()).items()}
    rows["blocks.1.attn:v"] = [[0, 1], [0, 1, 2], [0, 1], [0, 1]]
    with pytest.raises(ArchitectureError, match=r"blocks\.1\.attn:v: unbalanced selection"):
        materialize(model, space, rows)
    rows = {k: v for k, v in space.first_channels(space.dense()).items()}
    rows["blocks.7.mlp:hidden"] = [0]
    with pytest.raises(ArchitectureError, match=r"unknown layer label 'blocks\.7\.mlp:hidden'"):
        materialize(model, space, rows)


@pytest.mark.parametrize("key", ["vit", "swin", "flatten_swin", "flatten_deit"])
def test_folded_scales_equal_unfolded(key: str) -> None:
    model, space = _setup(key, False)
    selection = _random_selection(space, 11)
    gen = torch.Generator().manual_seed(3)
    scales = {}
    masks = space.masks_from_selection(selection)
    for label, d in space.dims.items():
        if label.endswith((":qk", ":v")):
            scales[label] = 0.5 + torch.rand(d.heads, d.max_width, generator=gen)
    for label, s in scales.items():
        if label.endswith(":qk"):
            masks[label + "@q"] = s
        else:
            masks[label] = masks[label] * s
    pruned = materialize(model, space, selection, scales=scales)
    x = torch.randn(2, *input_size(key), generator=gen)
    with torch.no_grad():
        with space.apply_masks(model, masks):
            unfolded = model(x)
        folded = pruned(x)
        plain = materialize(model, space, selection)(x)
    assert (unfolded - folded).abs().max().item() < 1e-5
    assert (plain - folded).abs().max().item() > 1e-3  # the scales really did something
