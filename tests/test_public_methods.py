"""A pruned model keeps the dense model's public methods that still make sense: forward_intermediates
equals the masked dense model's, and reset_classifier gives a working new head."""

from __future__ import annotations

import pytest
import torch
from zoo import input_size, make_model

from nas_headprune import build_space, materialize


@pytest.mark.parametrize("key", ["vit", "swin", "flatten_swin"])
def test_forward_intermediates_and_reset_classifier_survive_pruning(key: str) -> None:
    model = make_model(key)
    size = input_size(key)
    space = build_space(model, size)
    gen = torch.Generator().manual_seed(0)
    scores = {label: torch.rand(d.heads * d.max_width, generator=gen) for label, d in space.dims.items()}
    selection = space.selection_from_scores(scores, space.sample(0))
    pruned = materialize(model, space, selection).eval()
    x = torch.randn(2, *size, generator=gen)
    with space.apply_masks(model, space.masks_from_selection(selection)):
        final_ref, inter_ref = model.forward_intermediates(x)
    final, inter = pruned.forward_intermediates(x)
    torch.testing.assert_close(final, final_ref, atol=1e-5, rtol=1e-5)
    assert len(inter) == len(inter_ref)
    for got, ref in zip(inter, inter_ref, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    pruned.reset_classifier(3)
    assert pruned(x).shape == (2, 3)
