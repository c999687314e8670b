"""Analytic MACs / params == independent counts (FlopCounterMode, parameter numel)."""

from __future__ import annotations

import pytest
import torch
from zoo import input_size, make_model

from nas_headprune.errors import ArchitectureError
from nas_headprune.evaluator.cost import analytic_cost, softmax_attention_macs
from nas_headprune.evaluator.materialize import materialize
from nas_headprune.evaluator.measure import count_params, measure_macs
from nas_headprune.models.factory import create_model
from nas_headprune.space import build_space


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_dense_and_pruned_agree(zoo_key: str, fused: bool) -> None:
    model = make_model(zoo_key, fused=fused)
    size = input_size(zoo_key)
    space = build_space(model, size)
    dense = analytic_cost(space)
    assert dense.macs == measure_macs(model, size)
    assert dense.params == count_params(model)
    assert dense.flops == 2 * dense.macs
    for seed in range(4):
        arch = space.sample(seed)
        pruned = materialize(model, space, space.first_channels(arch))
        cost = analytic_cost(space, arch, validate=True)
        assert cost.macs == measure_macs(pruned, size), arch
        assert cost.params == count_params(pruned)
        assert cost.macs < dense.macs


@pytest.mark.parametrize(
    "name,kwargs,size",
    [
        ("vit_small_patch16_224", dict(img_size=64, depth=2), (3, 64, 64)),
        ("deit_small_patch16_224", dict(img_size=48, depth=1), (3, 48, 48)),
        ("swin_tiny_patch4_window7_224", dict(img_size=112, depths=(1, 1, 1, 1)), (3, 112, 112)),
    ],
)
def test_larger_models_agree(name: str, kwargs: dict, size: tuple) -> None:
    model = create_model(name, **kwargs).eval()
    space = build_space(model, size)
    assert analytic_cost(space).macs == measure_macs(model, size)
    arch = space.sample(7)
    pruned = materialize(model, space, space.first_channels(arch))
    assert analytic_cost(space, arch).macs == measure_macs(pruned, size)


def test_formula_equals_a_count_of_one_attention_layer() -> None:
    """One pruned attention layer (N=50 tokens, C=48, H=4, d_qk=3, d_v=5, the unfused path so every
    product is a counted matmul), counted by FlopCounterMode without bias adds."""
    from torch.utils.flop_counter import FlopCounterMode

    from nas_headprune.spaces.timm_vit import PrunedAttention

    n, c, h, dqk, dv = 50, 48, 4, 3, 5
    layer = PrunedAttention(c, h, dqk, dv, scale=0.25, qkv_bias=False, proj_bias=False, fused_attn=False)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        layer(torch.randn(1, n, c))
    assert softmax_attention_macs(n, n, c, c, h, dqk, dv) == counter.get_total_flops() // 2


def test_cost_is_differentiable_in_soft_widths() -> None:
    model = make_model("vit")
    space = build_space(model, input_size("vit"))
    soft = {k: torch.tensor(float(d.max_width) / 2, requires_grad=True) for k, d in space.dims.items()}
    macs = analytic_cost(space, soft).macs
    macs.backward()
    layer = space.layers["blocks.0.attn"].meta
    n, c, heads = layer["tokens"], layer["embed_dim"], 4
    # d MACs / d d_qk = 2*N*C*H + H*N*N
    assert soft["blocks.0.attn:qk"].grad.item() == pytest.approx(2 * n * c * heads + heads * n * n)
    assert soft["blocks.0.mlp:hidden"].grad.item() == pytest.approx(2 * n * c)


def test_cost_rejects_unknown_label() -> None:
    model = make_model("vit")
    space = build_space(model, input_size("vit"))
    with pytest.raises(ArchitectureError, match="unknown layer label 'head:qk'"):
        analytic_cost(space, {"head:qk": 3})
