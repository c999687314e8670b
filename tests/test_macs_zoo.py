"""MACs that are right on every model, and nothing attention-like passing silently.

One tiny random-weight model per family (``zoo.FAMILY_ZOO``), built with ``skip_unsupported=True``:
the analytic cost of the dense model and of a materialised random architecture equals the
FlopCounterMode count exactly, every attention or MLP module no adapter knows is listed in
``space.skipped`` (and refused by default), and a model left with nothing to prune is an error.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp
from torch import nn
from zoo import FAMILY_ZOO, make_family_model

from nas_headprune.errors import UnsupportedLayerError, UsageError
from nas_headprune.evaluator.cost import analytic_cost
from nas_headprune.evaluator.materialize import materialize
from nas_headprune.evaluator.measure import count_params, measure_macs, measure_macs_by_module
from nas_headprune.space import HeadSpace, build_space

# classes left dense in each family that keeps something prunable
SKIPPED = {
    "vit": set(),
    "deit": set(),
    "deit3": set(),
    "vit_reg": set(),
    "vit_swiglu": set(),
    "siglip_map": {"AttentionPoolLatent"},
    "vit_relpos": set(),
    "beit": set(),
    "eva": set(),
    "eva02": set(),  # EvaAttention (value channels) and GluMlp
    "cait": set(),
    "xcit": {"XCA"},  # its class attention is CaiT's ClassAttn
    "swin": set(),
    "swinv2": set(),
    "pvt_v2": set(),
    "pvt_v2_li": set(),
    "twins_pcpvt": {"GlobalSubSampleAttn"},
    "twins_svt": {"LocallyGroupedAttn", "GlobalSubSampleAttn"},
    "mvitv2": {"MultiScaleAttention"},
    "flatten_swin": set(),
    "flatten_deit": set(),
}
# families where nothing is left to prune: the classes the error must name
EMPTY = {
    "levit": {"Attention", "AttentionDownsample", "LevitMlp"},
    "efficientformerv2": {"Attention2d", "Attention2dDownsample", "ConvMlpWithNorm"},
}


def _size(key: str) -> tuple[int, int, int]:
    return FAMILY_ZOO[key][2]


def _skipping_build(model: nn.Module, size: tuple[int, ...]) -> HeadSpace:
    """``build_space(..., skip_unsupported=True)``; every skipped layer must come with a warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        space = build_space(model, size, skip_unsupported=True)
    warned = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    for name in space.skipped:
        assert any(m.startswith(f"leaving layer dense: {name} (") for m in warned), (name, warned)
    return space


def _classes(model: nn.Module, paths: object) -> set[str]:
    modules = dict(model.named_modules())
    return {type(modules[p]).__name__ for p in paths}  # type: ignore[attr-defined]


@pytest.mark.parametrize("key", sorted(k for k in FAMILY_ZOO if k not in EMPTY))
def test_analytic_macs_equal_counted_on_dense_and_pruned(key: str) -> None:
    model = make_family_model(key)
    size = _size(key)
    space = _skipping_build(model, size)
    assert _classes(model, space.skipped) == SKIPPED[key]
    assert space.layers
    dense = analytic_cost(space)
    assert dense.macs == measure_macs(model, size)
    assert dense.params == count_params(model)

    arch = space.sample(3)
    gen = torch.Generator().manual_seed(3)
    scores = {label: torch.rand(d.heads, d.max_width, generator=gen) for label, d in space.dims.items()}
    pruned = materialize(model, space, space.selection_from_scores(scores, arch))
    cost = analytic_cost(space, arch, validate=True)
    assert cost.macs < dense.macs
    assert cost.macs == measure_macs(pruned, size), arch
    assert cost.params == count_params(pruned)


@pytest.mark.parametrize("key", sorted(k for k, v in SKIPPED.items() if v) + sorted(EMPTY))
def test_unknown_attention_and_mlps_are_refused_by_default(key: str) -> None:
    model = make_family_model(key)
    with pytest.raises(UnsupportedLayerError, match="cannot prune these layers exactly") as err:
        build_space(model, _size(key))
    for cls in SKIPPED.get(key) or EMPTY[key]:
        assert f" ({cls}: " in str(err.value), cls


def test_skipped_layers_are_listed_outermost_and_counted_whole() -> None:
    model = make_family_model("xcit")
    space = _skipping_build(model, _size("xcit"))
    assert set(space.skipped) == {"blocks.0.attn"}  # XCA, found by its products
    assert "computes attention" in space.skipped["blocks.0.attn"]
    assert set(space.layers) == {"blocks.0.mlp", "cls_attn_blocks.0.attn", "cls_attn_blocks.0.mlp"}

    # attention pooling holds a timm Mlp: left dense with the pooling, not listed on its own
    model = make_family_model("siglip_map")
    space = _skipping_build(model, _size("siglip_map"))
    assert set(space.skipped) == {"attn_pool"}
    assert "attn_pool.mlp" not in space.layers
    assert set(space.layers) == {"blocks.0.attn", "blocks.0.mlp"}


