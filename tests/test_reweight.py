"""Reweighting after surgery: least-squares refit and folded scales bring a pruned model's layer
outputs back towards the dense model's, on a ViT trained a little on scikit-learn digits."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from sklearn.datasets import load_digits
from zoo import input_size, make_model

from nas_headprune.errors import UsageError
from nas_headprune.evaluator.materialize import materialize
from nas_headprune.evaluator.reweight import (
    ReweightConfig,
    block_output_error,
    consumers,
    layer_errors,
    reweight,
)
from nas_headprune.models.factory import create_model
from nas_headprune.scoring import reduce_coupled
from nas_headprune.space import build_space

log = logging.getLogger(__name__)


# its module fixtures are built once: the whole module runs on one worker under -n 2
pytestmark = pytest.mark.xdist_group("reweight")


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    x = (x / 16.0 - 0.3) / 0.4  # roughly zero mean, unit spread
    return x, torch.tensor(data.target)


def _half_selection(model: torch.nn.Module, space):
    """Head-balanced magnitude pruning to half of every width (L1 norm of the coupled weights)."""
    scores = reduce_coupled(space, dict(model.named_parameters()), torch.abs)
    arch = {label: max(1, d.max_width // 2) for label, d in space.dims.items()}
    return space.selection_from_scores(scores, arch)


@pytest.fixture(scope="module")
def vit() -> dict:
    """A tiny ViT trained ~1.5 s on digits, its space, a 50% magnitude selection and data splits."""
    x, y = _digits()
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=gen)
    train, held = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = create_model(
        "vit_tiny_patch16_224",
        img_size=8,
        patch_size=2,
        in_chans=1,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2,
        num_classes=10,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    for _ in range(200):
        idx = train[torch.randint(len(train), (128,), generator=gen)]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        acc = (model(x[held]).argmax(1) == y[held]).float().mean().item()
    assert acc > 0.7, f"the fixture model did not learn digits (held-out accuracy {acc:.3f})"
    space = build_space(model, (1, 8, 8))
    return {
        "model": model,
        "space": space,
        "selection": _half_selection(model, space),
        "calib": [(x[train[i : i + 128]], y[train[i : i + 128]]) for i in range(0, 512, 128)],
        "held": [(x[held[i : i + 200]], y[held[i : i + 200]]) for i in range(0, len(held), 200)],
        "acc": acc,
    }


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _logit_mse(dense: torch.nn.Module, pruned: torch.nn.Module, batches) -> float:
    with torch.no_grad():
        return sum(F.mse_loss(pruned(b[0]), dense(b[0])).item() for b in batches) / len(batches)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_lstsq_lowers_block_and_logit_error(vit: dict) -> None:
    dense, space, held = vit["model"], vit["space"], vit["held"]
    pruned = materialize(dense, space, vit["selection"])
    err_before = block_output_error(dense, pruned, space, held)
    mse_before = _logit_mse(dense, pruned, held)
    report = reweight(dense, pruned, space, vit["calib"], ReweightConfig(mode="lstsq"))
    err_after = block_output_error(dense, pruned, space, held)
    mse_after = _logit_mse(dense, pruned, held)
    log.info(
        "lstsq held-out: block error %.4f -> %.4f, logit MSE %.4f -> %.4f",
        err_before,
        err_after,
        mse_before,
        mse_after,
    )
    assert err_before > 0.1  # pruning to half really hurts the layers
    assert err_after < 0.5 * err_before  # measured 0.47 -> 0.14
    assert mse_after <= mse_before  # measured 2.10 -> 0.48
    # the report measures the calibration images and agrees with the helper
    assert report.mean_before == pytest.approx(
        block_output_error(dense, materialize(dense, space, vit["selection"]), space, vit["calib"]), rel=1e-6
    )
    assert report.mean_after == pytest.approx(
        block_output_error(dense, pruned, space, vit["calib"]), rel=1e-6
    )
    # sequential refit: every layer ends better than it started
    assert all(r.after < r.before for r in report.layers.values()), report.to_dict()
    # the pruned architecture is unchanged: only the consumers' values moved
    assert {k: v.shape for k, v in pruned.state_dict().items()} == {
        k: v.shape for k, v in materialize(dense, space, vit["selection"]).state_dict().items()
    }


@pytest.mark.parametrize("mode", ["scales", "lstsq+scales"])
def test_scales_lower_error(vit: dict, mode: str) -> None:
    dense, space, held = vit["model"], vit["space"], vit["held"]
    pruned = materialize(dense, space, vit["selection"])
    untouched = _state(pruned)
    before = block_output_error(dense, pruned, space, held)
    report = reweight(
        dense, pruned, space, vit["calib"], ReweightConfig(mode=mode, scale_steps=60, scale_lr=2e-2)
    )
    after = block_output_error(dense, pruned, space, held)
    log.info("%s held-out: block error %.4f -> %.4f", mode, before, after)
    assert report.scales_kept is True
    assert after < 0.85 * before  # measured 0.47 -> 0.30 (scales), 0.14 (lstsq+scales)
    assert report.mean_after < report.mean_before
    if mode == "scales":
        # scales were folded into the consumers' weight columns only: qkv, fc1 and biases unchanged
        names = set(consumers(space).values())
        for key, value in pruned.state_dict().items():
            module, _, kind = key.rpartition(".")
            changed = not torch.equal(value, untouched[key])
            assert changed == (module in names and kind == "weight"), key
            if changed:
                ratio = value / untouched[key]  # (C_out, k): one factor per input column
                assert torch.allclose(ratio, ratio[:1].expand_as(ratio), rtol=1e-4, atol=1e-6)
    assert _hook_count(pruned) == 0


def test_none_changes_nothing(vit: dict) -> None:
    dense, space = vit["model"], vit["space"]
    pruned = materialize(dense, space, vit["selection"])
    before = _state(pruned)
    report = reweight(dense, pruned, space, vit["calib"], ReweightConfig(mode="none"))
    after = pruned.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert report.mean_before == report.mean_after > 0.1


@pytest.mark.parametrize("mode", ["lstsq", "scales"])
def test_dense_model_is_untouched(vit: dict, mode: str) -> None:
    dense, space = vit["model"], vit["space"]
    pruned = materialize(dense, space, vit["selection"])
    before = _state(dense)
    grads = [p.requires_grad for p in dense.parameters()]
    dense.train()  # reweight runs it in eval mode and must give the flag back
    try:
        reweight(dense, pruned, space, vit["calib"][:2], ReweightConfig(mode=mode, scale_steps=5))
        assert all(m.training for m in dense.modules())
    finally:
        dense.eval()
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    assert [p.requires_grad for p in dense.parameters()] == grads
    assert all(p.grad is None for p in dense.parameters())
    assert _hook_count(dense) == 0 and _hook_count(pruned) == 0
    with pytest.raises(UsageError, match="in place"):
        reweight(dense, dense, space, vit["calib"])


def test_dense_selection_has_near_zero_error(vit: dict) -> None:
    dense, space = vit["model"], vit["space"]
    pruned = materialize(dense, space, space.first_channels(space.dense()))
    report = reweight(dense, pruned, space, vit["calib"], ReweightConfig(mode="lstsq+scales", scale_steps=10))
    log.info("dense selection: %.3g -> %.3g", report.mean_before, report.mean_after)
    assert report.mean_before < 1e-5
    assert report.mean_after < 1e-4
    assert block_output_error(dense, pruned, space, vit["held"]) < 1e-4


def test_rank_deficient_inputs(vit: dict) -> None:
    """Dead kept channels make X^T X singular; without damping the SVD solver still gives a fit."""
    dense, space = vit["model"], vit["space"]
    pruned = materialize(dense, space, vit["selection"])
    mlp = pruned.get_submodule("blocks.0.mlp")
    with torch.no_grad():  # GELU(0) = 0: fc2's first four input columns are always zero
        mlp.fc1.weight[:4] = 0
        mlp.fc1.bias[:4] = 0
    report = reweight(dense, pruned, space, vit["calib"], ReweightConfig(mode="lstsq", ridge=0.0))
    assert all(torch.isfinite(p).all() for p in pruned.parameters())
    assert report.layers["blocks.0.mlp"].after < report.layers["blocks.0.mlp"].before
    assert report.mean_after < 0.5 * report.mean_before


def test_token_subsampling(vit: dict) -> None:
    dense, space = vit["model"], vit["space"]
    pruned = materialize(dense, space, vit["selection"])
    report = reweight(dense, pruned, space, vit["calib"], ReweightConfig(mode="lstsq", max_tokens=600))
    assert 600 <= report.tokens <= 600 + len(vit["calib"])  # rounded up per batch
    assert block_output_error(dense, pruned, space, vit["held"]) < 0.5 * report.mean_before


def test_swin() -> None:
    dense = make_model("swin")
    space = build_space(dense, input_size("swin"))
    x, _ = _digits()
    x = F.interpolate(x[:192], size=input_size("swin")[1:], mode="bilinear", align_corners=False)
    calib, held = [(x[:64], None), (x[64:128], None)], [(x[128:], None)]
    selection = _half_selection(dense, space)
    errors = {}
    for mode in ("lstsq", "scales"):
        pruned = materialize(dense, space, selection)
        before = block_output_error(dense, pruned, space, held)
        report = reweight(
            dense, pruned, space, calib, ReweightConfig(mode=mode, scale_steps=20, scale_lr=4e-2)
        )
        errors[mode] = (before, block_output_error(dense, pruned, space, held))
        assert list(report.layers) == list(space.layers)
    log.info("swin held-out errors: %s", errors)
    assert errors["lstsq"][1] < 0.6 * errors["lstsq"][0]
    assert errors["scales"][1] < errors["scales"][0]


def test_report_and_config(vit: dict) -> None:
    dense, space = vit["model"], vit["space"]
    assert consumers(space) == {
        "blocks.0.attn": "blocks.0.attn.proj",
        "blocks.0.mlp": "blocks.0.mlp.fc2",
        "blocks.1.attn": "blocks.1.attn.proj",
        "blocks.1.mlp": "blocks.1.mlp.fc2",
    }
    pruned = materialize(dense, space, vit["selection"])
    per_layer = layer_errors(dense, pruned, space, vit["calib"])
    report = reweight(dense, pruned, space, vit["calib"])
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["mode"] == "lstsq" and list(as_dict["layers"]) == list(space.layers)
    assert as_dict["layers"]["blocks.1.mlp"]["consumer"] == "blocks.1.mlp.fc2"
    assert as_dict["layers"]["blocks.0.attn"]["before"] == pytest.approx(per_layer["blocks.0.attn"])
    assert as_dict["mean_after"] < as_dict["mean_before"]
    with pytest.raises(ValidationError, match="extra"):
        ReweightConfig(mode="lstsq", ridg=1.0)
    with pytest.raises(ValidationError):
        ReweightConfig(mode="ls")
    with pytest.raises(UsageError, match="calibration"):
        reweight(dense, pruned, space, [])
