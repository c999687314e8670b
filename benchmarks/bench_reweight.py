"""Does the shared reweighting step help? Top-1 of pruned models with and without it, no fine-tune.

    python benchmarks/bench_reweight.py [--strategies magnitude taylor] [--budgets 0.5 0.7]

Runs on the embedded Fashion-MNIST model; each cell is a normal search run (``finetune.epochs=0``)
under ``runs/bench_reweight``. Prints a Markdown table and writes docs/results/reweight.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from nas_headprune.config import load_config
from nas_headprune.runner import run_search

MODES = ["none", "lstsq", "scales", "lstsq+scales"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", nargs="+", default=["magnitude", "taylor", "random"])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.7])
    p.add_argument("--root", default="runs/bench_reweight")
    p.add_argument("--report", default="docs/results/reweight.md")
    args = p.parse_args(argv)
    header = (
        "| strategy | budget | "
        + " | ".join(f"top-1 {m} (%)" for m in MODES)
        + " | block error none -> lstsq |"
    )
    lines = [header, "|" + " --- |" * (len(MODES) + 3)]
    for strategy in args.strategies:
        for budget in args.budgets:
            cells, err = [], ""
            for mode in MODES:
                out = Path(args.root) / f"{strategy}-b{budget}-{mode.replace('+', '_')}"
                cfg = load_config(
                    "default",
                    [
                        f"strategy={strategy}",
                        f"budget={budget}",
                        f"reweight.mode={mode}",
                        "finetune.epochs=0",
                        "progress=false",
                    ],
                )
                result = run_search(cfg, out)
                cells.append(f"{result['pruned']['before_finetune']['top1']:.2f}")
                if mode == "lstsq":
                    rw = result["reweight"]
                    err = f"{rw['mean_before']:.3f} -> {rw['mean_after']:.3f}"
            dense = result["dense"]["top1"]
            lines.append(f"| {strategy} | {budget} | " + " | ".join(cells) + f" | {err} |")
            print(lines[-1], f"(dense {dense:.2f})", flush=True)
    table = "\n".join(lines)
    print(table)
    report = Path(args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/bench_reweight.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    report.write_text(
        f"# Shared reweighting, before fine-tuning\n\nCommand: `{cmd.strip()}`\n\n"
        f"Dense top-1: {dense:.2f}%\n\n{table}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
