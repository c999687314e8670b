"""The adapter kit (``nas_headprune.testing.SpaceAdapterTestCase``): it passes on working adapters
(timm ViT, PVTv2, the example of docs/spaces.md), fails on broken ones, and the capabilities the
SpaceAdapter base class declares have working defaults."""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from zoo import input_size, kit_case, make_model

from nas_headprune.errors import ArchitectureError
from nas_headprune.space import LayerSpace, Slot, SpaceAdapter, build_space
from nas_headprune.spaces.flatten import FocusedLinearAttentionAdapter
from nas_headprune.spaces.timm_vit import TimmAttentionAdapter
from nas_headprune.testing import SpaceAdapterTestCase

DOC = Path(__file__).resolve().parents[1] / "docs" / "spaces.md"
KIT_METHODS = [name for name in dir(SpaceAdapterTestCase) if name.startswith("test_")]


def test_the_kit_has_one_method_per_property() -> None:
    assert KIT_METHODS == [
        "test_adapters_claim_layers",
        "test_analytic_macs_equal_measured",
        "test_masked_equals_pruned",
        "test_save_load_roundtrip",
        "test_scale_folding",
    ]


# --------------------------------------------------------------------- working adapters pass
class TestTimmViTKit(kit_case("vit")):
    """The installed timm ViT adapters (Attention and Mlp), both attention paths."""


class TestPvtKit(SpaceAdapterTestCase):
    """A new adapter pair, written out the way a plugin author would."""

    input_size = (3, 32, 32)
    expected_folds = {"timm_pvt_attention": ("qk", "v")}

    def make_model(self) -> torch.nn.Module:
        from nas_headprune.models.factory import create_model

        torch.manual_seed(0)
        return create_model(
            "pvt_v2_b0",
            embed_dims=(16, 32),
            depths=(1, 1),
            num_heads=(1, 2),
            sr_ratios=(2, 1),
            mlp_ratios=(2, 2),
            num_classes=10,
        )


# -------------------------------------------------------------------- broken adapters fail
class WrongMacsAdapter(TimmAttentionAdapter):
    """Forgets the attention matmuls in its cost formula."""

    def macs(self, layer: LayerSpace, widths: Mapping[str, Any]) -> Any:
        heads, n = layer.dims["qk"].heads, layer.meta["tokens"]
        return super().macs(layer, widths) - heads * n * n * (widths["qk"] + widths["v"])


class WrongRowsAdapter(TimmAttentionAdapter):
    """Slices each head's keys from the next head's rows (the last head's from the values)."""

    def coupling(self, layer: LayerSpace) -> dict[str, list[Slot]]:
        slots = super().coupling(layer)
        shift = layer.dims["qk"].max_width
        slots["qk"] = [
            Slot(s.param, s.axis, s.offset + shift, s.head_stride) if s.offset else s for s in slots["qk"]
        ]
        return slots


class WrongFoldAdapter(TimmAttentionAdapter):
    """Applies value scales twice."""

    def fold_scales(
        self, layer: LayerSpace, widths: dict[str, int], params: dict[str, torch.Tensor], scales: dict
    ) -> dict[str, torch.Tensor]:
        if "v" in scales:
            scales = {**scales, "v": scales["v"] * scales["v"]}
        return super().fold_scales(layer, widths, params, scales)


class LeakyMaskAdapter(TimmAttentionAdapter):
    """Installs its masks with a hook it never hands back, so they stay after removal."""

    def install_masks(self, module: torch.nn.Module, layer: LayerSpace, masks: Any) -> list:
        super().install_masks(module, layer, masks)
        return []


class _Broken(SpaceAdapterTestCase):
    input_size = input_size("vit")
    architectures = 2

    def make_model(self) -> torch.nn.Module:
        return make_model("vit")


