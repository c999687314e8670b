from __future__ import annotations

import random

import networkx as nx
import pytest
import torch
from zoo import input_size, make_model

from nas_headprune.errors import ArchitectureError, UnsupportedLayerError
from nas_headprune.models.factory import create_model
from nas_headprune.space import Architecture, build_space


@pytest.fixture(scope="module")
def vit():
    model = make_model("vit")
    return model, build_space(model, input_size("vit"))


def test_vit_space_labels_and_dims(vit):
    _, space = vit
    assert list(space.layers) == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    dims = space.dims
    assert dims["blocks.0.attn:qk"].heads == 4 and dims["blocks.0.attn:qk"].max_width == 12
    assert dims["blocks.1.mlp:hidden"].heads == 1 and dims["blocks.1.mlp:hidden"].max_width == 96
    assert space.layers["blocks.0.attn"].meta["tokens"] == 50  # 7x7 patches + cls


def test_swin_window_tokens():
    model = make_model("swin")
    space = build_space(model, input_size("swin"))
    layer = space.layers["layers.0.blocks.0.attn"]
    assert layer.meta["tokens"] == 14 * 14 and layer.meta["kv_tokens"] == 49
    assert space.layers["layers.1.blocks.1.attn"].meta["tokens"] == 7 * 7


def test_validate_accepts_dense_and_rejects_bad_values(vit):
    _, space = vit
    dense = space.dense()
    assert space.validate(dense.to_dict()) == dense
    with pytest.raises(
        ArchitectureError, match=r"blocks\.0\.attn:qk = 0 is outside the allowed range \[1, 12\]"
    ):
        space.validate({**dense, "blocks.0.attn:qk": 0})
    with pytest.raises(
        ArchitectureError, match=r"blocks\.0\.attn:v = 13 is outside the allowed range \[1, 12\]"
    ):
        space.validate({**dense, "blocks.0.attn:v": 13})
    with pytest.raises(
        ArchitectureError, match=r"unknown layer label 'blocks\.9\.attn:qk'.*blocks\.0\.attn:qk"
    ):
        space.validate({**dense, "blocks.9.attn:qk": 4})
    with pytest.raises(ArchitectureError, match="must be an integer, got 2.5"):
        space.validate({**dense, "blocks.1.mlp:hidden": 2.5})
    partial = dense.to_dict()
    del partial["blocks.1.attn:v"]
    with pytest.raises(ArchitectureError, match="missing 1 dimension"):
        space.validate(partial)


def test_width_step(vit):
    _, space = vit
    stepped = space.with_step(4)
    assert stepped.dims["blocks.0.attn:qk"].allowed() == [4, 8, 12]
    with pytest.raises(ArchitectureError, match="not a multiple of the width step 4"):
        stepped.validate({**stepped.dense(), "blocks.0.attn:qk": 6})
    for seed in range(20):
        arch = stepped.sample(seed)
        assert all(arch[k] % 4 == 0 or arch[k] == d.max_width for k, d in stepped.dims.items())


def test_width_step_skips_dimensions_narrower_than_min_steps(vit):
    _, space = vit
    widths = {k: d.max_width for k, d in space.dims.items()}
    assert widths["blocks.0.attn:qk"] == 12 and widths["blocks.0.mlp:hidden"] >= 16
    stepped = space.with_step(8, min_steps=2)
    assert stepped.dims["blocks.0.attn:qk"].step == 1  # 12 < 2 x 8: every width stays allowed
    assert stepped.dims["blocks.0.attn:qk"].allowed() == list(range(1, 13))
    assert stepped.dims["blocks.0.mlp:hidden"].step == 8
    assert space.with_step(8).dims["blocks.0.attn:qk"].allowed() == [8, 12]  # min_steps 1: all step


def test_sample_is_seeded_and_valid(vit):
    _, space = vit
    a, b, c = space.sample(3), space.sample(3), space.sample(random.Random(4))
    assert a == b and isinstance(a, Architecture)
    assert a != c
    assert space.validate(a) == a
    assert hash(a) == hash(Architecture(a.to_dict()))
    assert a.diff(space.dense())  # a random architecture differs from dense somewhere


