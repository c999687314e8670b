"""FLatten Transformer: focused linear attention (Han et al., ICCV 2023) and the FLatten models.

Importing this module registers with timm:

- ``flatten_swin_tiny`` / ``_small`` / ``_base``: timm's ``SwinTransformer`` whose stages 1-2 use
  :class:`FocusedLinearAttention` over the whole stage feature map (no windows, no shift) and whose
  stages 3-4 keep timm's ``WindowAttention`` (shifted 7x7 windows), as the official configs
  (``ATTN_TYPE: LLSS``, ``WINDOW_SIZE: 56``) do.
- ``flatten_deit_tiny`` / ``_small``: timm's ``VisionTransformer`` (DeiT sizes, class token) with
  focused linear attention in every block.
- ``flatten_swin_mnist`` / ``flatten_deit_mnist``: tiny 28x28 single-channel variants for tests.

:class:`FocusedLinearAttention` also represents a pruned layer: its query/key width ``d_qk`` and
value width ``d_v`` are separate, and with ``dwc_kernels="per_channel"`` every kept (head, channel)
has its own depthwise kernel. See ``docs/flatten.md`` for the parameter layout, the mask contract
and the measured parameter / MACs table (``python -m nas_headprune.models.flatten``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import register_model
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from nas_headprune.errors import ArchitectureError, CheckpointError, UnknownNameError, UsageError
from nas_headprune.models.dense import read_torch_file

__all__ = [
    "FocusedLinearAttention",
    "FocusedSwinBlock",
    "focus",
    "convert_official_state_dict",
    "load_official_checkpoint",
    "PAPER_FIGURES",
    "count_macs",
    "size_table",
]

_logger = logging.getLogger(__name__)

# added after ReLU and in the normaliser's denominator, as in the official code
EPS = 1e-6

DwcKernels = Literal["shared", "per_channel"]


def focus(x: torch.Tensor, p: float) -> torch.Tensor:
    """The focusing function f_p on ``x >= 0``: ``(||x|| / ||x**p||) * x**p`` over the last dim.

    The norm keeps the length of each token's feature and only turns its direction. A token that
    is all zeros maps to zeros (the norm of ``x**p`` is clamped away from 0).
    """
    x_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (..., 1)
    x_p = x**p
    x_p_norm = torch.linalg.vector_norm(x_p, dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    return x_p * (x_norm / x_p_norm)


class FocusedLinearAttention(nn.Module):
    """Focused linear attention over one token grid (optionally behind prefix tokens such as a
    class token), dense or pruned.

    ``O = phi(Q) (phi(K)^T V) / (phi(Q) . sum_n phi(K_n)) + DWC(V)`` per head, with
    ``phi(x) = focus((ReLU(x) + eps) / softplus(scale))``. The focusing norms run over ALL ``H * d_qk``
    query (key) channels of a token, not per head, exactly as the official code does.

    Parameter layout (model surgery slices these tensors):

    - ``qkv``: Linear(dim, H * (2 * d_qk + d_v)); output rows ``[q (h d_qk), k (h d_qk), v (h d_v)]``.
    - ``positional_encoding``: (1, T, H * d_qk), added to k; T = num_prefix_tokens + grid h * w.
    - ``scale``: (1, 1, H * d_qk); q and k are divided by ``softplus(scale)``.
    - ``dwc``: depthwise Conv2d on the values over the grid. ``"shared"``: (d_v, d_v, k, k, groups=d_v),
      one kernel per channel shared by all heads (the original). ``"per_channel"``:
      (H*d_v, H*d_v, k, k, groups=H*d_v) on channels ordered ``(h d)`` (the pruned form).
    - ``proj``: Linear(H * d_v, dim).
    - ``q_gamma``: None, or (H * d_qk,) multiplying q right after the projection.

    Search hooks (None or tensors broadcastable to (H, d_qk) / (H, d_v), hard 0/1 or soft):
    ``qk_mask`` multiplies q and k after ReLU, eps and the division by softplus(scale), before the
    focusing norms and powers; ``v_mask`` multiplies each channel of (attention + DWC) output right
    before ``proj``. A channel masked to 0 computes the same as that channel sliced away.

    Prefix tokens (DeiT's class token) take part in the linear attention but get no DWC term, the
    convention of the authors' own DeiT code (Agent-Attention's ``agent_deit``): the DWC runs over
    the patch grid only. ``attn_drop`` is accepted for signature compatibility and unused: there is
    no attention map to drop, and the official code does not use it either.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: tuple[int, int],
        qkv_bias: bool = True,
        focusing_factor: float = 3,
        kernel_size: int = 5,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        head_dim_qk: int | None = None,
        head_dim_v: int | None = None,
        dwc_kernels: DwcKernels = "shared",
        num_prefix_tokens: int = 0,
    ) -> None:
        super().__init__()
        if num_heads <= 0 or dim <= 0:
            raise UsageError(f"dim and num_heads must be positive, got dim={dim}, num_heads={num_heads}")
        if dwc_kernels not in ("shared", "per_channel"):
            raise UsageError(f"dwc_kernels must be 'shared' or 'per_channel', got {dwc_kernels!r}")
        if kernel_size <= 0 or kernel_size % 2 == 0:
            raise UsageError(f"kernel_size must be a positive odd number, got {kernel_size}")
        if focusing_factor <= 0:
            raise UsageError(f"focusing_factor must be positive, got {focusing_factor}")
        self.dim = dim
        self.num_heads = num_heads
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.num_prefix_tokens = num_prefix_tokens
        self.num_tokens = num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        self.head_dim_qk = head_dim_qk or dim // num_heads
        self.head_dim_v = head_dim_v or dim // num_heads
        self.focusing_factor = focusing_factor
        self.kernel_size = kernel_size
        self.dwc_kernels = dwc_kernels
        self.attn_drop_rate = attn_drop  # unused, see the class docstring

        H, d_qk, d_v = num_heads, self.head_dim_qk, self.head_dim_v
        self.qkv = nn.Linear(dim, H * (2 * d_qk + d_v), bias=qkv_bias)
        self.positional_encoding = nn.Parameter(torch.zeros(1, self.num_tokens, H * d_qk))
        self.scale = nn.Parameter(torch.zeros(1, 1, H * d_qk))
        dwc_channels = d_v if dwc_kernels == "shared" else H * d_v
        self.dwc = nn.Conv2d(
            dwc_channels, dwc_channels, kernel_size, padding=kernel_size // 2, groups=dwc_channels
        )
        self.proj = nn.Linear(H * d_v, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.register_parameter("q_gamma", None)
        # search hooks: plain attributes (not buffers), so they never enter a state dict
        self.qk_mask: torch.Tensor | None = None
        self.v_mask: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: Linear weights trunc-normal(0.02), biases, positional
        encoding and scale zero, the depthwise conv at PyTorch's default."""
        for linear in (self.qkv, self.proj):
            trunc_normal_(linear.weight, std=0.02)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        nn.init.zeros_(self.positional_encoding)
        nn.init.zeros_(self.scale)
        self.dwc.reset_parameters()

    def enable_q_gamma(self) -> nn.Parameter:
        """Create ``q_gamma`` (ones, so the output is unchanged) and return it."""
        weight = self.qkv.weight
        self.q_gamma = nn.Parameter(
            torch.ones(self.num_heads * self.head_dim_qk, device=weight.device, dtype=weight.dtype)
        )
        return self.q_gamma

    def _flat_mask(self, mask: torch.Tensor, width: int, kind: str, like: torch.Tensor) -> torch.Tensor:
        mask = torch.as_tensor(mask, device=like.device, dtype=like.dtype)
        try:
            mask = torch.broadcast_to(mask, (self.num_heads, width))
        except RuntimeError as err:
            raise ArchitectureError(
                f"{kind}_mask of shape {tuple(mask.shape)} does not broadcast to "
                f"(heads, width) = ({self.num_heads}, {width})"
            ) from err
        return rearrange(mask, "h d -> (h d)")  # (H*width,)

    def _dwc(self, v: torch.Tensor) -> torch.Tensor:
        """Depthwise conv of the grid tokens' values; zeros for the prefix tokens."""
        gh, gw = self.grid_size
        v_grid = v[:, :, self.num_prefix_tokens :]  # (B, H, h*w, d_v)
        if self.dwc_kernels == "shared":
            img = rearrange(v_grid, "b h (y x) d -> (b h) d y x", y=gh, x=gw)  # (B*H, d_v, h, w)
            out = rearrange(self.dwc(img), "(b h) d y x -> b h (y x) d", h=self.num_heads)
        else:
            img = rearrange(v_grid, "b h (y x) d -> b (h d) y x", y=gh, x=gw)  # (B, H*d_v, h, w)
            out = rearrange(self.dwc(img), "b (h d) y x -> b h (y x) d", h=self.num_heads)
        return F.pad(out, (0, 0, self.num_prefix_tokens, 0))  # (B, H, T, d_v)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) -> phi(Q), phi(K) ``(B, H, T, d_qk)`` and V ``(B, H, T, d_v)``: the focused query
        and key features (after ``q_gamma``, the positional encoding, ReLU, the scale, the qk mask and
        the focusing function) and the values, split into heads."""
        H, d_qk, d_v = self.num_heads, self.head_dim_qk, self.head_dim_v
        q, k, v = self.qkv(x).split([H * d_qk, H * d_qk, H * d_v], dim=-1)  # (B, T, H*d_qk) x2, (B, T, H*d_v)
        if self.q_gamma is not None:
            q = q * self.q_gamma
        k = k + self.positional_encoding
        scale = F.softplus(self.scale)  # (1, 1, H*d_qk)
        q = (F.relu(q) + EPS) / scale
        k = (F.relu(k) + EPS) / scale
        if self.qk_mask is not None:
            m_qk = self._flat_mask(self.qk_mask, d_qk, "qk", q)
            q = q * m_qk
            k = k * m_qk
        q = focus(q, self.focusing_factor)  # norms over all H*d_qk channels of a token
        k = focus(k, self.focusing_factor)
        q = rearrange(q, "b t (h d) -> b h t d", h=H)  # (B, H, T, d_qk)
        k = rearrange(k, "b t (h d) -> b h t d", h=H)  # (B, H, T, d_qk)
        v = rearrange(v, "b t (h d) -> b h t d", h=H)  # (B, H, T, d_v)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """(B, T, C) -> (B, T, C). ``mask`` (a Swin shift mask) is ignored: this attention is one
        global window without shift. ``attn_mask`` / ``is_causal`` cannot be honoured and raise."""
        if attn_mask is not None or is_causal:
            raise UsageError("FocusedLinearAttention supports neither attn_mask nor is_causal")
        B, T, _ = x.shape
        if T != self.num_tokens:
            raise UsageError(
                f"FocusedLinearAttention built for {self.num_tokens} tokens "
                f"({self.num_prefix_tokens} prefix + grid {self.grid_size}), got {T}"
            )
        d_v = self.head_dim_v
        q, k, v = self.features(x)  # (B, H, T, d_qk), (B, H, T, d_qk), (B, H, T, d_v)

        z = 1.0 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + EPS)  # (B, H, T, 1)
        kv = (k.transpose(-2, -1) * T**-0.5) @ (v * T**-0.5)  # (B, H, d_qk, d_v)
        out = (q @ kv) * z + self._dwc(v)  # (B, H, T, d_v)

        out = rearrange(out, "b h t d -> b t (h d)")  # (B, T, H*d_v)
        if self.v_mask is not None:
            out = out * self._flat_mask(self.v_mask, d_v, "v", out)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, head_dim_qk={self.head_dim_qk}, "
            f"head_dim_v={self.head_dim_v}, grid_size={self.grid_size}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, focusing_factor={self.focusing_factor}, "
            f"kernel_size={self.kernel_size}, dwc_kernels={self.dwc_kernels!r}"
        )


class FocusedSwinBlock(nn.Module):
    """A Swin block with global focused linear attention over the stage's whole feature map.

    Same submodule names as timm's ``SwinTransformerBlock`` (``norm1``, ``attn``, ``drop_path1``,
    ``norm2``, ``mlp``, ``drop_path2``) and the same (B, H, W, C) interface; timm's block cannot take
    another attention class, hence this one.
    """

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        head_dim: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        focusing_factor: float = 3,
        kernel_size: int = 5,
        dwc_kernels: DwcKernels = "shared",
    ) -> None:
        super().__init__()
        self.dim = dim
        self.input_resolution = (int(input_resolution[0]), int(input_resolution[1]))
        self.norm1 = norm_layer(dim)
        self.attn = FocusedLinearAttention(
            dim,
            num_heads,
            grid_size=self.input_resolution,
            qkv_bias=qkv_bias,
            focusing_factor=focusing_factor,
            kernel_size=kernel_size,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            head_dim_qk=head_dim,
            head_dim_v=head_dim,
            dwc_kernels=dwc_kernels,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(
            in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop
        )
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        y = rearrange(self.norm1(x), "b y x c -> b (y x) c")  # (B, H*W, C)
        y = rearrange(self.attn(y), "b (y x) c -> b y x c", y=H)  # (B, H, W, C)
        x = x + self.drop_path1(y)
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def set_input_size(self, *args: Any, **kwargs: Any) -> None:
        raise UsageError(
            "FLatten blocks learn a positional encoding for one feature-map size; "
            "build a new model with the img_size you need"
        )


# ---------------------------------------------------------------------------------------------
# model factories


def _init_linear(module: nn.Module) -> None:
    """timm / official init for the modules swapped in after the model was built."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _drop_prob(module: nn.Module) -> float:
    return float(module.drop_prob) if isinstance(module, DropPath) else 0.0