@pytest.mark.parametrize("key", sorted(EMPTY))
def test_a_model_left_with_nothing_to_prune_is_an_error(key: str) -> None:
    model = make_family_model(key)
    cls = type(model).__name__
    with pytest.raises(UnsupportedLayerError, match=f"no prunable layers in {cls}: ") as err:
        _skipping_build(model, _size(key))
    for skipped_cls in EMPTY[key]:
        assert f" ({skipped_cls}: " in str(err.value), skipped_cls


def test_a_model_without_attention_is_an_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(1), nn.Linear(8 * 6 * 6, 4))
    with pytest.raises(UsageError, match="no prunable layers in Sequential: no module is claimed"):
        build_space(model, (3, 8, 8))


def test_attention_pooling_is_counted_without_gradient_state_leaking() -> None:
    model = make_family_model("siglip_map").train()
    size = _size("siglip_map")
    with torch.no_grad():
        macs = measure_macs(model, size)
    per_module = measure_macs_by_module(model, size)
    assert per_module[""] == macs
    # 16 patch tokens of width 48, one learned query, 2 heads of 24, MLP 48 -> 192 -> 48
    tokens, dim, hidden = 16, 48, 192
    q, kv, proj = dim * dim, tokens * dim * 2 * dim, dim * dim
    attention = 1 * tokens * (dim + dim)  # q.k^T and attn.v over all heads, one query
    assert per_module["attn_pool"] == q + kv + attention + proj + 2 * dim * hidden
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())  # the caller's mode is restored


def test_cait_is_counted() -> None:
    model = make_family_model("cait")
    size = _size("cait")
    with torch.no_grad():
        macs = measure_macs(model, size)
    per_module = measure_macs_by_module(model, size)
    assert per_module[""] == macs
    # class attention: one query (the class token) against the 16 patches and itself
    tokens, dim = 17, 48
    attn = per_module["blocks_token_only.0.attn"]
    assert attn == dim * dim + 2 * tokens * dim * dim + tokens * 2 * dim + dim * dim
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------- structural rules, small models
class _Mixer(nn.Module):
    """Softmax attention under a class name no rule matches."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, N, C) each
        return self.proj((q @ k.transpose(-2, -1)).softmax(-1) @ v)


class _CosineClassifier(nn.Module):
    """Activations times a matrix computed from a weight: a classifier, not attention."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).T


class _Net(nn.Module):
    def __init__(self, mixer: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.mixer = mixer
        self.mlp = Mlp(16, 32)
        self.head = _CosineClassifier(16, 3)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.embed(rearrange(img, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2))  # (B, 16, 4)
        x = x + self.mixer(x)
        x = x + self.mlp(x)
        return self.head(x.mean(1))


def test_attention_under_any_name_is_found_by_its_products() -> None:
    model = _Net(_Mixer(16)).eval()
    with pytest.raises(UnsupportedLayerError, match=r"mixer \(_Mixer: no space adapter knows _Mixer"):
        build_space(model, (1, 8, 8))
    space = _skipping_build(model, (1, 8, 8))
    assert set(space.skipped) == {"mixer"} and set(space.layers) == {"mlp"}
    assert analytic_cost(space).macs == measure_macs(model, (1, 8, 8))


@pytest.mark.parametrize(
    "cls", ["PositionwiseFeedForward", "BertIntermediate", "SwiGLUFFN", "GatedMlp", "GEGLU", "MLPBlock"]
)
def test_feed_forward_modules_are_refused_by_name(cls: str) -> None:
    ffn = type(cls, (nn.Sequential,), {})(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    model = _Net(ffn).eval()
    with pytest.raises(UnsupportedLayerError, match=rf"mixer \({cls}: no space adapter knows {cls}\)"):
        build_space(model, (1, 8, 8))


def test_heads_norms_and_embeddings_stay_fixed_cost() -> None:
    head = type("NormMlpClassifierHead", (nn.Sequential,), {})(nn.LayerNorm(16), nn.Linear(16, 16))
    model = _Net(head).eval()
    space = build_space(model, (1, 8, 8))  # nothing refused
    assert set(space.layers) == {"mlp"} and not space.skipped
    assert analytic_cost(space).macs == measure_macs(model, (1, 8, 8))
