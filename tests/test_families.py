"""Adapters for BEiT, relative-position ViTs, Swin V2, EVA / EVA02 and gated MLPs (timm 1.0.31).

For tiny random models of each family and its variants: the masked dense model equals the
materialised one over random architectures on both attention paths, analytic MACs and parameters
equal the counted ones, save/load is bit-exact, reweight scales fold where the math allows (and are
refused cleanly where it does not), a pruned Swin keeps ``set_input_size`` working, unsupported
variants are refused with a reason, and ``nas-headprune search`` runs on a new family.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from test_cli import _search_args
from test_surgery import _random_selection
from timm.models.eva import EvaAttention
from torch import nn
from zoo import FAMILY_ZOO, randomize_parameters

from nas_headprune import load_pruned, save_pruned
from nas_headprune.cli import main
from nas_headprune.errors import ArchitectureError, UnsupportedLayerError
from nas_headprune.evaluator.cost import analytic_cost
from nas_headprune.evaluator.materialize import materialize, slice_parameters
from nas_headprune.evaluator.measure import count_params, measure_macs
from nas_headprune.models.factory import create_model
from nas_headprune.scoring import parameters_by_name, reduce_coupled
from nas_headprune.space import HeadSpace, build_space

# case -> (FAMILY_ZOO key, kwargs overriding the zoo's, adapters that must claim layers)
CASES: dict[str, tuple[str, dict, set[str]]] = {
    "beit": ("beit", dict(depth=2), {"timm_beit_attention", "timm_mlp"}),
    # no q/v biases, no per-block table: one bias shared by all blocks, passed in
    "beit_shared_bias": (
        "beit",
        dict(qkv_bias=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True),
        {"timm_beit_attention"},
    ),
    "vit_relpos": ("vit_relpos", dict(depth=2), {"timm_relpos_attention"}),  # RelPosMlp bias
    "vit_relpos_table": ("vit_relpos", dict(rel_pos_type="bias", qkv_bias=True), {"timm_relpos_attention"}),
    "swinv2": ("swinv2", {}, {"timm_window_attention_v2", "timm_mlp"}),
    "swinv2_no_bias": ("swinv2", dict(qkv_bias=False), {"timm_window_attention_v2"}),
    # interleaved rotary embedding, fused qkv with q/v biases, GluMlp
    "eva02": ("eva02", dict(depth=2), {"timm_eva_attention", "timm_glu_mlp"}),
    "eva02_separate_qkv": ("eva02", dict(qkv_fused=False), {"timm_eva_attention", "timm_glu_mlp"}),
    # half-split rotary embedding, register tokens, per-head q/k norms, SwiGLU (split fc1)
    "eva02_half_rope": (
        "eva02",
        dict(rope_rotate_half=True, num_reg_tokens=2, qk_norm=True, swiglu_align_to=8),
        {"timm_eva_attention", "timm_swiglu"},
    ),
    # q/k in rotary pairs: half-split (j, j + d/2), separate projections, per-head frequencies
    "eva02_half_rope_pairs": (
        "eva02",
        dict(rope_rotate_half=True, num_reg_tokens=2),
        {"timm_eva_attention", "timm_glu_mlp"},
    ),
    "eva02_separate_half_rope": (
        "eva02",
        dict(qkv_fused=False, rope_rotate_half=True),
        {"timm_eva_attention", "timm_glu_mlp"},
    ),
    "eva02_mixed_rope": ("eva02", dict(rope_type="mixed"), {"timm_eva_attention", "timm_glu_mlp"}),
    "eva_no_bias": ("eva", dict(qkv_bias=False), {"timm_eva_attention", "timm_mlp"}),
    "vit_swiglu": ("vit_swiglu", {}, {"timm_attention", "timm_swiglu"}),
}
# (case, adapter) -> kinds whose reweight scales cannot fold (everything else must)
UNFOLDABLE = {("eva02_half_rope", "timm_eva_attention"): {"qk"}}  # a query scale after the q norm

_BUILT: dict[str, tuple[nn.Module, HeadSpace]] = {}


def _size(case: str) -> tuple[int, ...]:
    return FAMILY_ZOO[CASES[case][0]][2]


def _model(case: str) -> nn.Module:
    key, extra, _ = CASES[case]
    name, kwargs, _ = FAMILY_ZOO[key]
    torch.manual_seed(0)
    merged = {**kwargs, **extra}
    model = create_model(name, **merged) if isinstance(name, str) else name(**merged)
    return randomize_parameters(model.eval())


def _built(case: str) -> tuple[nn.Module, HeadSpace]:
    if case not in _BUILT:
        model = _model(case)
        _BUILT[case] = (model, build_space(model, _size(case)))
    return _BUILT[case]


def _with_path(model: nn.Module, fused: bool) -> nn.Module:
    out = copy.deepcopy(model)
    for m in out.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    return out


def _paths(model: nn.Module) -> list[bool]:
    return [True, False] if any(hasattr(m, "fused_attn") for m in model.modules()) else [False]


def _masked(model: nn.Module, space: HeadSpace, masks: dict, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), space.apply_masks(model, masks):
        return model(x)


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapters_claim_every_layer(case: str) -> None:
    model, space = _built(case)
    assert not space.skipped
    assert CASES[case][2] <= {layer.family for layer in space.layers.values()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_masked_equals_pruned(case: str) -> None:
    base, space = _built(case)
    x = torch.randn(2, *_size(case), generator=torch.Generator().manual_seed(1))
    for fused in _paths(base):
        model = _with_path(base, fused)
        with torch.no_grad():
            plain = model(x)
        ones = space.masks_from_selection(space.first_channels(space.dense()))
        assert (_masked(model, space, ones, x) - plain).abs().max().item() < 1e-6  # masked forward == timm's
        changed = 0.0
        for seed in range(4):
            selection = _random_selection(space, seed)
            masked = _masked(model, space, space.masks_from_selection(selection), x)
            with torch.no_grad():
                pruned = materialize(model, space, selection)(x)
            assert (masked - pruned).abs().max().item() < 1e-5, (fused, seed)
            changed = max(changed, (masked - plain).abs().max().item())
        assert changed > 1e-3  # the masks did something
        with torch.no_grad():
            assert torch.equal(model(x), plain)  # and are gone
        assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("case", sorted(CASES))
def test_soft_masks_reach_every_dimension(case: str) -> None:
    model, space = _built(case)
    masks = {
        label: torch.full(
            (d.max_width,) if space.layer_of(label).kind == "mlp" else (d.heads, d.max_width), 0.5
        ).requires_grad_()
        for label, d in space.dims.items()
    }
    with space.apply_masks(model, dict(masks)):
        model(torch.randn(2, *_size(case))).square().sum().backward()
    model.zero_grad(set_to_none=True)
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in masks.values())


def test_nested_masks_multiply_and_come_off_in_any_order() -> None:
    """The masked forward that BEiT and Swin V2 install applies every active mask set."""
    model, space = _built("beit")
    x = torch.randn(2, *_size("beit"))
    first = space.masks_from_selection(_random_selection(space, 1))
    second = space.masks_from_selection(_random_selection(space, 2))
    both = _masked(model, space, {k: first[k] * second[k] for k in first}, x)
    only_second = _masked(model, space, second, x)
    with torch.no_grad():
        plain = model(x)
        outer = space.apply_masks(model, first)
        inner = space.apply_masks(model, second)
        assert (model(x) - both).abs().max().item() < 1e-6
        outer.remove()  # the outer set first: the inner one stays on
        assert (model(x) - only_second).abs().max().item() < 1e-6
        inner.remove()
        assert torch.equal(model(x), plain)
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("case", sorted(CASES))
def test_analytic_macs_equal_measured(case: str) -> None:
    model, space = _built(case)
    size = _size(case)
    assert analytic_cost(space).macs == measure_macs(model, size)
    assert analytic_cost(space).params == count_params(model)
    for seed in (5, 6):
        selection = _random_selection(space, seed)
        pruned = materialize(model, space, selection)
        cost = analytic_cost(space, selection.architecture())
        assert cost.macs == measure_macs(pruned, size)
        assert cost.params == count_params(pruned)


@pytest.mark.parametrize(
    "case",
    [
        "beit",
        "vit_relpos",
        "swinv2",
        "eva02",
        "eva02_separate_qkv",
        "eva02_half_rope",
        "eva02_half_rope_pairs",
        "eva02_mixed_rope",
    ],
)
def test_save_load_roundtrip(case: str, tmp_path) -> None:
    model, space = _built(case)
    pruned = materialize(model, space, _random_selection(space, 7)).eval()
    save_pruned(pruned, tmp_path / "out")
    loaded = load_pruned(tmp_path / "out").eval()
    a, b = pruned.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if case.startswith("eva") and case != "eva02_half_rope":  # rotary pairs: which ones, saved
        assert "blocks.0.attn.kept_pairs" in a
    x = torch.randn(2, *_size(case))
    with torch.no_grad():
        assert torch.equal(pruned(x), loaded(x))


@pytest.mark.parametrize("case", sorted(CASES))
def test_scale_folding(case: str) -> None:
    base, space = _built(case)
    model = _with_path(base, False)
    selection = _random_selection(space, 11)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, *_size(case), generator=gen)
    for name, layer in space.layers.items():
        if layer.kind != "attention":
            continue
        for kind, d in layer.dims.items():
            scale = 0.5 + torch.rand(d.heads, d.max_width, generator=gen)
            masks = space.masks_from_selection(selection)
            if kind == "qk":
                masks[d.label + "@q"] = scale
            else:
                masks[d.label] = masks[d.label] * scale
            if kind in UNFOLDABLE.get((case, layer.family), set()):
                with pytest.raises(ArchitectureError, match=rf"{name}: .*cannot be folded"):
                    materialize(model, space, selection, scales={d.label: scale})
                continue
            folded = materialize(model, space, selection, scales={d.label: scale})
            with torch.no_grad():
                assert (_masked(model, space, masks, x) - folded(x)).abs().max().item() < 1e-5, d.label


def _gated_eva(case: str = "eva02") -> nn.Module:
    """A tiny EVA02 whose attention is gated (``EvaAttention(gated=True)``, no model flag builds it)."""
    model = _model(case)
    for block in model.blocks:
        dense = block.attn
        dim = dense.qkv.in_features
        block.attn = EvaAttention(
            dim,
            num_heads=dense.num_heads,
            gated=True,
            scale_norm=False,
            num_prefix_tokens=dense.num_prefix_tokens,
            rotate_half=dense.rotate_half,
        )
        block.attn.fused_attn = dense.fused_attn
    return randomize_parameters(model.eval(), seed=1)


@pytest.mark.parametrize("case", ["eva02", "eva02_half_rope_pairs"])  # interleaved, half-split pairs
def test_gated_eva_attention_prunes_gate_rows_with_values(case: str) -> None:
    base = _gated_eva(case)
    size = _size(case)
    space = build_space(base, size)
    layer = space.layers["blocks.0.attn"]
    assert {"gate.weight", "gate.bias"} <= {slot.param for slot in layer.adapter.coupling(layer)["v"]}
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(2))
    for fused in (True, False):
        model = _with_path(base, fused)
        for seed in range(3):
            selection = _random_selection(space, seed)
            pruned = materialize(model, space, selection)
            masked = _masked(model, space, space.masks_from_selection(selection), x)
            with torch.no_grad():
                assert (masked - pruned(x)).abs().max().item() < 1e-5
            assert analytic_cost(space, selection.architecture()).macs == measure_macs(pruned, size)


def test_eva_query_keys_are_pruned_in_rotary_pairs() -> None:
    """The ``:qk`` widths count pairs (d/2 per head); widths, ``min_width`` and the step too. A pair
    is two slots per projection: rows 2j, 2j+1 (interleaved) or j, j + d/2 (half-split)."""
    _, space = _built("eva02")
    qk = space.dims["blocks.0.attn:qk"]
    assert (qk.heads, qk.max_width) == (2, 12)  # head_dim 24: 12 pairs
    assert space.with_step(4, 2).dims["blocks.0.attn:qk"].allowed() == [4, 8, 12]
    assert space.dims["blocks.0.attn:v"].max_width == 24
    for case, members in (("eva02", [(0, 2), (1, 2)]), ("eva02_half_rope_pairs", [(0, 1), (12, 1)])):
        _, space = _built(case)
        layer = space.layers["blocks.0.attn"]
        slots = [s for s in layer.adapter.coupling(layer)["qk"] if s.param == "q_bias"]
        assert [(s.offset, s.channel_stride) for s in slots] == members
    # per-head q/k norms normalise over the whole head: its q/k block stays one unit, always kept
    _, space = _built("eva02_half_rope")
    qk = space.dims["blocks.0.attn:qk"]
    assert (qk.heads, qk.max_width) == (2, 1)
    assert space.with_step(8, 4).dims["blocks.0.attn:qk"].allowed() == [1]


def _dense_rope(model: nn.Module, batch: int | None = None) -> torch.Tensor:
    """The rotary embedding the model passes to its first block: ``(N, 2d)``, ``(H, N, 2d)`` for
    per-head (mixed) frequencies, or ``(B, 1, N, 2d)`` as after patch dropout when ``batch``."""
    rope = model.rope.get_embed()
    if getattr(model, "rope_mixed", False):
        rope = rope[0]  # (H, N, 2d): depth first
    if batch is not None:
        rope = (rope + 0.01 * torch.randn(batch, *rope.shape)).unsqueeze(1)  # (B, 1, N, 2d)
    return rope


@pytest.mark.parametrize(
    "case", ["eva02", "eva02_separate_qkv", "eva02_half_rope_pairs", "eva02_mixed_rope", "eva_no_bias"]
)
def test_pruned_eva_turns_each_kept_pair_by_its_own_frequency(case: str) -> None:
    """One attention layer, inputs large enough for the rotation to matter: masked == pruned, and
    the same module rotating the wrong pairs (the first ones) is far off."""
    base, space = _built(case)
    dense = base.blocks[0].attn
    gen = torch.Generator().manual_seed(4)
    x = 4 * torch.randn(2, dense.num_prefix_tokens + 16, dense.proj.out_features, generator=gen)
    ropes = [_dense_rope(base)] + ([] if getattr(base, "rope_mixed", False) else [_dense_rope(base, 2)])
    for fused in (True, False):
        model = _with_path(base, fused)
        attn = model.blocks[0].attn
        for seed in range(3):
            selection = _random_selection(space, seed)
            pairs = selection["blocks.0.attn:qk"]
            pruned = materialize(model, space, selection).blocks[0].attn
            assert torch.equal(pruned.kept_pairs, pairs)
            assert pruned.head_dim == 2 * pairs.shape[1]
            wrong = copy.deepcopy(pruned)
            wrong.kept_pairs.copy_(torch.arange(pairs.shape[1]).repeat(pairs.shape[0], 1))
            for rope in ropes:
                with torch.no_grad(), space.apply_masks(model, space.masks_from_selection(selection)):
                    masked = attn(x, rope=rope)
                with torch.no_grad():
                    assert (masked - pruned(x, rope=rope)).abs().max().item() < 1e-5, (fused, seed)
                    if not torch.equal(wrong.kept_pairs, pairs):
                        assert (masked - wrong(x, rope=rope)).abs().max().item() > 1e-3
                    # without a rotary embedding the pairs are plain channels
                    with space.apply_masks(model, space.masks_from_selection(selection)):
                        plain = attn(x)
                    assert (plain - pruned(x)).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", ["eva02", "eva02_separate_qkv", "eva02_half_rope_pairs"])
def test_eva_pair_scores_sum_both_channels_of_each_pair(case: str) -> None:
    """Channel-norm scoring walks the pair slots: a pair's score is the sum over its two rows."""
    model, space = _built(case)
    attn = model.blocks[0].attn
    heads, d = attn.num_heads, attn.head_dim
    scores = reduce_coupled(space, parameters_by_name(model), torch.abs)["blocks.0.attn:qk"]
    if attn.qkv is not None:
        rows = attn.qkv.weight.detach().double().abs().sum(1)  # (3*H*d,)
        per_channel = rows[: heads * d] + rows[heads * d : 2 * heads * d]
        if attn.q_bias is not None:
            per_channel = per_channel + attn.q_bias.detach().double().abs()
    else:
        per_channel = sum(
            lin.weight.detach().double().abs().sum(1)
            + (lin.bias.detach().double().abs() if lin.bias is not None else 0)
            for lin in (attn.q_proj, attn.k_proj)
        )
    per_channel = per_channel.reshape(heads, d)
    if attn.rotate_half:  # pair j: channels j and j + d/2
        expected = per_channel[:, : d // 2] + per_channel[:, d // 2 :]
    else:  # pair j: channels 2j and 2j + 1
        expected = per_channel[:, 0::2] + per_channel[:, 1::2]
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=0)


