"""The attention paths of pruned layers with unequal q/k and v head widths, one call of ``attend``.

Shapes as pruning produces them (``benchmarks/bench_attention_paths.py`` lists every shape of the
pruned models; these are a few of them): the embedded Fashion-MNIST ViT (4 heads, 50 tokens) and a
ViT-Ti/16 at 224x224 (3 heads, 197 tokens), each with q/k wider than v and v wider than q/k, at
batch 64. Every path of ``nas_headprune.spaces._fused_qkv.ATTENTION_PATHS`` is timed; the summary
gives each path's time relative to the math path and the path ``attention_path`` chooses.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nas_headprune.spaces._fused_qkv import ATTENTION_PATHS, attend, attention_path, split_qkv

#: (name, batch, heads, tokens, d_qk, d_v, dense head width)
SHAPES = (
    ("vit_fmnist", 64, 4, 50, 8, 7, 24),
    ("vit_fmnist", 64, 4, 50, 7, 8, 24),
    ("vit_tiny_224", 64, 3, 197, 18, 17, 64),
    ("vit_tiny_224", 64, 3, 197, 17, 18, 64),
)


def _cases() -> list:
    cases = []
    for name, batch, heads, tokens, d_qk, d_v, dense in SHAPES:
        for dev in ("cpu", "cuda"):
            for path in ATTENTION_PATHS:
                cases.append(
                    pytest.param(
                        (name, batch, heads, tokens, d_qk, d_v, dense),
                        dev,
                        path,
                        id=f"{name}-{dev}-b{batch}-qk{d_qk}-v{d_v}-{path}",
                    )
                )
    return cases


@pytest.mark.parametrize(("shape", "device", "path"), _cases(), indirect=["device"])
def test_attend(device: torch.device, perf, shape: tuple, path: str) -> None:
    name, batch, heads, tokens, d_qk, d_v, dense = shape
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, tokens, heads * (2 * d_qk + d_v), generator=gen).to(device)
    q, k, v = split_qkv(qkv, heads, d_qk, d_v)  # views of one projection, as in the model
    drop = nn.Dropout(0.0)
    scale = dense**-0.5
    with torch.inference_mode():
        reference = attend(q, k, v, scale, fused=True, dropout=drop, path="math")
        out = attend(q, k, v, scale, fused=True, dropout=drop, path=path)
        assert (out - reference).abs().max().item() < 1e-4  # every path computes the same
        perf(
            lambda: attend(q, k, v, scale, fused=True, dropout=drop, path=path),
            section="attention_paths",
            group=f"attention {name} {device.type} batch {batch} qk {d_qk} v {d_v}",
            device=device,
            model=name,
            batch=batch,
            heads=heads,
            tokens=tokens,
            d_qk=d_qk,
            d_v=d_v,
            path=path,
            chosen=attention_path(device.type, d_qk, d_v),
        )
