"""Time one search step of ``similarity_indicator`` against one plain dense training step.

Both are measured in this one run, on the same model and batch: the Fashion-MNIST ViT shape of the
project's default preset (img 28, patch 4, 1 channel, embed 96, depth 4, 4 heads, MLP ratio 2,
10 classes, randomly initialised) at batch 128 of random images.

* dense step: forward, cross-entropy, backward, ``torch.optim.AdamW`` step.
* search step: everything one iteration of the search does (scores, head-balanced masks with the
  straight-through estimator, reweight scales, masked forward, cross-entropy, differentiable MACs
  penalty, backward, one AdamW step over weights, indicators and scales, bookkeeping), timed between
  consecutive calls of the strategy's per-step hook.

The two are measured in alternating rounds so a change of machine load hits both. Run::

    python benchmarks/bench_search_step.py            # about 40 s on 2 shared CPU cores
    python benchmarks/bench_search_step.py --threads 2 --steps 40
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nas_headprune.evaluator.measure import measure_macs  # noqa: E402
from nas_headprune.models.factory import create_model  # noqa: E402
from nas_headprune.space import build_space  # noqa: E402
from nas_headprune.strategies.similarity_indicator import SimilarityIndicator  # noqa: E402
from nas_headprune.strategy import SearchContext  # noqa: E402

SIZE = (1, 28, 28)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(
        "vit_tiny_patch16_224",
        img_size=28,
        patch_size=4,
        in_chans=1,
        embed_dim=96,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
        num_classes=10,
    ).eval()


def dense_steps(
    model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], steps: int, warmup: int
) -> list[float]:
    model = make_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = batch
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def search_steps(
    model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], steps: int, warmup: int
) -> list[float]:
    space = build_space(model, SIZE)
    ends: list[float] = []  # when each step ended
    ctx = SearchContext(
        model=model,
        space=space,
        budget=0.5,
        dense_macs=measure_macs(model, SIZE),
        calib=[batch],
        seed=0,
        on_step=lambda step, masks: ends.append(time.perf_counter()),
    )
    SimilarityIndicator({"steps": warmup + steps + 1, "checkpoint_every": 0}).search(ctx)
    ends = ends[warmup:]
    return [b - a for a, b in zip(ends, ends[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on shared cores more threads mostly wait on each other)",
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    # the timed searches are far too short to reach the budget; their fix-up warning is expected
    logging.getLogger("nas_headprune").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    batch = (
        torch.randn(args.batch, *SIZE, generator=gen),
        torch.randint(0, 10, (args.batch,), generator=gen),
    )
    model = make_model()
    dense: list[float] = []
    search: list[float] = []
    for _ in range(args.rounds):
        dense += dense_steps(model, batch, args.steps, warmup=3)
        search += search_steps(model, batch, args.steps, warmup=3)
    d, s = statistics.mean(dense), statistics.mean(search)
    print(
        f"model: ViT img 28 patch 4 embed 96 depth 4 heads 4 mlp 2; batch {args.batch}; "
        f"torch {torch.__version__}, {args.threads} thread(s)"
    )
    print(
        f"dense training step (fwd+bwd+AdamW):  mean {d * 1e3:7.1f} ms  (median {statistics.median(dense) * 1e3:.1f}, n={len(dense)})"
    )
    print(
        f"similarity_indicator search step:     mean {s * 1e3:7.1f} ms  (median {statistics.median(search) * 1e3:.1f}, n={len(search)})"
    )
    print(
        f"ratio search / dense: {s / d:.3f} (median ratio {statistics.median(search) / statistics.median(dense):.3f})"
    )


if __name__ == "__main__":
    main()