def _strip_hub_kwargs(pretrained: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    if pretrained:
        raise UsageError(
            "no FLatten weights are fetched from a hub: build with pretrained=False and use "
            "nas_headprune.models.flatten.load_official_checkpoint(model, path)"
        )
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return kwargs


def _set_cfg(model: nn.Module, name: str, in_chans: int, img_size: Any, mnist: bool) -> None:
    size = img_size if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    if mnist:  # Fashion-MNIST statistics
        from nas_headprune.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD

        mean, std = (FASHION_MNIST_MEAN,) * in_chans, (FASHION_MNIST_STD,) * in_chans
    else:  # ImageNet
        mean, std = (0.485, 0.456, 0.406)[:in_chans], (0.229, 0.224, 0.225)[:in_chans]
    cfg = {
        "architecture": name,
        "input_size": (in_chans, *size),
        "num_classes": model.num_classes,
        "mean": mean,
        "std": std,
        "crop_pct": 1.0 if mnist else 0.9,
        "interpolation": "bicubic",
        "first_conv": "patch_embed.proj",
        "classifier": "head.fc" if isinstance(model, SwinTransformer) else "head",
    }
    setattr(model, "pretrained_cfg", cfg)  # noqa: B010  (timm's attributes, untyped on nn.Module)
    setattr(model, "default_cfg", cfg)  # noqa: B010


def _flatten_swin(
    name: str,
    pretrained: bool,
    linear_stages: tuple[int, ...],
    defaults: dict[str, Any],
    kwargs: dict[str, Any],
    mnist: bool = False,
) -> SwinTransformer:
    kwargs = _strip_hub_kwargs(pretrained, {**defaults, **kwargs})
    focusing_factor = kwargs.pop("focusing_factor", 3)
    kernel_size = kwargs.pop("kernel_size", 5)
    dwc_kernels = kwargs.pop("dwc_kernels", "shared")
    model = SwinTransformer(**kwargs)
    for i in linear_stages:
        stage: Any = model.layers[i]
        blocks = []
        for old in stage.blocks:  # built as window-attention blocks; take their sizes, then replace
            heads = old.attn.num_heads
            blocks.append(
                FocusedSwinBlock(
                    dim=old.dim,
                    input_resolution=stage.output_resolution,
                    num_heads=heads,
                    head_dim=old.attn.qkv.out_features // (3 * heads),
                    mlp_ratio=old.mlp.fc1.out_features / old.dim,
                    qkv_bias=old.attn.qkv.bias is not None,
                    proj_drop=old.attn.proj_drop.p,
                    attn_drop=old.attn.attn_drop.p,
                    drop_path=_drop_prob(old.drop_path1),
                    act_layer=type(old.mlp.act),
                    focusing_factor=focusing_factor,
                    kernel_size=kernel_size,
                    dwc_kernels=dwc_kernels,
                )
            )
        stage.blocks = nn.Sequential(*blocks)
        _init_linear(stage.blocks)
    _set_cfg(model, name, kwargs.get("in_chans", 3), kwargs.get("img_size", 224), mnist)
    return model


def _flatten_deit(
    name: str, pretrained: bool, defaults: dict[str, Any], kwargs: dict[str, Any], mnist: bool = False
) -> VisionTransformer:
    kwargs = _strip_hub_kwargs(pretrained, {**defaults, **kwargs})
    focusing_factor = kwargs.pop("focusing_factor", 3)
    kernel_size = kwargs.pop("kernel_size", 5)
    dwc_kernels = kwargs.pop("dwc_kernels", "shared")
    if kwargs.get("dynamic_img_size"):
        raise UsageError(
            "FLatten-DeiT learns a positional encoding per grid size: dynamic_img_size is unsupported"
        )
    model = VisionTransformer(**kwargs)
    grid = model.patch_embed.grid_size
    for block in model.blocks:
        old: Any = block.attn
        block.attn = FocusedLinearAttention(
            old.qkv.in_features,
            old.num_heads,
            grid_size=grid,
            qkv_bias=old.qkv.bias is not None,
            focusing_factor=focusing_factor,
            kernel_size=kernel_size,
            attn_drop=old.attn_drop.p,
            proj_drop=old.proj_drop.p,
            head_dim_qk=old.head_dim,
            head_dim_v=old.head_dim,
            dwc_kernels=dwc_kernels,
            num_prefix_tokens=model.num_prefix_tokens,
        )
    _set_cfg(model, name, kwargs.get("in_chans", 3), kwargs.get("img_size", 224), mnist)
    return model


# official configs: cfgs/flatten_swin_{t,s,b}.yaml (ATTN_TYPE LLSS, window 56 = the whole stage-1 map)
_SWIN_LINEAR_STAGES = (0, 1)


@register_model
def flatten_swin_tiny(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """FLatten-Swin-T @ 224: embed 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24)."""
    defaults = dict(
        img_size=224, patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24), drop_path_rate=0.2,
    )  # fmt: skip
    return _flatten_swin("flatten_swin_tiny", pretrained, _SWIN_LINEAR_STAGES, defaults, kwargs)


@register_model
def flatten_swin_small(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """FLatten-Swin-S @ 224: embed 96, depths (2, 2, 18, 2), heads (3, 6, 12, 24)."""
    defaults = dict(
        img_size=224, patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2),
        num_heads=(3, 6, 12, 24), drop_path_rate=0.3,
    )  # fmt: skip
    return _flatten_swin("flatten_swin_small", pretrained, _SWIN_LINEAR_STAGES, defaults, kwargs)


@register_model
def flatten_swin_base(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """FLatten-Swin-B @ 224: embed 128, depths (2, 2, 18, 2), heads (4, 8, 16, 32)."""
    defaults = dict(
        img_size=224, patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2),
        num_heads=(4, 8, 16, 32), drop_path_rate=0.5,
    )  # fmt: skip
    return _flatten_swin("flatten_swin_base", pretrained, _SWIN_LINEAR_STAGES, defaults, kwargs)


@register_model
def flatten_deit_tiny(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """FLatten-DeiT-T @ 224: patch 16, embed 192, depth 12, 3 heads."""
    defaults = dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, drop_path_rate=0.1)
    return _flatten_deit("flatten_deit_tiny", pretrained, defaults, kwargs)


@register_model
def flatten_deit_small(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """FLatten-DeiT-S @ 224: patch 16, embed 384, depth 12, 6 heads."""
    defaults = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1)
    return _flatten_deit("flatten_deit_small", pretrained, defaults, kwargs)


@register_model
def flatten_swin_mnist(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """28x28x1, patch 2: stage 1 focused linear attention on 14x14, stage 2 timm WindowAttention
    (window 7) on 7x7. Both attention kinds in one small model."""
    defaults = dict(
        img_size=28, patch_size=2, in_chans=1, num_classes=10, window_size=7, embed_dim=48,
        depths=(2, 2), num_heads=(2, 4), mlp_ratio=2.0, drop_path_rate=0.0,
    )  # fmt: skip
    return _flatten_swin("flatten_swin_mnist", pretrained, (0,), defaults, kwargs, mnist=True)


@register_model
def flatten_deit_mnist(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """28x28x1, patch 4 (7x7 tokens + class token): embed 64, depth 4, 2 heads."""
    defaults = dict(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=2,
        mlp_ratio=2.0, drop_path_rate=0.0,
    )  # fmt: skip
    return _flatten_deit("flatten_deit_mnist", pretrained, defaults, kwargs, mnist=True)


# ---------------------------------------------------------------------------------------------
# official checkpoints (github.com/LeapLabTHU/FLatten-Transformer)


def _family(model_name: str) -> str:
    for family in ("flatten_swin", "flatten_deit"):
        if model_name.startswith(family):
            return family
    raise UnknownNameError(
        f"no official FLatten key layout for model {model_name!r}; expected a flatten_swin_* or flatten_deit_* name"
    )


def _unwrap(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    for key in ("model", "state_dict"):
        inner = state_dict.get(key) if isinstance(state_dict, Mapping) else None
        if isinstance(inner, Mapping):
            state_dict = inner
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(state_dict).__name__}, not a state dict")
    bad = [repr(k) for k, v in state_dict.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(
            f"checkpoint is not a state dict: entries that are not name -> tensor: {_names(bad, 3)}"
        )
    out = {}
    for key, value in state_dict.items():
        out[key[len("module.") :] if key.startswith("module.") else key] = value  # DDP prefix
    return out


def convert_official_state_dict(state_dict: Mapping[str, Any], model_name: str) -> dict[str, torch.Tensor]:
    """Map a state dict in the official FLatten repo's key layout to this module's models.

    Unwraps ``{"model": ...}`` / ``{"state_dict": ...}`` and a DDP ``module.`` prefix. For Swin:
    the official code (Microsoft Swin layout) downsamples at the END of a stage
    (``layers.i.downsample``) where timm downsamples at the START of the next
    (``layers.{i+1}.downsample``; the 2x2 merge order is the same), its head is ``head`` where
    timm's is ``head.fc``, and it saves the ``relative_position_index`` / ``attn_mask`` buffers
    that timm rebuilds. The focused-attention tensors (``qkv``, ``positional_encoding``, ``scale``,
    ``dwc``, ``proj``) keep their names and shapes. Split ``attn.q`` + ``attn.kv`` projections (the
    layout of the official FLatten-PVT code) are fused into ``attn.qkv``. A dict already in this
    module's layout passes through unchanged.
    """
    family = _family(model_name)
    sd = _unwrap(state_dict)
    old_swin = family == "flatten_swin" and any(k.startswith("layers.0.downsample.") for k in sd)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue  # buffers the model rebuilds
        if old_swin:
            key = re.sub(
                r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) + 1}.downsample.", key
            )
            if key.startswith("head.") and not key.startswith("head.fc."):
                key = "head.fc." + key[len("head.") :]
        out[key] = value
    for q_key in [k for k in out if k.endswith(".q.weight")]:
        prefix = q_key[: -len("q.weight")]
        for kind in ("weight", "bias"):
            q, kv = out.pop(f"{prefix}q.{kind}", None), out.pop(f"{prefix}kv.{kind}", None)
            if q is None and kv is None:
                continue
            if q is None or kv is None:
                raise CheckpointError(f"{prefix}q.{kind} and {prefix}kv.{kind} must come together")
            out[f"{prefix}qkv.{kind}"] = torch.cat([q, kv], dim=0)  # rows [q, k, v]
    return out


def _model_family(model: nn.Module) -> str:
    if isinstance(model, SwinTransformer):
        return "flatten_swin"
    if isinstance(model, VisionTransformer):
        return "flatten_deit"
    raise UsageError(f"not a FLatten model: {type(model).__name__}")


def _names(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_official_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an official FLatten checkpoint into ``model`` (strictly) and return ``model``.

    Raises :class:`CheckpointError` naming the missing and unexpected keys, or the first tensors
    whose shapes differ, when the checkpoint does not fit the model.
    """
    # the official training script also pickles its yacs config next to the weights
    raw = read_torch_file(
        path,
        "The official training script saves its yacs config beside the weights. If you trust the "
        "file, save its weights alone once: torch.save(torch.load(path, weights_only=False)['model'], "
        "new_path).",
    )
    family = _model_family(model)
    try:
        sd = convert_official_state_dict(raw, family)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {str(path)!r}: {err}") from err
    except RuntimeError as err:  # torch.cat of q and kv tensors whose shapes do not fit together
        raise CheckpointError(f"checkpoint {str(path)!r} has q/kv tensors that do not fit: {err}") from err
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match {type(model).__name__}: "
            f"missing keys [{_names(missing)}]; unexpected keys [{_names(unexpected)}]"
        )
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in sd.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise CheckpointError(f"checkpoint {str(path)!r} has tensors of the wrong shape: {_names(wrong, 6)}")
    model.load_state_dict(sd, strict=True)
    _logger.info("loaded official FLatten checkpoint %s (%d tensors)", path, len(sd))
    return model


# ---------------------------------------------------------------------------------------------
# reported sizes, FLatten paper Fig. 6 (its "FLOPs" are multiply-adds); None where not reported

PAPER_FIGURES: dict[str, tuple[float, float] | None] = {
    "flatten_swin_tiny": (29e6, 4.5e9),
    "flatten_swin_small": (51e6, 8.7e9),
    "flatten_swin_base": (89e6, 15.4e9),
    "flatten_deit_tiny": (6.1e6, 1.1e9),
    "flatten_deit_small": None,
}


def count_macs(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """Per-image MACs of ``model`` by FlopCounterMode / 2 (batch 1, eval mode, on its device).

    On the ``meta`` device this counts shapes only: the same number, no arithmetic.
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_size, device=device))
    return counter.get_total_flops() // 2


def size_table(device: str | torch.device = "meta") -> list[dict[str, Any]]:
    """Parameters and MACs (FlopCounterMode / 2, 224x224, batch 1) of the ImageNet models, built
    on ``device`` (default ``meta``: no weights are allocated, the counts are exact)."""
    import timm

    rows = []
    for name, paper in PAPER_FIGURES.items():
        with torch.device(device):
            model = timm.create_model(name)
        params = sum(p.numel() for p in model.parameters())
        macs = count_macs(model, (3, 224, 224))
        rows.append({"model": name, "paper": paper, "params": params, "macs": macs})
    return rows


def _main() -> None:
    def diff(ours: float, ref: float | None) -> str:
        return "n/a" if ref is None else f"{100 * (ours / ref - 1):+.1f}%"

    print("| model | paper params | paper MACs | ours params | ours MACs | params diff | MACs diff |")
    print("|---|---|---|---|---|---|---|")
    for row in size_table():
        p_ref, m_ref = row["paper"] or (None, None)
        print(
            f"| {row['model']} | {'-' if p_ref is None else f'{p_ref / 1e6:.1f}M'} "
            f"| {'-' if m_ref is None else f'{m_ref / 1e9:.1f}G'} "
            f"| {row['params'] / 1e6:.2f}M | {row['macs'] / 1e9:.3f}G "
            f"| {diff(row['params'], p_ref)} | {diff(row['macs'], m_ref)} |"
        )


if __name__ == "__main__":
    _main()
