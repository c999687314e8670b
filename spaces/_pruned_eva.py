"""The pruned timm ``EvaAttention`` (:class:`PrunedEvaAttention`) and the layout of its rotary
query/key pairs (see :mod:`nas_headprune.spaces.timm_eva`, whose adapter builds it).

A head's kept pairs are laid out as the dense module lays out its pairs: interleaved (pair ``j`` is
channels ``2j``, ``2j + 1``) or half-split (``rotate_half``: channels ``j``, ``j + w``). Surgery
gathers the q/k rows slot by slot; :func:`pair_major` and :func:`head_major` put them in the
module's order, and :func:`per_channel` spreads one factor per pair over both of its channels.
"""

from __future__ import annotations

from typing import cast

import torch
from einops import rearrange
from timm.layers import apply_rot_embed_cat
from torch import nn

from nas_headprune.errors import ArchitectureError

from ._fused_qkv import attend
from ._qv_bias import qv_bias_qkv


class PrunedEvaAttention(nn.Module):
    """``EvaAttention`` whose heads keep ``head_dim`` query/key channels and ``head_dim_v`` value
    channels each; same call signature (``rope``, ``attn_mask``, ``is_causal``), projections (fused
    ``qkv`` with ``q_bias`` / ``v_bias``, or ``q_proj`` / ``k_proj`` / ``v_proj``), q/k norms and
    gate as the dense module, and the dense model's softmax scale.

    ``rope_dim`` is the head width the rotary embedding is built for (the dense ``head_dim``). When
    it is given, the heads keep ``head_dim / 2`` of its ``rope_dim / 2`` rotary pairs, laid out as
    the dense module lays out its pairs (``rotate_half``), and ``kept_pairs`` ``(H, head_dim / 2)``
    names the dense pair of each kept one; the forward rotates each by that pair's frequency. When
    it is ``None`` the q/k channels are the dense ones, all kept (``kept_pairs`` is ``None``)."""

    q_bias: nn.Parameter | None
    k_bias: torch.Tensor | None
    v_bias: nn.Parameter | None
    kept_pairs: torch.Tensor | None

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        head_dim_v: int,
        scale: float,
        qkv_fused: bool = True,
        qkv_bias_separate: bool = False,
        num_prefix_tokens: int = 1,
        rotate_half: bool = False,
        fused_attn: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rope_dim: int | None = None,
    ) -> None:
        super().__init__()
        if rope_dim is not None and (head_dim % 2 or rope_dim % 2 or head_dim > rope_dim):
            raise ArchitectureError(
                f"rotary pairs need even q/k widths within the rotary width, got head_dim "
                f"{head_dim} and rope_dim {rope_dim}"
            )
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.rope_dim = rope_dim
        self.head_dim_v = head_dim_v
        self.scale = scale
        self.qkv_bias_separate = qkv_bias_separate
        self.num_prefix_tokens = num_prefix_tokens
        self.rotate_half = rotate_half
        self.fused_attn = fused_attn
        # projections, biases, norms and gate are set by the adapter from the dense module
        self.qkv: nn.Linear | None = None
        self.q_proj: nn.Linear | None = None
        self.k_proj: nn.Linear | None = None
        self.v_proj: nn.Linear | None = None
        self.register_parameter("q_bias", None)
        self.register_buffer("k_bias", None, persistent=False)
        self.register_parameter("v_bias", None)
        # dense pair index of every kept pair (set by the adapter; saved with the weights)
        pairs = None if rope_dim is None else torch.arange(head_dim // 2).repeat(num_heads, 1)  # (H, w)
        self.register_buffer("kept_pairs", pairs)
        if qkv_fused:
            self.qkv = nn.Linear(dim, num_heads * (2 * head_dim + head_dim_v), bias=False)
        else:
            self.q_proj = nn.Linear(dim, num_heads * head_dim)
            self.k_proj = nn.Linear(dim, num_heads * head_dim, bias=False)
            self.v_proj = nn.Linear(dim, num_heads * head_dim_v)
        self.q_norm: nn.Module = nn.Identity()
        self.k_norm: nn.Module = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.gate: nn.Linear | None = None
        self.proj = nn.Linear(num_heads * head_dim_v, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        heads = self.num_heads
        gate = self.gate(x).sigmoid() if self.gate is not None else None  # (B, N, H*d_v)
        if self.qkv is not None:
            q, k, v = qv_bias_qkv(self, x).split(
                [heads * self.head_dim, heads * self.head_dim, heads * self.head_dim_v], dim=-1
            )
        else:
            assert self.q_proj is not None and self.k_proj is not None and self.v_proj is not None
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = rearrange(q, "b n (h d) -> b h n d", h=heads)  # (B, H, N, d)
        k = rearrange(k, "b n (h d) -> b h n d", h=heads)  # (B, H, N, d)
        v = rearrange(v, "b n (h d) -> b h n d", h=heads)  # (B, H, N, d_v)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # rotary embedding on every token after the prefix tokens, as timm
            if self.kept_pairs is not None:
                rope = self.kept_rope(rope)  # (b, H, N', 2*d): each head's kept pairs' sin, cos
            npt = self.num_prefix_tokens
            q = torch.cat(
                [q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=self.rotate_half)], dim=2
            )
            k = torch.cat(
                [k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=self.rotate_half)], dim=2
            )
            q, k = q.type_as(v), k.type_as(v)
        out = attend(
            q,
            k,
            v,
            self.scale,
            fused=self.fused_attn,
            dropout=self.attn_drop,
            bias=attn_mask,
            is_causal=is_causal,
        )  # (B, H, N, d_v)
        out = rearrange(out, "b h n d -> b n (h d)")  # (B, N, H*d_v)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def rope_channels(self) -> torch.Tensor:
        """``(H, head_dim)``: the dense rotary channel of each kept q/k channel, in this module's
        layout (interleaved ``[2j, 2j + 1, ...]`` or half-split ``[j, ..., j + rope_dim/2, ...]``)."""
        pairs, dense = self.kept_pairs, self.rope_dim
        assert pairs is not None and dense is not None, "the q/k channels are kept whole"
        if self.rotate_half:
            return torch.cat([pairs, pairs + dense // 2], dim=-1)  # (H, 2w): (m j)
        return torch.stack([2 * pairs, 2 * pairs + 1], dim=-1).flatten(-2)  # (H, 2w): (j m)

    def kept_rope(self, rope: torch.Tensor) -> torch.Tensor:
        """The columns of ``rope`` (sin then cos over the ``rope_dim`` dense channels, broadcastable
        to ``(B, H, N, 2*rope_dim)``: ``(N, .)``, ``(H, N, .)``, ``(B, 1, N, .)``, ...) that each
        head's kept channels use: ``(b, H, N, 2*head_dim)``, sin then cos."""
        dense, heads = cast(int, self.rope_dim), self.num_heads
        if rope.shape[-1] != 2 * dense or rope.dim() > 4:
            raise ValueError(
                f"rope of shape {tuple(rope.shape)} does not fit rotary width {dense} (expected "
                f"(..., N, {2 * dense}), at most 4 dimensions)"
            )
        idx = self.rope_channels()  # (H, 2w)
        idx = torch.cat([idx, idx + dense], dim=-1).to(rope.device)  # (H, 4w): sin, then cos
        while rope.dim() < 4:
            rope = rope.unsqueeze(0)
        b, _, n, width = rope.shape
        rope = rope.expand(b, heads, n, width)  # (b, H, N, 2*rope_dim)
        return torch.gather(rope, -1, idx[None, :, None, :].expand(b, heads, n, idx.shape[-1]))


def head_major(t: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows gathered one slot per channel, ``(d, H)`` order, to the module's ``(H, d)`` order."""
    return rearrange(t, "(c h) ... -> (h c) ...", h=heads)


def pair_major(t: torch.Tensor, heads: int, half: bool) -> torch.Tensor:
    """q/k rows gathered one slot per pair member, ``(m, H, w)`` order, to the module's layout:
    ``(H, m, w)`` half-split or ``(H, w, m)`` interleaved."""
    pattern = "(m h w) ... -> (h m w) ..." if half else "(m h w) ... -> (h w m) ..."
    return rearrange(t, pattern, m=2, h=heads)


def per_channel(factors: torch.Tensor, half: bool) -> torch.Tensor:
    """One factor per pair ``(..., w)`` to one per channel ``(..., 2w)``, in the pairs' layout."""
    return torch.cat([factors, factors], dim=-1) if half else factors.repeat_interleave(2, dim=-1)
