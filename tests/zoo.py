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
    # linear spatial reduction: keys and values from a 7x7 average pool, a 1x1 conv, norm and GELU
    "pvt_v2_li": ("pvt_v2_b2_li", dict(_TINY_PYRAMID, num_classes=10), (3, 32, 32)),
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


# ------------------------------------------------------ Hugging Face models (the hf extra)
# Tiny random-weight transformers models built by name through create_model("hf:..."):
# (name, config kwargs, input size). A text model's input size is its sequence length.
HF_ZOO = {
    "hf_bert": (
        "hf:BertModel",
        dict(
            vocab_size=64,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            max_position_embeddings=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
        (12,),
    ),
    "hf_vit": (
        "hf:ViTModel",
        dict(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            image_size=32,
            patch_size=8,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
        (3, 32, 32),
    ),
}


def make_hf_model(key: str, attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """The :data:`HF_ZOO` model ``key`` with random weights (seeded), in eval mode."""
    name, kwargs, _ = HF_ZOO[key]
    torch.manual_seed(seed)
    return create_model(name, attn_implementation=attn_implementation, **kwargs).eval()


def hf_example_inputs(key: str) -> dict[str, torch.Tensor] | None:
    """Batch-1 example inputs of a text model (zero token ids, full mask); ``None`` for images."""
    size = HF_ZOO[key][2]
    if len(size) != 1:
        return None
    return {
        "input_ids": torch.zeros(1, size[0], dtype=torch.long),
        "attention_mask": torch.ones(1, size[0], dtype=torch.long),
    }


def hf_random_inputs(key: str, generator: torch.Generator, batch: int = 2) -> object:
    """Random inputs: images, or token ids with the last example padded (mask 0 on its last third)."""
    name, kwargs, size = HF_ZOO[key]
    if len(size) != 1:
        return torch.randn(batch, *size, generator=generator)
    ids = torch.randint(1, int(kwargs["vocab_size"]), (batch, size[0]), generator=generator)
    mask = torch.ones(batch, size[0], dtype=torch.long)
    mask[-1, size[0] - size[0] // 3 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


# ------------------------------------------------------------------ families under the adapter kit
# Families whose adapters the adapter kit (nas_headprune.testing.SpaceAdapterTestCase) checks, with
# the installed adapters: zoo key (FAMILY_ZOO or HF_ZOO) -> settings. "kwargs" override the zoo's
# model arguments (CaiT's layer scale starts at 1e-5, which hides its layers from an equivalence
# check), "folds" is the kit's expected_folds, "skip" leaves unsupported layers dense.
KIT_FAMILIES: dict[str, dict] = {
    "vit": dict(folds={"timm_attention": ("qk", "v")}),
    "pvt_v2": dict(folds={"timm_pvt_attention": ("qk", "v")}),
    "pvt_v2_li": dict(folds={"timm_pvt_attention": ("qk", "v")}),
    "cait": dict(
        kwargs=dict(init_values=1.0),
        folds={"timm_talking_head_attention": ("qk", "v"), "timm_class_attention": ("qk", "v")},
    ),
    "xcit": dict(folds={"timm_class_attention": ("qk", "v")}, skip=True),
    "hf_bert": dict(folds={"hf_bert_attention": ("qk", "v")}),
    "hf_vit": dict(folds={"hf_vit_attention": ("qk", "v")}),
}


def kit_case(key: str) -> type:
    """A :class:`~nas_headprune.testing.SpaceAdapterTestCase` subclass for the zoo family ``key``
    (settings from :data:`KIT_FAMILIES`); subclass it under a ``Test...`` name to collect it."""
    from nas_headprune.testing import SpaceAdapterTestCase

    settings = KIT_FAMILIES[key]
    extra = settings.get("kwargs", {})
    attrs: dict[str, object] = {
        "expected_folds": settings.get("folds"),
        "skip_unsupported": settings.get("skip", False),
        "architectures": 3,
    }
    if key in HF_ZOO:
        attrs["input_size"] = None if hf_example_inputs(key) is not None else HF_ZOO[key][2]
        attrs["make_model"] = lambda self: make_hf_model(key)
        attrs["example_inputs"] = lambda self: hf_example_inputs(key)
        attrs["make_inputs"] = lambda self, generator: hf_random_inputs(key, generator)
    else:
        name, kwargs, size = FAMILY_ZOO[key]
        attrs["input_size"] = size

        def make_model(self: object) -> torch.nn.Module:
            torch.manual_seed(0)
            merged = {**kwargs, **extra}
            return create_model(name, **merged) if isinstance(name, str) else name(**merged)

        attrs["make_model"] = make_model
    return type(f"Kit_{key}", (SpaceAdapterTestCase,), attrs)


# ------------------------------------------------------------ weights that every channel moves
def randomize_parameters(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give ``model`` (in place) non-zero random biases, and random values to every parameter that
    starts at or near zero (relative position tables, q/v biases, classifier heads scaled down at
    init, small layer scales), so that every pruned channel changes the output measurably."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or p.abs().max() < 1e-2:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def masked_pruned_gap(model, space, selection, pruned, x: torch.Tensor) -> float:
    """The largest ``|masked dense output - pruned output|`` on ``x``: ``model`` run with the hard
    masks of ``selection`` against ``pruned`` (its materialised copy), both without gradients."""
    with torch.no_grad():
        with space.apply_masks(model, space.masks_from_selection(selection)):
            masked = model(x)
        return (masked - pruned(x)).abs().max().item()
