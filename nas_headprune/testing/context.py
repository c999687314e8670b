"""A fast search context for tests: a tiny randomly initialised timm ViT or Swin, its space and random
calibration data (:func:`tiny_context`), the models the strategy kit checks strategies on.
"""

from __future__ import annotations

import torch

from nas_headprune.strategy import SearchContext


def tiny_context(seed: int = 0, budget: float = 0.6, model: str = "vit") -> SearchContext:
    """A fast context: a tiny randomly initialised timm ViT or Swin and random calibration data."""
    from nas_headprune.evaluator.measure import measure_macs
    from nas_headprune.models.factory import create_model
    from nas_headprune.space.build import build_space

    torch.manual_seed(1234)
    if model == "vit":
        net = create_model(
            "vit_tiny_patch16_224",
            img_size=16,
            patch_size=4,
            in_chans=1,
            embed_dim=32,
            depth=2,
            num_heads=4,
            mlp_ratio=2,
            num_classes=5,
        )
        size = (1, 16, 16)
    elif model == "swin":
        net = create_model(
            "swin_tiny_patch4_window7_224",
            img_size=28,
            patch_size=2,
            in_chans=1,
            embed_dim=16,
            depths=(1, 1),
            num_heads=(2, 4),
            window_size=7,
            num_classes=5,
        )
        size = (1, 28, 28)
    else:
        raise ValueError(f"model must be 'vit' or 'swin', got {model!r}")
    net.eval()
    space = build_space(net, size)
    gen = torch.Generator().manual_seed(99)
    calib = [
        (torch.randn(8, *size, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(2)
    ]
    return SearchContext(
        model=net, space=space, budget=budget, dense_macs=measure_macs(net, size), calib=calib, seed=seed
    )
