"""CPU throughput of focused linear attention against softmax attention of the same width as the
number of tokens grows (the reason linear attention exists). Measured in one run, interleaved.

    python benchmarks/bench_linear_attention.py [--dim 96] [--heads 4] [--batch 4] [--grids 7 14 28 56]

Prints a Markdown table: milliseconds per forward of each module, the ratio, and the analytic MACs
of each (from nas_headprune.evaluator.cost).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from timm.layers.attention import Attention

from nas_headprune.evaluator.cost import linear_attention_macs, softmax_attention_macs
from nas_headprune.models.flatten import FocusedLinearAttention


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--grids", type=int, nargs="+", default=[7, 14, 28, 56])
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    d = args.dim // args.heads
    print(f"dim {args.dim}, {args.heads} heads, batch {args.batch}, threads {torch.get_num_threads()}")
    print("| tokens | softmax ms | linear ms | softmax / linear | softmax MMACs | linear MMACs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for g in args.grids:
        n = g * g
        soft = Attention(args.dim, num_heads=args.heads, qkv_bias=True).eval()
        lin = FocusedLinearAttention(args.dim, args.heads, (g, g)).eval()
        x = torch.randn(args.batch, n, args.dim)
        times: dict[str, list[float]] = {"softmax": [], "linear": []}
        with torch.inference_mode():
            for module in (soft, lin):
                module(x)
            for i in range(args.iters):
                order = [("softmax", soft), ("linear", lin)][:: 1 if i % 2 == 0 else -1]
                for name, module in order:
                    t0 = time.perf_counter()
                    module(x)
                    times[name].append(time.perf_counter() - t0)
        s_ms = 1000 * statistics.median(times["softmax"])
        l_ms = 1000 * statistics.median(times["linear"])
        s_macs = softmax_attention_macs(n, n, args.dim, args.dim, args.heads, d, d) / 1e6
        l_macs = linear_attention_macs(n, args.dim, args.dim, args.heads, d, d, 5) / 1e6
        print(
            f"| {n} | {s_ms:.2f} | {l_ms:.2f} | {s_ms / l_ms:.2f} | {s_macs:.1f} | {l_macs:.1f} |", flush=True
        )


if __name__ == "__main__":
    main()
