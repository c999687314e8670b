"""Why does similarity_indicator do what it does? One-factor variants on the embedded model.

    python benchmarks/investigate_similarity.py [--budget 0.5] [--seeds 0]

Each variant is a normal search run (the default preset plus the listed overrides) under
``runs/investigate``; finished runs are reused. Prints a Markdown table and writes
docs/results/investigate_similarity.md.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

from nas_headprune.config import load_config
from nas_headprune.runner import run_search

VARIANTS: dict[str, list[str]] = {
    "defaults": [],
    "no reweight step (evaluator)": ["reweight.mode=none"],
    "similarity=none": ["strategy_options.similarity=none"],
    "similarity=alignment": ["strategy_options.similarity=alignment"],
    "steps=400": ["strategy_options.steps=400"],
    "lam=40": ["strategy_options.lam=40"],
    "weights frozen during search": ["strategy_options.train_weights=false"],
    "balance=false": ["strategy_options.balance=false"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--root", default="runs/investigate")
    p.add_argument("--report", default="docs/results/investigate_similarity.md")
    args = p.parse_args(argv)
    from nas_headprune.registry import strategy_class

    defaults = strategy_class("similarity_indicator").Config()
    lines = [
        "| variant | overrides | top-1 after reweight (%) | top-1 after fine-tune (%) | MACs (% of dense) | search s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in args.variants:
        before, after, ratio, secs = [], [], [], []
        for seed in args.seeds:
            slug = name.replace(" ", "_").replace("=", "-").replace("(", "").replace(")", "")
            out = Path(args.root) / f"{slug}-b{args.budget}-s{seed}"
            overrides = [
                "strategy=similarity_indicator",
                f"budget={args.budget}",
                f"seed={seed}",
                "progress=false",
            ]
            result = run_search(load_config("default", overrides + VARIANTS[name]), out)
            before.append(result["pruned"]["before_finetune"]["top1"])
            after.append(result["pruned"]["after_finetune"]["top1"])
            ratio.append(100 * result["pruned"]["macs_ratio"])
            secs.append(result["timings"]["search_s"])
        mean = statistics.mean
        lines.append(
            f"| {name} | {' '.join(VARIANTS[name]) or '-'} | {mean(before):.2f} | {mean(after):.2f} | "
            f"{mean(ratio):.1f} | {mean(secs):.0f} |"
        )
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    report = Path(args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/investigate_similarity.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    report.write_text(
        f"# similarity_indicator: one-factor variants\n\nCommand: `{cmd.strip()}`\n\n"
        f"Budget {args.budget}, seeds {args.seeds}; defaults: lam={defaults.lam}, steps={defaults.steps}, "
        f"similarity={defaults.similarity}, alpha={defaults.alpha}.\n\n{table}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
