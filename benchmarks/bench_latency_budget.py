"""How close does a latency budget land? Half the batch-1 latency of the embedded ViT, refined or not.

    python benchmarks/bench_latency_budget.py [--seeds 0 1 2] [--root runs/bench_latency_budget]
                                              [--report docs/results/latency_budget.md]

Every run is the normal pipeline (``run_search`` with the ``default`` config: embedded Fashion-MNIST
ViT, search, least-squares reweight, distilled fine-tune, evaluation), one after the other, torch on
1 thread, with ``taylor``:

- ``latency 0.5 b1, refined``: ``budget_kind=latency``, ``budget=0.5``, ``latency.batch_size=1``,
  ``latency.threads=1``, ``space.prune_heads=true``, ``space.drop_sublayers=true``, the
  ``latency:`` section's other settings at their defaults (so ``latency.refine_rounds`` 3);
- ``latency 0.5 b1, table only``: the same with ``latency.refine_rounds=0`` (the search trusts the
  measured table);
- ``MACs 0.5``: the default MACs budget of 0.5 with the default space, for the accuracy next to it.

The latency runs share one latency table (``latency.cache_dir`` under ``--root``), measured by the
first of them. For each run the report gives the refinement's rounds (predicted and measured fraction
of the dense latency at batch 1), the evaluate stage's check after fine-tuning (the pruned and dense
models timed against each other, ``latency.check_rounds`` rounds), whether it is within 10% of the
budget, the MACs fraction, and top-1 on the validation split (``data.val_split=5000``: 5,000 training
images held out of the fine-tune, as in the ablation presets) and on the test set. Finished run
folders under ``--root`` are reused.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nas_headprune.config import load_config
from nas_headprune.runner import run_search

LATENCY = [
    "strategy=taylor",
    "budget_kind=latency",
    "budget=0.5",
    "latency.batch_size=1",
    "latency.threads=1",
    "space.prune_heads=true",
    "space.drop_sublayers=true",
]
VARIANTS: dict[str, list[str]] = {
    "latency 0.5 b1, refined": LATENCY,
    "latency 0.5 b1, table only": [*LATENCY, "latency.refine_rounds=0"],
    "MACs 0.5": ["strategy=taylor", "budget=0.5"],
}


def run_one(variant: str, seed: int, root: Path) -> dict[str, Any]:
    slug = variant.replace(" ", "_").replace(",", "").replace(".", "")
    overrides = [
        *VARIANTS[variant],
        f"seed={seed}",
        "data.val_split=5000",
        "progress=false",
        f"latency.cache_dir={root / 'latency_cache'}",
    ]
    folder = root / f"{slug}-s{seed}"
    reused = (folder / "result.json").is_file()
    t0 = time.perf_counter()
    result = run_search(load_config("default", overrides), folder)
    return {"result": result, "seconds": time.perf_counter() - t0, "reused": reused}


def _top1(record: dict[str, Any], split: str) -> float | None:
    pruned = record["pruned"]
    return pruned.get("val_top1") if split == "val" else pruned["after_finetune"].get("top1")


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _mean_sd(xs: list[float], digits: int) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.{digits}f} ± {sd:.{digits}f}"


def report(
    runs: dict[tuple[str, int], dict[str, Any]], seeds: list[int], argv: list[str], wall: float
) -> str:
    load = os.getloadavg()
    reused = sum(bool(r["reused"]) for r in runs.values())
    lines = [
        "# Latency budgets: half the batch-1 latency of the embedded ViT",
        "",
        f"Command: `python benchmarks/bench_latency_budget.py {' '.join(argv)}` ({wall / 60:.1f} minutes"
        + (
            f"; {reused} of the {len(runs)} runs were finished run folders under `--root`, reused)."
            if reused
            else ")."
        ),
        "",
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores shared with other work; "
        f"torch on 1 thread. Load average (1, 5, 15 min) at the end: {tuple(round(v, 2) for v in load)}.",
        "",
        "Fractions are of the dense model's latency at batch 1, pruned and dense timed against each other. "
        "`rounds` lists, per search of the refinement, the fraction the table predicted -> the fraction "
        "measured (the kept round in bold); `check` is the evaluate stage's measurement after the "
        "fine-tune; `within 10%` compares it with the budget.",
        "",
        "| variant | seed | rounds | check | within 10% | MACs | top-1 val | top-1 test |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant in VARIANTS:
        for seed in seeds:
            record = runs[(variant, seed)]["result"]
            latency = record.get("latency")
            if latency:
                refinement = latency.get("refinement")
                if refinement:
                    cells = []
                    for r in refinement["rounds"]:
                        cell = f"{r['predicted_fraction']:.3f} -> {r['measured_fraction']:.3f}"
                        cells.append(f"**{cell}**" if r["round"] == refinement["chosen"] else cell)
                    rounds = "; ".join(cells)
                else:
                    rounds = f"{latency['predicted_fraction']:.3f} (no refinement)"
                check = f"{latency['measured_fraction']:.3f}"
                within = "yes" if abs(latency["measured_over_budget"] - 1.0) <= 0.10 else "no"
            else:
                rounds, check, within = "-", "-", "-"
            lines.append(
                f"| {variant} | {seed} | {rounds} | {check} | {within} | "
                f"{record['pruned']['macs_ratio']:.3f} | {_fmt(_top1(record, 'val'))} | {_fmt(_top1(record, 'test'))} |"
            )
    lines += [
        "",
        "Means over the seeds:",
        "",
        "| variant | check | top-1 val | top-1 test |",
        "| --- | --- | --- | --- |",
    ]
    for variant in VARIANTS:
        records = [runs[(variant, s)]["result"] for s in seeds]
        checks = [r["latency"]["measured_fraction"] for r in records if r.get("latency")]
        vals = [v for v in (_top1(r, "val") for r in records) if v is not None]
        tests = [v for v in (_top1(r, "test") for r in records) if v is not None]

        lines.append(f"| {variant} | {_mean_sd(checks, 3)} | {_mean_sd(vals, 2)} | {_mean_sd(tests, 2)} |")
    dense = runs[(next(iter(VARIANTS)), seeds[0])]["result"]["dense"]
    dense_val = dense.get("val_top1")
    lines += ["", f"Dense: top-1 {_fmt(dense_val)} (val), {_fmt(dense.get('top1'))} (test).", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", type=Path, default=Path("runs/bench_latency_budget"))
    parser.add_argument("--report", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    runs = {}
    for variant in VARIANTS:
        for seed in args.seeds:
            print(f"{variant}, seed {seed} ...", file=sys.stderr, flush=True)
            runs[(variant, seed)] = run_one(variant, seed, args.root)
    text = report(runs, args.seeds, argv, time.perf_counter() - t0)
    print(text)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