def test_eva_query_scales_fold_per_pair_and_per_channel_scales_are_refused() -> None:
    """A factor per pair multiplies both channels and commutes with the rotation: it folds (held by
    test_scale_folding). Per channel it folds only when both channels of each pair agree."""
    model, space = _built("eva02")
    layer = space.layers["blocks.0.attn"]
    qk = layer.dims["qk"]
    selection = _random_selection(space, 2)
    widths = selection.architecture().layer_widths("blocks.0.attn")
    params = {name: dict(model.get_submodule(name).named_parameters()) for name in space.layers}
    sliced = slice_parameters(space, params, selection)["blocks.0.attn"]
    per_pair = 0.5 + torch.rand(qk.heads, widths["qk"], generator=torch.Generator().manual_seed(0))
    folded = layer.adapter.fold_scales(layer, widths, sliced, {"qk": per_pair})
    same = layer.adapter.fold_scales(layer, widths, sliced, {"qk": per_pair[..., None].expand(-1, -1, 2)})
    assert folded.keys() == same.keys() and all(torch.equal(folded[k], same[k]) for k in folded)
    differing = torch.stack([per_pair, per_pair + 0.25], dim=-1)  # (H, w, 2)
    with pytest.raises(ArchitectureError, match=r"blocks\.0\.attn: .*rotary pair do not commute"):
        layer.adapter.fold_scales(layer, widths, sliced, {"qk": differing})
    per_channel = torch.ones(qk.heads, 2 * qk.max_width)  # one factor per dense channel
    with pytest.raises(
        ArchitectureError, match=r"blocks\.0\.attn:qk have shape \(2, 24\); expected \(2, 12\)"
    ):
        materialize(model, space, selection, scales={qk.label: per_channel})


