from __future__ import annotations

import json

import pytest
import torch
from zoo import input_size, make_model

from nas_headprune import load_pruned, save_pruned
from nas_headprune.errors import CheckpointError, UsageError
from nas_headprune.evaluator.materialize import materialize
from nas_headprune.space import build_space


@pytest.fixture(params=["vit", "swin"])
def saved(request, tmp_path):
    key = request.param
    model = make_model(key)
    space = build_space(model, input_size(key))
    gen = torch.Generator().manual_seed(5)
    arch = space.sample(5)
    scores = {k: torch.rand(d.heads * d.max_width, generator=gen) for k, d in space.dims.items()}
    pruned = materialize(model, space, space.selection_from_scores(scores, arch)).eval()
    save_pruned(pruned, tmp_path / "out")
    return key, pruned, tmp_path / "out"


def test_roundtrip_is_bit_exact(saved) -> None:
    key, pruned, path = saved
    loaded = load_pruned(path).eval()
    a, b = pruned.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, *input_size(key))
    with torch.no_grad():
        assert torch.equal(pruned(x), loaded(x))
    files = sorted(p.name for p in path.iterdir())
    assert files == ["model.safetensors", "pruned.json"]


def test_corrupt_weights(saved) -> None:
    _, _, path = saved
    (path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        load_pruned(path)


def test_corrupt_json(saved) -> None:
    _, _, path = saved
    (path / "pruned.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="pruned.json is not valid JSON"):
        load_pruned(path)


def test_foreign_json(saved) -> None:
    _, _, path = saved
    (path / "pruned.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not a nas-headprune pruned model"):
        load_pruned(path)


def test_architecture_does_not_fit(saved) -> None:
    _, _, path = saved
    record = json.loads((path / "pruned.json").read_text())
    label = next(iter(record["architecture"]))
    record["architecture"][label] = 10_000
    (path / "pruned.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=f"does not fit model.*{label} = 10000 is outside"):
        load_pruned(path)


def test_weights_do_not_match_architecture(saved) -> None:
    _, _, path = saved
    record = json.loads((path / "pruned.json").read_text())
    label = next(k for k, v in record["architecture"].items() if v > 1)
    record["architecture"][label] -= 1
    (path / "pruned.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="does not match architecture in pruned.json: shape mismatch"):
        load_pruned(path)


def test_missing_dir(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="pruned.json is missing"):
        load_pruned(tmp_path)


def test_save_needs_a_pruned_model(tmp_path) -> None:
    with pytest.raises(UsageError, match="needs a model returned by materialize"):
        save_pruned(make_model("vit"), tmp_path)


def test_roundtrip_with_explicit_query_scales(tmp_path) -> None:
    # linear attention keeps query reweight scales as a parameter (q_gamma); they must survive
    model = make_model("flatten_swin")
    space = build_space(model, input_size("flatten_swin"))
    arch = space.sample(2)
    gen = torch.Generator().manual_seed(2)
    scores = {k: torch.rand(d.heads * d.max_width, generator=gen) for k, d in space.dims.items()}
    scales = {
        k: 0.5 + torch.rand(d.heads, d.max_width, generator=gen)
        for k, d in space.dims.items()
        if not k.endswith(":hidden")
    }
    pruned = materialize(model, space, space.selection_from_scores(scores, arch), scales=scales).eval()
    assert any(getattr(m, "q_gamma", None) is not None for m in pruned.modules())
    save_pruned(pruned, tmp_path / "m")
    loaded = load_pruned(tmp_path / "m").eval()
    x = torch.randn(2, *input_size("flatten_swin"))
    with torch.no_grad():
        assert torch.equal(pruned(x), loaded(x))
