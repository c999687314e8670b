"""Time to count the MACs of a ViT-B-sized model: the analytic formulas against a FlopCounterMode run.

Model: timm ``vit_base_patch16_224`` (12 blocks, 12 heads, embed 768) with random weights. The
architecture is a random head-balanced one from its space; the measured count runs on the model
materialised at that architecture, so both methods count the same network (and must agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from nas_headprune.evaluator.cost import analytic_cost
from nas_headprune.evaluator.materialize import materialize
from nas_headprune.evaluator.measure import measure_macs
from nas_headprune.evaluator.metrics import count_params
from nas_headprune.models.factory import create_model
from nas_headprune.space import Architecture, HeadSpace, build_space

SIZE = (3, 224, 224)


@dataclass
class VitB:
    model: nn.Module
    pruned: nn.Module
    space: HeadSpace
    arch: Architecture
    macs: int
    info: dict


@pytest.fixture(scope="module")
def vit_b() -> VitB:
    torch.manual_seed(0)
    model = create_model("vit_base_patch16_224").eval()  # pretrained=False: random weights
    space = build_space(model, SIZE)
    arch = space.sample(0)
    pruned = materialize(model, space, space.first_channels(arch)).eval()
    macs = int(analytic_cost(space, arch).macs)
    dense = int(analytic_cost(space).macs)
    info = dict(
        model_desc=(
            f"timm `vit_base_patch16_224` shape ({len(model.blocks)} blocks, "
            f"{model.blocks[0].attn.num_heads} heads, embed {model.embed_dim}), input 3x224x224, "
            f"{count_params(model) / 1e6:.1f}M parameters, random weights, {len(space.dims)} searchable widths"
        ),
        arch_desc=f"a random head-balanced architecture (`space.sample(0)`, {macs / dense:.3f} of the dense MACs)",
        macs=macs,
    )
    return VitB(model, pruned, space, arch, macs, info)


def _time(perf, vit_b: VitB, fn, method: str, what: str) -> None:
    """One row of the report's MACs-count table."""
    perf(fn, section="macs_count", group="macs count vit_base", method=method, what=what, **vit_b.info)


def test_build_space(perf, vit_b: VitB):
    _time(
        perf,
        vit_b,
        lambda: build_space(vit_b.model, SIZE),
        method="build_space",
        what="once per model: finds the layers and counts the fixed parts with one forward pass",
    )


def test_analytic_cost(perf, vit_b: VitB):
    assert int(analytic_cost(vit_b.space, vit_b.arch).macs) == vit_b.macs
    _time(
        perf,
        vit_b,
        lambda: analytic_cost(vit_b.space, vit_b.arch),
        method="analytic_cost",
        what="per-layer formulas at integer widths",
    )


def test_analytic_cost_differentiable(perf, vit_b: VitB):
    widths = {k: torch.tensor(float(v), requires_grad=True) for k, v in vit_b.arch.items()}
    assert float(analytic_cost(vit_b.space, widths).macs.detach()) == pytest.approx(
        vit_b.macs, rel=1e-6
    )  # float32
    _time(
        perf,
        vit_b,
        lambda: analytic_cost(vit_b.space, widths).macs.backward(),
        method="analytic_cost + backward",
        what="the same formulas on tensor widths plus the backward pass (the search's MACs penalty)",
    )


def test_measure_macs(perf, vit_b: VitB):
    assert measure_macs(vit_b.pruned, SIZE) == vit_b.macs  # two independent counts of one network
    _time(
        perf,
        vit_b,
        lambda: measure_macs(vit_b.pruned, SIZE),
        method="measure_macs",
        what="FlopCounterMode over one batch-1 forward of the materialised model",
    )