@pytest.mark.parametrize("key", ["swin", "swinv2", "beit"])
def test_pruned_model_keeps_set_input_size(key: str) -> None:
    name, kwargs, size = FAMILY_ZOO[key]
    torch.manual_seed(0)
    dense = randomize_parameters(create_model(name, **kwargs).eval())
    space = build_space(dense, size)
    selection = _random_selection(space, 4)
    pruned = materialize(dense, space, selection)
    dense.set_input_size(img_size=(48, 48))  # larger windows / patch grid: tables resized
    pruned.set_input_size(img_size=(48, 48))
    windows = {tuple(m.window_size) for n, m in pruned.named_modules() if n.endswith(".attn")}
    assert windows == {(6, 6)}
    x = torch.randn(2, size[0], 48, 48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = pruned(x)
    assert (_masked(dense, space, space.masks_from_selection(selection), x) - out).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    ("key", "kwargs", "cls", "reason"),
    [
        ("eva02", dict(scale_attn_inner=True), "EvaAttention", "sub-LN"),
        ("eva02", dict(scale_mlp=True), "SwiGLU", "norm over the hidden units"),
        ("eva", dict(scale_mlp=True), "Mlp", "norm over the hidden units"),
        ("vit_relpos", dict(qk_norm=True), "RelPosAttention", "qk_norm"),
    ],
)
def test_inexact_variants_are_refused_with_a_reason(key: str, kwargs: dict, cls: str, reason: str) -> None:
    name, base_kwargs, size = FAMILY_ZOO[key]
    model = create_model(name, **{**base_kwargs, **kwargs}).eval()
    with pytest.raises(UnsupportedLayerError, match=rf"\({cls}: [^)]*{reason}"):
        build_space(model, size)


