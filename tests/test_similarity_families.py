"""Channel-similarity weights (METHOD.md 3.2) on every family.

Each space adapter hands its channels' activations to the similarity_indicator strategy
(``SpaceAdapter.watch_channels``). For a tiny random model of every family and variant, the weights
are not all ones and equal a brute-force computation from activations captured independently: every
``F.linear`` call on a projection weight, caught by a ``TorchFunctionMode`` whatever module or
function makes it (BEiT, Swin V2 and EVA call ``F.linear(x, qkv.weight, bias)`` without calling the
``qkv`` submodule). The fused-qkv families the old reader covered (ViT, Swin, FLatten) keep their
weights bit for bit; dimensions that get no activations are warned about and listed.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from test_similarity_indicator import _ThreadRanks
from timm.models.eva import EvaAttention
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from zoo import FAMILY_ZOO, HF_ZOO, hf_example_inputs, make_hf_model, randomize_parameters

from nas_headprune.errors import ArchitectureError
from nas_headprune.models.factory import create_model
from nas_headprune.registry import make_strategy, space_adapters
from nas_headprune.space import HeadSpace, LayerSpace, SpaceAdapter, build_space
from nas_headprune.spaces.timm_vit import TimmAttentionAdapter, TimmMlpAdapter
from nas_headprune.strategies.similarity_indicator import (
    CHECKPOINT_NAME,
    channel_gram,
    channel_grams,
    similarity_weights,
    weights_from_gram,
)
from nas_headprune.testing import tiny_context

HAS_HF = importlib.util.find_spec("transformers") is not None


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# case -> (FAMILY_ZOO key, kwargs overriding the zoo's); every zoo family with a prunable layer
CASES: dict[str, tuple[str, dict]] = {
    **{
        key: (key, {})
        for key in FAMILY_ZOO
        if key not in ("levit", "efficientformerv2")  # nothing to prune: build_space refuses them
    },
    # the variants of tests/test_families.py: no q/v biases, a shared bias passed in
    "beit_shared_bias": (
        "beit",
        dict(qkv_bias=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True),
    ),
    "vit_relpos_table": ("vit_relpos", dict(rel_pos_type="bias", qkv_bias=True)),
    "swinv2_no_bias": ("swinv2", dict(qkv_bias=False)),
    "eva02_separate_qkv": ("eva02", dict(qkv_fused=False)),
    "eva02_half_rope": (
        "eva02",
        dict(rope_rotate_half=True, num_reg_tokens=2, qk_norm=True, swiglu_align_to=8),
    ),
    "eva_no_bias": ("eva", dict(qkv_bias=False)),
    "eva02_half_rope_pairs": ("eva02", dict(rope_rotate_half=True, num_reg_tokens=2)),
}
#: the families whose weights the reader before ``watch_channels`` computed: kept bit for bit
UNCHANGED = ("vit", "deit", "swin", "flatten_swin", "flatten_deit")

# where the brute force reads each adapter's activations: the Linear (path in the layer) whose
# F.linear outputs hold the channels, or whose inputs hold the hidden units
_FUSED = {
    "timm_attention",
    "timm_window_attention",
    "timm_relpos_attention",
    "timm_talking_head_attention",
    "timm_beit_attention",
    "timm_window_attention_v2",
    "flatten_linear_attention",
}
_SPLIT = {  # q, k, v Linears; PVTv2's kv holds the key rows, then the value rows
    "timm_class_attention": ("q", "k", "v"),
    "timm_pvt_attention": ("q", "kv", "kv"),
    "hf_bert_attention": ("self.query", "self.key", "self.value"),
    "hf_vit_attention": ("q_proj", "k_proj", "v_proj"),
}
_HIDDEN_CONSUMER = {"hf_bert_feed_forward": "output.dense"}  # default: fc2


def _case_model(case: str) -> tuple[nn.Module, HeadSpace, tuple[int, ...]]:
    key, extra = CASES[case]
    name, kwargs, size = FAMILY_ZOO[key]
    torch.manual_seed(0)
    merged = {**kwargs, **extra}
    model = create_model(name, **merged) if isinstance(name, str) else name(**merged)
    model = randomize_parameters(model.eval())
    return model, build_space(model, size, skip_unsupported=True), size


def _batches(size: tuple[int, ...], seed: int = 0, count: int = 2) -> list[tuple[Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, *size, generator=gen),) for _ in range(count)]


class _LinearCalls(TorchFunctionMode):
    """Every ``F.linear`` call on one of ``weights`` (name -> parameter): input and output, by name."""

    def __init__(self, weights: dict[str, Tensor]) -> None:
        super().__init__()
        self.names = {id(w): name for name, w in weights.items()}
        self.calls: dict[str, list[tuple[Tensor, Tensor]]] = defaultdict(list)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            w = args[1] if len(args) > 1 else kwargs["weight"]
            name = self.names.get(id(w))
            if name is not None:  # copies: a caller may add to the output in place
                self.calls[name].append((x.detach().clone(), out.detach().clone()))
        return out


def _read_at(layer: LayerSpace) -> dict[str, list[tuple[str, str, int]]]:
    """Per kind, where its activations are: ``(linear path, "out" or "in", first row / column)``."""
    name = layer.adapter.name
    if layer.kind == "mlp":
        return {"hidden": [(_HIDDEN_CONSUMER.get(name, "fc2"), "in", 0)]}
    heads = layer.dims["qk"].heads
    d_qk = layer.dims["qk"].max_width
    if name in _FUSED:
        return {
            "qk": [("qkv", "out", 0), ("qkv", "out", heads * d_qk)],
            "v": [("qkv", "out", 2 * heads * d_qk)],
        }
    if name in _SPLIT:
        q, k, v = _SPLIT[name]
        return {"qk": [(q, "out", 0), (k, "out", 0)], "v": [(v, "out", heads * d_qk if k == v else 0)]}
    if name == "timm_eva_attention":
        fused, d = layer.meta["qkv_fused"], layer.meta["head_dim"]
        spots = {"v": [("qkv", "out", 2 * heads * d) if fused else ("v_proj", "out", 0)]}
        if layer.meta["qk_unit"] == "pair":  # q/k in rotary pairs; with q/k norms one unit per head
            q, k = ("qkv", "qkv") if fused else ("q_proj", "k_proj")
            spots["qk"] = [(q, "out", 0), (k, "out", heads * d if fused else 0)]
        return spots
    raise AssertionError(f"no brute-force reading for the {name} adapter: add one here")


def _brute_force(
    model: nn.Module, space: HeadSpace, batches: list, reading: str = "redundancy"
) -> dict[str, Tensor]:
    """Weights from the activations the projections' F.linear calls produce: ``(H, d)`` per
    attention dimension, ``(m,)`` per MLP, for every dimension of width > 1."""
    modules = dict(model.named_modules())
    plan = {layer.label: _read_at(layer) for layer in space.layers.values()}
    weights = {
        f"{label}.{path}": modules[f"{label}.{path}"].weight
        for label, kinds in plan.items()
        for spots in kinds.values()
        for path, _, _ in spots
    }
    capture = _LinearCalls(weights)
    with torch.no_grad(), capture:
        for (x,) in batches:
            model(x)
    out = {}
    for label, kinds in plan.items():
        layer = space.layers[label]
        for kind, spots in kinds.items():
            d = layer.dims[kind]
            heads = 1 if layer.kind == "mlp" else d.heads
            gram = torch.zeros(heads, d.max_width, d.max_width, dtype=torch.float64)
            seen = 0
            pairs = layer.meta.get("qk_unit") == "pair" and kind == "qk"  # EVA's rotary pairs
            channels = 2 * d.max_width if pairs else d.max_width
            for path, side, start in spots:
                for x, y in capture.calls[f"{label}.{path}"]:
                    z = (x if side == "in" else y)[..., start : start + heads * channels]
                    if pairs:  # the two channels of a pair are two readings of it: (T*2, H, w)
                        layout = "(h m w)" if layer.meta["rotate_half"] else "(h w m)"
                        z = rearrange(z, f"... {layout} -> (... m) h w", h=heads, m=2)
                    else:
                        z = rearrange(z, "... (h d) -> (...) h d", h=heads)  # (T, H, d)
                    gram += channel_gram(rearrange(z, "t h d -> h d t"))
                    seen += 1
            assert seen, f"{d.label}: the brute force caught no F.linear call at {spots}"
            w = weights_from_gram(gram, reading)
            out[d.label] = w[0] if layer.kind == "mlp" else w
    return out


def _check_against_brute_force(model: nn.Module, space: HeadSpace, batches: list) -> float:
    got = similarity_weights(model, space, batches, "redundancy")
    expected = _brute_force(model, space, batches)
    for label, d in space.dims.items():
        if d.max_width == 1:  # EVA's q/k unit with q/k norms: one per head, nothing to compare
            assert torch.equal(got[label], torch.ones_like(got[label]))
            continue
        assert label in expected, f"{label}: no brute-force reading"
        assert not torch.equal(got[label], torch.ones_like(got[label])), f"{label}: all ones"
    worst = 0.0
    for label, w in expected.items():
        torch.testing.assert_close(
            got[label], w, rtol=0, atol=1e-5, msg=lambda m, label=label: f"{label}: {m}"
        )
        worst = max(worst, (got[label] - w).abs().max().item())
    return worst


@pytest.mark.parametrize("case", sorted(CASES))
def test_weights_equal_a_brute_force_from_the_projections(case: str) -> None:
    model, space, size = _case_model(case)
    _check_against_brute_force(model, space, _batches(size))


def test_gated_eva_weights_read_the_values_not_the_gate() -> None:
    """``EvaAttention(gated=True)`` (no model flag builds it): the gate rows are coupled to the value
    channels, but the weights come from the values alone."""
    model, _, size = _case_model("eva02")
    for block in model.blocks:
        dense = block.attn
        block.attn = EvaAttention(
            dense.qkv.in_features, num_heads=dense.num_heads, gated=True, scale_norm=False
        )
    model = randomize_parameters(model.eval(), seed=1)
    space = build_space(model, size)
    assert any(
        "gate.weight" == s.param
        for layer in space.layers.values()
        for s in layer.adapter.coupling(layer).get("v", [])
    )
    _check_against_brute_force(model, space, _batches(size))


@pytest.mark.skipif(not HAS_HF, reason="needs the hf extra (pip install 'nas-headprune[hf]')")
@pytest.mark.parametrize("key", sorted(HF_ZOO))
def test_hugging_face_weights_equal_a_brute_force(key: str) -> None:
    model = randomize_parameters(make_hf_model(key))
    example = hf_example_inputs(key)
    size = HF_ZOO[key][2]
    space = build_space(model, None if example is not None else size, example_inputs=example)
    gen = torch.Generator().manual_seed(0)
    if example is not None:  # token ids
        vocab = int(HF_ZOO[key][1]["vocab_size"])
        batches = [(torch.randint(1, vocab, (2, size[0]), generator=gen),) for _ in range(2)]
    else:
        batches = [(torch.randn(2, *size, generator=gen),) for _ in range(2)]
    _check_against_brute_force(model, space, batches)


def test_every_registered_adapter_hands_over_its_activations() -> None:
    lacking = [a.name for a in space_adapters() if type(a).watch_channels is SpaceAdapter.watch_channels]
    assert not lacking, f"adapters without watch_channels: {lacking}"


# ------------------------------------------------------------- the reader before watch_channels
def _legacy_similarity_weights(
    model: nn.Module, space: HeadSpace, batches: list, reading: str
) -> dict[str, Tensor]:
    """The reader before adapters handed over their activations: forward hooks on the Linears of the
    coupling graph's weight slots (rows for q/k/v, the consumer's columns for hidden units). It
    missed modules that bypass their ``qkv`` submodule; where it saw the activations, the new
    reader must give the same weights bit for bit."""
    graph = space.coupling_graph()
    taps: dict[str, list[tuple[str, bool, Tensor]]] = defaultdict(list)  # module -> (label, input?, pos)
    for label, d in space.dims.items():
        layer = space.layer_of(label)
        axis = 1 if layer.kind == "mlp" else 0
        for node in graph.successors(label):
            slot = graph.nodes[node]
            if slot["axis"] != axis or not slot["local"].endswith(".weight"):
                continue
            pos = (
                slot["offset"]
                + torch.arange(d.heads).unsqueeze(1) * slot["head_stride"]
                + torch.arange(d.max_width)
            )  # (H, d)
            taps[f"{layer.label}.{slot['local'][: -len('.weight')]}"].append((label, axis == 1, pos))
    grams: dict[str, Tensor] = {}
    modules = dict(model.named_modules())

    def hook_for(group: list[tuple[str, bool, Tensor]], on_input: bool):
        def hook(mod: nn.Module, args: tuple, out: Any = None) -> None:
            act = args[0] if on_input else out
            flat = act.reshape(-1, act.shape[-1])  # (T, F)
            for label, _, pos in group:
                g = channel_gram(rearrange(flat[:, pos], "t h d -> h d t")).cpu()
                grams[label] = grams[label] + g if label in grams else g

        return hook

    handles = []
    for name, module_taps in taps.items():
        if not isinstance(modules[name], nn.Linear):  # channels on the last axis only
            continue
        for on_input in (False, True):
            group = [t for t in module_taps if t[1] == on_input]
            if not group:
                continue
            hook = hook_for(group, on_input)
            if on_input:
                handles.append(modules[name].register_forward_pre_hook(hook))
            else:
                handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            for (x,) in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for label, d in space.dims.items():
        w = weights_from_gram(grams[label], reading) if label in grams else torch.ones(d.heads, d.max_width)
        out[label] = w[0] if space.layer_of(label).kind == "mlp" else w
    return out


@pytest.mark.parametrize("case", UNCHANGED)
def test_vit_swin_and_flatten_weights_are_unchanged_bit_for_bit(case: str) -> None:
    model, space, size = _case_model(case)
    batches = _batches(size)
    for reading in ("redundancy", "alignment"):
        new = similarity_weights(model, space, batches, reading)
        old = _legacy_similarity_weights(model, space, batches, reading)
        assert new.keys() == old.keys()
        for label in new:
            assert torch.equal(new[label], old[label]), f"{case} {reading} {label}"


# ----------------------------------------------------------------- dimensions without activations
class _BlindAttention(TimmAttentionAdapter):
    """Cannot hand over activations (the SpaceAdapter default)."""

    name = "blind_attention"

    def watch_channels(self, module, layer, sink):
        return None


class _IdleMlp(TimmMlpAdapter):
    """Hooks a module the forward never calls: nothing arrives."""

    name = "idle_mlp"

    def watch_channels(self, module, layer, sink):
        self.unused = nn.Identity()
        return [self.unused.register_forward_hook(lambda mod, args, out: sink("hidden", out))]


def _blind_context():
    ctx = tiny_context(budget=0.6)
    space = build_space(ctx.model, ctx.space.input_size, adapters=[_BlindAttention(), _IdleMlp()])
    return dataclasses.replace(ctx, space=space)


def test_dimensions_without_activations_are_warned_about_and_listed(caplog, tmp_path) -> None:
    ctx = _blind_context()
    attention = [label for label in ctx.space.dims if label.endswith((":qk", ":v"))]
    hidden = [label for label in ctx.space.dims if label.endswith(":hidden")]
    with caplog.at_level(logging.WARNING, logger="nas_headprune.strategies.similarity_indicator"):
        grams, unseen = channel_grams(ctx.model, ctx.space, ctx.calib)
    assert grams == {} and unseen == list(ctx.space.dims)
    text = caplog.text
    assert "blind_attention adapter cannot hand over channel activations" in text
    assert all(label in text for label in attention)
    assert "hooks never ran" in text and all(label in text for label in hidden)
    weights = similarity_weights(ctx.model, ctx.space, ctx.calib, "redundancy")
    assert all(torch.equal(w, torch.ones_like(w)) for w in weights.values())

    ctx.work_dir = tmp_path
    options = {"steps": 2, "calib_batches_for_similarity": 1, "checkpoint_every": 0}
    result = make_strategy("similarity_indicator", options).search(ctx)
    assert result.info["similarity_skipped"] == list(ctx.space.dims)
    # a checkpoint written before the record existed: resumed, the record unknown
    path = tmp_path / CHECKPOINT_NAME
    state = torch.load(path, weights_only=True)
    assert state["similarity_skipped"] == list(ctx.space.dims)
    del state["similarity_skipped"]
    torch.save(state, path)
    with caplog.at_level(logging.WARNING, logger="nas_headprune.strategies.similarity_indicator"):
        again = make_strategy("similarity_indicator", options).search(ctx)
    assert again.info["similarity_skipped"] is None
    assert "predates the record" in caplog.text
    assert again.selection == result.selection


def test_a_complete_space_skips_nothing() -> None:
    ctx = tiny_context(budget=0.6)
    options = {"steps": 2, "calib_batches_for_similarity": 1, "checkpoint_every": 0}
    assert make_strategy("similarity_indicator", options).search(ctx).info["similarity_skipped"] == []


def test_a_wrong_shape_from_an_adapter_is_an_error_naming_it() -> None:
    class Wrong(TimmMlpAdapter):
        name = "wrong_mlp"

        def watch_channels(self, module, layer, sink):
            return [module.fc1.register_forward_pre_hook(lambda mod, args: sink("hidden", args[0]))]

    ctx = tiny_context()
    space = build_space(ctx.model, ctx.space.input_size, adapters=[TimmAttentionAdapter(), Wrong()])
    with pytest.raises(
        ArchitectureError, match=r"blocks\.0\.mlp:hidden: the wrong_mlp adapter handed over .* shape"
    ):
        channel_grams(ctx.model, space, ctx.calib)


# ---------------------------------------------------------------------------- under torchrun
@pytest.mark.parametrize("case", ["beit", "blind"])
def test_gram_matrices_summed_over_a_split_equal_the_whole(case: str) -> None:
    """Two ranks (threads) each read half the batches and sum: the same Gram matrices and the same
    dimensions without activations as one process over all of them."""
    if case == "blind":
        ctx = _blind_context()
        model, space, size = ctx.model, ctx.space, ctx.space.input_size
    else:
        model, space, size = _case_model(case)
    batches = _batches(size, count=4)
    whole, whole_unseen = channel_grams(model, space, batches)
    ranks = _ThreadRanks(2)
    models = [copy.deepcopy(model) for _ in range(2)]  # each thread hooks its own copy

    def part(r: int):
        return channel_grams(models[r], space, batches[r::2], reduce=ranks.rank(r))

    with ThreadPoolExecutor(2) as pool:
        split = list(pool.map(part, range(2)))
    for grams, unseen in split:
        assert unseen == whole_unseen
        assert grams.keys() == whole.keys()
        for label, g in whole.items():
            torch.testing.assert_close(grams[label], g, rtol=1e-12, atol=1e-9)
