"""Compare strategies on the embedded Fashion-MNIST model: same budgets, seeds and fine-tune budget.

    python benchmarks/compare_strategies.py                       # the full comparison
    python benchmarks/compare_strategies.py --strategies magnitude random --budgets 0.5 --seeds 0

Each trial is a normal ``search`` run in ``--root`` (default ``runs/compare``); finished trials are
reused, so a killed comparison resumes. Prints a Markdown table (mean and standard deviation over
seeds of top-1 after reweighting and after fine-tuning) and writes it to ``--report``.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

from nas_headprune.config import load_config
from nas_headprune.errors import NasHeadpruneError
from nas_headprune.runner import run_search


def _fmt(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--strategies", nargs="+", default=["similarity_indicator", "magnitude", "taylor", "random"]
    )
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.7])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], help="extra dotted overrides for every trial"
    )
    p.add_argument("--root", default="runs/compare")
    p.add_argument("--report", default="docs/results/compare_strategies.md")
    args = p.parse_args(argv)

    rows = []
    failures = []
    for strategy in args.strategies:
        for budget in args.budgets:
            before, after, ratio, secs = [], [], [], []
            for seed in args.seeds:
                out = Path(args.root) / f"{strategy}-b{budget}-s{seed}"
                overrides = [
                    f"strategy={strategy}",
                    f"budget={budget}",
                    f"seed={seed}",
                    "progress=false",
                    *args.overrides,
                ]
                t0 = time.perf_counter()
                try:
                    result = run_search(load_config("default", overrides), out)
                except NasHeadpruneError as exc:
                    failures.append(f"{strategy} b={budget} s={seed}: {exc}")
                    continue
                secs.append(time.perf_counter() - t0)
                before.append(result["pruned"]["before_finetune"]["top1"])
                after.append(result["pruned"]["after_finetune"]["top1"])
                ratio.append(result["pruned"]["macs_ratio"])
                dense = result["dense"]["top1"]
                print(
                    f"{strategy:>22} budget {budget} seed {seed}: top1 {after[-1]:.2f} "
                    f"(before fine-tune {before[-1]:.2f}, dense {dense:.2f}), MACs {ratio[-1]:.3f}",
                    flush=True,
                )
            rows.append(
                (strategy, budget, len(after), _fmt(before), _fmt(after), _fmt([100 * r for r in ratio]))
            )

    lines = [
        "| strategy | budget | seeds | top-1 after reweight (%) | top-1 after fine-tune (%) | MACs (% of dense) |",
        "| --- | --- | --- | --- | --- | --- |",
        *[f"| {s} | {b} | {n} | {bf} | {af} | {r} |" for s, b, n, bf, af, r in rows],
    ]
    table = "\n".join(lines)
    print(table)
    command = "python benchmarks/compare_strategies.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    report = Path(args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    text = f"# Strategy comparison on the embedded Fashion-MNIST ViT\n\nCommand: `{command.strip()}`\n\n{table}\n"
    if failures:
        text += "\nFailed trials:\n\n" + "\n".join(f"- {f}" for f in failures) + "\n"
    report.write_text(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