def test_shared_relpos_mlp_is_kept_whole_as_a_position_bias_generator() -> None:
    """``vit_srelpos``: the blocks' attention is claimed; the model-level ``RelPosMlp`` that computes
    the shared bias is a position-bias generator, not a feed-forward layer: no refusal, no
    ``skip_unsupported`` needed, kept whole (its inner ``Mlp`` is not pruned) and counted exactly."""
    name, kwargs, size = FAMILY_ZOO["vit_relpos"]
    model = randomize_parameters(create_model("vit_srelpos_small_patch16_224", **kwargs).eval())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left dense
        space = build_space(model, size)
    assert space.skipped == {}
    assert not [label for label in space.layers if label.startswith("shared_rel_pos")]
    assert {layer.family for layer in space.layers.values()} == {"timm_relpos_attention", "timm_mlp"}
    assert analytic_cost(space).macs == measure_macs(model, size)
    selection = _random_selection(space, 2)
    pruned = materialize(model, space, selection)
    x = torch.randn(2, *size)
    masked = _masked(model, space, space.masks_from_selection(selection), x)
    with torch.no_grad():
        assert (masked - pruned(x)).abs().max().item() < 1e-5
    assert analytic_cost(space, selection.architecture()).macs == measure_macs(pruned, size)


_TINY_KWARGS = (
    "{img_size: 8, patch_size: 2, in_chans: 1, embed_dim: 32, depth: 2, num_heads: 2, num_classes: 10}"
)


@pytest.mark.parametrize("name", ["beit_base_patch16_224", "eva02_tiny_patch14_224"])
def test_search_runs_end_to_end(name: str, tmp_path, capsys) -> None:
    args = _search_args(tmp_path, "budget=0.7", f"model.name={name}", f"model.kwargs={_TINY_KWARGS}")
    assert main(args) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["pruned"]["macs"] == result["pruned"]["analytic_macs"]
    assert result["pruned"]["macs"] <= 0.7 * result["dense"]["macs"]
    loaded = load_pruned(tmp_path / "run" / "model")
    assert count_params(loaded) == result["pruned"]["params"]
    if name.startswith("eva02"):  # q/k narrowed too: widths in rotary pairs, 8 per 16-wide head
        qk = {label: w for label, w in result["architecture"].items() if label.endswith(":qk")}
        assert qk and all(1 <= w <= 8 for w in qk.values()) and min(qk.values()) < 8, qk
        for label, width in qk.items():
            attn = loaded.get_submodule(label.removesuffix(":qk"))
            assert tuple(attn.kept_pairs.shape) == (2, width) and attn.head_dim == 2 * width
