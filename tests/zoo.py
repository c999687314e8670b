"""Small models of each supported family, shared by the tests."""

from __future__ import annotations

import torch

from nas_headprune.models.factory import create_model

# Small models of of each supported family, used across the suite: (name, kwargs, input size)
MODEL_ZOO = {
    "vit": (
        "vit_tiny_patch16_224",
        dict(
            img_size=28,
            patch_size=4,
            in_chans=1,
            embed_dim=48,
            depth=2,
            num_heads=4,
            mlp_ratio=2,
            num_classes=10,
        ),
        (1, 28, 28),
    ),
    "vit_bias_wide": (
        "vit_small_patch16_224",
        dict(
            img_size=32,
            patch_size=8,
            in_chans=3,
            embed_dim=96,
            depth=3,
            num_heads=6,
            num_classes=7,
            qkv_bias=True,
        ),
        (3, 32, 32),
    ),
    "deit_distilled": (
        "deit_tiny_distilled_patch16_224",
        dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5),
        (3, 32, 32),
    ),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(
            img_size=28,
            patch_size=2,
            in_chans=1,
            embed_dim=32,
            depths=(1, 2),
            num_heads=(2, 4),
            window_size=7,
            num_classes=10,
        ),
        (1, 28, 28),
    ),
    # focused linear attention (stage 1) and timm window attention (stage 2) in one model
    "flatten_swin": ("flatten_swin_mnist", dict(), (1, 28, 28)),
    # focused linear attention with a class token
    "flatten_deit": ("flatten_deit_mnist", dict(), (1, 28, 28)),
}


def make_model(key: str, fused: bool | None = None, seed: int = 0) -> torch.nn.Module:
    name, kwargs, _ = MODEL_ZOO[key]
    torch.manual_seed(seed)
    model = create_model(name, **kwargs).eval()
    if fused is not None:
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = fused
    # non-zero biases everywhere so bias slicing is exercised
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def input_size(key: str) -> tuple[int, int, int]:
    return MODEL_ZOO[key][2]