def test_unbalanced_selection_is_rejected(vit):
    _, space = vit
    rows = {label: space.first_channels(space.dense())[label] for label in space.dims}
    rows["blocks.0.attn:qk"] = [[0, 1, 2], [0, 1], [3, 4], [5, 6]]
    with pytest.raises(
        ArchitectureError, match=r"blocks\.0\.attn:qk: unbalanced selection \(head 0: 3, head 1: 2"
    ):
        space.selection(rows)
    rows["blocks.0.attn:qk"] = [[0, 12], [0, 1], [3, 4], [5, 6]]
    with pytest.raises(ArchitectureError, match=r"head 0 index 12 is outside \[0, 11\]"):
        space.selection(rows)
    rows["blocks.0.attn:qk"] = [[1, 1], [0, 1], [3, 4], [5, 6]]
    with pytest.raises(ArchitectureError, match="head 0 repeats a channel index"):
        space.selection(rows)


def test_masks_to_selection_roundtrip_and_unbalanced_masks(vit):
    _, space = vit
    # a narrowed blocks.0 query/key width, so the unbalanced mask below is a real one
    arch = space.validate({**space.sample(0), "blocks.0.attn:qk": 6})
    scores = {k: torch.rand(d.heads * d.max_width) for k, d in space.dims.items()}
    sel = space.selection_from_scores(scores, arch)
    assert sel.architecture() == arch
    assert space.selection_from_masks(space.masks_from_selection(sel)) == sel
    # each head keeps its own channels: the top-scored ones of that head
    label = "blocks.0.attn:qk"
    s = scores[label].reshape(4, 12)
    for h in range(4):
        expected = torch.sort(torch.topk(s[h], arch[label]).indices).values
        assert torch.equal(sel[label][h], expected)
    masks = space.masks_from_selection(sel)
    masks[label] = masks[label].clone()
    masks[label][0] = 1.0  # head 0 keeps all 12 channels, the others 6
    with pytest.raises(ArchitectureError, match="unbalanced selection"):
        space.selection_from_masks(masks)


def test_coupling_graph(vit):
    _, space = vit
    g = space.coupling_graph()
    assert isinstance(g, nx.DiGraph)
    qk = {g.nodes[n]["param"] for n in g.successors("blocks.0.attn:qk")}
    v = {g.nodes[n]["param"] for n in g.successors("blocks.0.attn:v")}
    hidden = {g.nodes[n]["param"] for n in g.successors("blocks.1.mlp:hidden")}
    assert qk == {"blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias"}
    assert v == {"blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight"}
    assert hidden == {"blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc1.bias", "blocks.1.mlp.fc2.weight"}
    axes = {
        (g.nodes[n]["param"], g.nodes[n]["axis"], g.nodes[n]["offset"])
        for n in g.successors("blocks.0.attn:v")
    }
    assert axes == {
        ("blocks.0.attn.qkv.weight", 0, 96),
        ("blocks.0.attn.qkv.bias", 0, 96),
        ("blocks.0.attn.proj.weight", 1, 0),
    }


def test_qk_norm_is_refused_or_skipped():
    model = create_model(
        "vit_tiny_patch16_224",
        img_size=16,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        qk_norm=True,
        num_classes=3,
    )
    with pytest.raises(UnsupportedLayerError, match=r"blocks\.0\.attn \(Attention: qk_norm"):
        build_space(model, (3, 16, 16))
    with pytest.warns(UserWarning, match=r"leaving layer dense: blocks\.0\.attn"):
        space = build_space(model, (3, 16, 16), skip_unsupported=True)
    assert "blocks.0.attn" not in space.layers and "blocks.0.mlp" in space.layers
    assert set(space.skipped) == {"blocks.0.attn", "blocks.1.attn"}


def test_unknown_attention_module_is_refused():
    class MyAttention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

    model = torch.nn.Sequential(torch.nn.Flatten(1), MyAttention())
    with pytest.raises(UnsupportedLayerError, match=r"1 \(MyAttention: no space adapter knows MyAttention\)"):
        build_space(model, (1, 2, 2))
