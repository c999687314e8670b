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


# ------------------------------------------------------------------ one small model per family
# Tiny random-weight models of many timm families (and the project's FLatten models), for checks
# that must hold on every model, supported or not: analytic MACs == counted MACs, and nothing
# attention-like passing silently. (name or builder, kwargs, input size)
_TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2, num_classes=10)
_TINY_SWIN = dict(
    img_size=32, patch_size=2, embed_dim=32, depths=(1, 1), num_heads=(2, 4), window_size=4, num_classes=10
)
_TINY_PYRAMID = dict(
    embed_dims=(16, 32), depths=(1, 1), num_heads=(1, 2), sr_ratios=(2, 1), mlp_ratios=(2, 2)
)


def _swiglu_vit(**kwargs: object) -> torch.nn.Module:
    from timm.layers import SwiGLU

    return create_model("vit_tiny_patch16_224", mlp_layer=SwiGLU, **kwargs)


def _mvitv2(**kwargs: object) -> torch.nn.Module:
    # the registered mvitv2 models take no config overrides; build a two-stage one directly
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    cfg = MultiScaleVitCfg(
        depths=(1, 1),
        embed_dim=32,
        num_heads=1,
        stride_q=((1, 1), (2, 2)),
        stride_kv_adaptive=(2, 2),
        patch_kernel=(3, 3),
        patch_stride=(2, 2),
        patch_padding=(1, 1),
    )
    return MultiScaleVit(cfg, **kwargs)


FAMILY_ZOO = {
    "vit": ("vit_tiny_patch16_224", dict(_TINY_VIT, depth=2, num_heads=4), (3, 32, 32)),
    "deit": ("deit_tiny_patch16_224", _TINY_VIT, (3, 32, 32)),
    "deit3": ("deit3_small_patch16_224", _TINY_VIT, (3, 32, 32)),
    "vit_reg": ("vit_base_patch16_reg4_gap_256", _TINY_VIT, (3, 32, 32)),
    "vit_swiglu": (_swiglu_vit, _TINY_VIT, (3, 32, 32)),
    "siglip_map": ("vit_base_patch16_siglip_224", _TINY_VIT, (3, 32, 32)),  # attention pooling
    "vit_relpos": ("vit_relpos_base_patch16_224", _TINY_VIT, (3, 32, 32)),
    "beit": ("beit_base_patch16_224", _TINY_VIT, (3, 32, 32)),
    "eva": ("eva02_tiny_patch14_224", dict(_TINY_VIT, swiglu_mlp=False), (3, 32, 32)),
    "eva02": ("eva02_tiny_patch14_224", _TINY_VIT, (3, 32, 32)),  # SwiGLU MLPs
    "cait": ("cait_xxs24_224", dict(_TINY_VIT, depth_token_only=1), (3, 32, 32)),
    "xcit": ("xcit_nano_12_p16_224", dict(_TINY_VIT, cls_attn_layers=1), (3, 32, 32)),
    "swin": ("swin_tiny_patch4_window7_224", _TINY_SWIN, (3, 32, 32)),
    "swinv2": ("swinv2_tiny_window8_256", _TINY_SWIN, (3, 32, 32)),
    "pvt_v2": ("pvt_v2_b0", dict(_TINY_PYRAMID, num_classes=10), (3, 32, 32)),
    "twins_pcpvt": (
        "twins_pcpvt_small",
        dict(_TINY_PYRAMID, img_size=32, patch_size=4, num_classes=10),
        (3, 32, 32),
    ),
    "twins_svt": (
        "twins_svt_small",
        dict(_TINY_PYRAMID, depths=(2, 2), wss=(2, 2), img_size=32, patch_size=4, num_classes=10),
        (3, 32, 32),
    ),
    "levit": (
        "levit_128s",
        dict(img_size=32, embed_dim=(32, 48), key_dim=8, num_heads=(2, 3), depth=(1, 1), num_classes=10),
        (3, 32, 32),
    ),
    "mvitv2": (_mvitv2, dict(img_size=(32, 32), num_classes=10), (3, 32, 32)),
    "efficientformerv2": (
        "efficientformerv2_s0",
        dict(img_size=64, depths=(1, 1, 1, 1), embed_dims=(16, 16, 32, 32), num_vit=1, num_classes=10),
        (3, 64, 64),
    ),
    "flatten_swin": ("flatten_swin_mnist", dict(), (1, 28, 28)),
    "flatten_deit": ("flatten_deit_mnist", dict(), (1, 28, 28)),
}


def make_family_model(key: str, seed: int = 0) -> torch.nn.Module:
    """The :data:`FAMILY_ZOO` model ``key`` with random weights (seeded), in eval mode."""
    name, kwargs, _ = FAMILY_ZOO[key]
    torch.manual_seed(seed)
    model = create_model(name, **kwargs) if isinstance(name, str) else name(**kwargs)
    return model.eval()