@pytest.mark.parametrize(
    ("adapter", "method", "message"),
    [
        (WrongMacsAdapter(), "test_analytic_macs_equal_measured", "analytic MACs .* != counted"),
        (WrongRowsAdapter(), "test_masked_equals_pruned", "pruned model differs from the masked one"),
        (WrongFoldAdapter(), "test_scale_folding", "folded scales differ from the masked model"),
        (LeakyMaskAdapter(), "test_masked_equals_pruned", "differs after its masks were removed"),
    ],
    ids=["wrong-macs", "wrong-rows", "wrong-fold", "leaky-masks"],
)
def test_broken_adapters_fail_the_kit(adapter: SpaceAdapter, method: str, message: str) -> None:
    case = type("BrokenCase", (_Broken,), {"adapters": (adapter,)})()
    with pytest.raises(AssertionError, match=message):
        getattr(case, method)()


def test_an_adapter_that_claims_nothing_fails_the_kit() -> None:
    case = type("NothingCase", (_Broken,), {"adapters": (FocusedLinearAttentionAdapter(),)})()
    with pytest.raises(AssertionError, match="flatten_linear_attention claim no layer of VisionTransformer"):
        case.test_adapters_claim_layers()


def test_an_unfoldable_kind_must_raise_a_clean_error() -> None:
    class NoQueryFold(TimmAttentionAdapter):
        def fold_scales(self, layer, widths, params, scales):  # type: ignore[no-untyped-def]
            if "qk" in scales:
                raise ArchitectureError(f"{layer.label}: query scales cannot be folded here")
            return super().fold_scales(layer, widths, params, scales)

    case = type("NoQueryCase", (_Broken,), {"adapters": (NoQueryFold(),)})()
    case.test_scale_folding()  # the clean error is accepted
    case = type(
        "Pinned",
        (_Broken,),
        {"adapters": (NoQueryFold(),), "expected_folds": {"timm_attention": ("qk", "v")}},
    )()
    with pytest.raises(AssertionError, match=r"folded kinds \{'timm_attention': \['v'\]\}"):
        case.test_scale_folding()


# ------------------------------------------------------------------ the docs/spaces.md example
def _example_source() -> str:
    section = DOC.read_text().split("## Writing a space adapter", 1)[1]
    match = re.search(r"```python\n(# split_attention\.py\n.*?)```", section, re.S)
    assert match, "docs/spaces.md lost its adapter example"
    return match.group(1)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    folder = tmp_path_factory.mktemp("example")
    (folder / "split_attention.py").write_text(_example_source())
    sys.path.insert(0, str(folder))
    sys.modules.pop("split_attention", None)
    try:
        yield importlib.import_module("split_attention")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("split_attention", None)


@pytest.mark.parametrize("method", KIT_METHODS)
def test_the_docs_example_passes_the_kit(example, method: str) -> None:
    getattr(example.TestSplitAttention(), method)()


# --------------------------------------------------------------------------- capabilities
def test_capability_defaults() -> None:
    adapter = TimmAttentionAdapter()
    module = make_model("vit").blocks[0].attn
    assert adapter.attention_kind == "softmax"
    assert adapter.focused_features(module, torch.zeros(1, 50, 48)) is None
    assert adapter.call_facts(module, (torch.zeros(1, 50, 48),), {}) == {}
    assert adapter.open_submodules(module) == ()


def test_flatten_declares_linear_attention_and_its_features() -> None:
    model = make_model("flatten_swin")
    space = build_space(model, input_size("flatten_swin"))
    linear = [layer for layer in space.layers.values() if layer.adapter.attention_kind == "linear"]
    assert linear and all(layer.meta["attention"] == "linear" for layer in linear)
    softmax = [layer for layer in space.layers.values() if layer.kind == "attention" and layer not in linear]
    assert softmax and all(layer.adapter.attention_kind == "softmax" for layer in softmax)
    module = model.get_submodule(linear[0].label)
    seen = []
    hook = module.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(torch.randn(2, *input_size("flatten_swin")))
    hook.remove()
    phi_q, phi_k = linear[0].adapter.focused_features(module, seen[0])
    expected_q, expected_k, _ = module.features(seen[0])
    assert torch.equal(phi_q, expected_q) and torch.equal(phi_k, expected_k)
    assert phi_q.shape[:2] == (2, linear[0].dims["qk"].heads)
