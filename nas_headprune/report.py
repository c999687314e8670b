"""``nas-headprune report``: tables, CSV and plots from the results store(s) of an ablation.

Writes into the output folder (default ``DIR/report``):

- ``report.md``: mean and standard deviation over seeds per strategy, budget and variant; a table per
  variant when the ablation has several; every failed or unfinished trial with its error.
- ``trials.csv``: one row per trial (axes, status, metrics, timings, error).
- ``accuracy_vs_macs.png``: top-1 after fine-tuning against the measured MACs ratio, one line per
  strategy (and variant), error bars = standard deviation over seeds.
- ``ablation.png`` (when there are several variants): a bar chart of top-1 per variant.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas_headprune.atomic import atomic_path, atomic_write_text
from nas_headprune.store import SUMMARY_COLUMNS, load_rows

CSV_COLUMNS = (
    "trial_id",
    "strategy",
    "budget",
    "variant",
    "seed",
    "status",
    "attempts",
    "seconds",
    *SUMMARY_COLUMNS,
    "error",
    "store",
)


@dataclass
class Group:
    strategy: str
    budget: float
    variant: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "done"]

    def values(self, column: str, scale: float = 1.0) -> list[float]:
        return [r[column] * scale for r in self.done if r.get(column) is not None]


def _mean_std(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(values: list[float], digits: int = 2) -> str:
    ms = _mean_std(values)
    if ms is None:
        return "n/a"
    if len(values) == 1:
        return f"{ms[0]:.{digits}f}"
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def _dense_top1(rows: list[dict[str, Any]]) -> list[float]:
    """The dense model's top-1 as recorded by every finished trial."""
    return [r["top1_dense"] for r in rows if r["status"] == "done" and r.get("top1_dense") is not None]


def status_counts(rows: list[dict[str, Any]]) -> tuple[int, int, int]:
    """(finished, failed, not finished: pending, running or interrupted) trials."""
    done = sum(r["status"] == "done" for r in rows)
    failed = sum(r["status"] == "failed" for r in rows)
    return done, failed, len(rows) - done - failed


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def group_rows(rows: list[dict[str, Any]]) -> list[Group]:
    groups: OrderedDict[tuple[str, float, str], Group] = OrderedDict()
    for r in rows:
        key = (r["strategy"], r["budget"], r["variant"])
        groups.setdefault(key, Group(*key)).rows.append(r)
    return list(groups.values())


def _variants(rows: list[dict[str, Any]]) -> list[str]:
    return list(OrderedDict.fromkeys(r["variant"] for r in rows))


def markdown(rows: list[dict[str, Any]], meta: dict[str, str], report_command: str = "") -> str:
    out = io.StringIO()
    name = meta.get("ablation", "ablation")
    out.write(f"# Ablation `{name}`\n\n")
    if meta.get("command"):
        out.write(f"Made by: `{meta['command']}`")
        out.write(f", then `{report_command}`.\n\n" if report_command else ".\n\n")
    n_done, n_failed, n_open = status_counts(rows)
    out.write(f"Trials: {len(rows)} ({n_done} finished, {n_failed} failed, {n_open} not finished).\n\n")
    out.write(
        "Top-1 is on the test split (%); mean ± standard deviation over the seeds that finished. "
        "MACs and parameters are measured on the pruned model, as % of the dense model. Speedup is the "
        "measured throughput ratio pruned/dense of that trial (timed while other trials may share the "
        "machine). Search s is the search time recorded with the search result; trial s is the wall "
        "time of the attempt that finished the trial, so a retried trial that resumed a finished "
        "search can take less than its search. Validation top-1 is on the split held out of the "
        "training data (`data.val_split`; empty when the ablation holds none): make choices on it and "
        "read the test column once, for the final table. Training steps are the optimizer steps that "
        "trained the weights: the search's plus the fine-tune's.\n\n"
    )
    dense = _dense_top1(rows)
    if dense:
        out.write(f"Dense model top-1: {statistics.mean(dense):.2f}%")
        dense_val = [
            r["top1_val_dense"] for r in rows if r["status"] == "done" and r.get("top1_val_dense") is not None
        ]
        out.write(f" (validation: {statistics.mean(dense_val):.2f}%).\n\n" if dense_val else ".\n\n")
    groups = group_rows(rows)
    out.write(
        "| strategy | budget | variant | seeds | top-1 before fine-tune | top-1 after fine-tune | "
        "validation top-1 after fine-tune | training steps | MACs % | params % | speedup | search s | "
        "trial s |\n"
    )
    out.write("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    for g in groups:
        failed = len(g.rows) - len(g.done)
        seeds = f"{len(g.done)}" + (f" ({failed} not finished)" if failed else "")
        out.write(
            f"| {g.strategy} | {g.budget:g} | {g.variant} | {seeds} | {_fmt(g.values('top1_before'))} | "
            f"{_fmt(g.values('top1_after'))} | {_fmt(g.values('top1_val_after'))} | "
            f"{_fmt(g.values('steps_total'), 0)} | {_fmt(g.values('macs_ratio', 100), 1)} | "
            f"{_fmt(g.values('params_ratio', 100), 1)} | {_fmt(g.values('speedup'))} | "
            f"{_fmt(g.values('search_s'), 1)} | {_fmt(g.values('seconds'), 0)} |\n"
        )
    variants = _variants(rows)
    if len(variants) > 1:
        # choices are made on validation: compare variants on it whenever the trials hold a validation split
        column, split = (
            ("top1_val_after", "validation")
            if any(r.get("top1_val_after") is not None for r in rows)
            else ("top1_after", "test")
        )
        out.write("\n## Per variant\n\n")
        out.write(
            f"Difference to the first variant, {split} top-1 after fine-tuning, per strategy and budget.\n\n"
        )
        out.write(f"| strategy | budget | variant | {split} top-1 after fine-tune | difference |\n")
        out.write("| --- | --- | --- | --- | --- |\n")
        by_sb: OrderedDict[tuple[str, float], list[Group]] = OrderedDict()
        for g in groups:
            by_sb.setdefault((g.strategy, g.budget), []).append(g)
        for (strategy, budget), gs in by_sb.items():
            ref = _mean_std(gs[0].values(column))
            for g in gs:
                ms = _mean_std(g.values(column))
                diff = "" if ms is None or ref is None else f"{ms[0] - ref[0]:+.2f}"
                out.write(f"| {strategy} | {budget:g} | {g.variant} | {_fmt(g.values(column))} | {diff} |\n")
    bad = [r for r in rows if r["status"] != "done"]
    if bad:
        out.write("\n## Trials that did not finish\n\n")
        out.write("| trial | status | attempts | error |\n| --- | --- | --- | --- |\n")
        for r in bad:
            err = (
                r.get("error") or ("running, or interrupted" if r["status"] == "running" else "not run yet")
            ).replace("|", "\\|")
            err = " ".join(err.split())
            out.write(f"| {r['trial_id']} | {r['status']} | {r['attempts']} | {err} |\n")
    out.write("\nFiles: `trials.csv` (one row per trial), `accuracy_vs_macs.png`")
    out.write(", `ablation.png`.\n" if len(variants) > 1 else ".\n")
    return out.getvalue()


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k) for k in CSV_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_accuracy_vs_macs(rows: list[dict[str, Any]], path: Path) -> bool:
    plt = _pyplot()
    series: OrderedDict[str, list[Group]] = OrderedDict()
    variants = _variants(rows)
    for g in group_rows(rows):
        label = g.strategy if len(variants) == 1 else f"{g.strategy} / {g.variant}"
        series.setdefault(label, []).append(g)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for label, gs in series.items():
        pts = []
        for g in gs:
            x, y = _mean_std(g.values("macs_ratio", 100)), _mean_std(g.values("top1_after"))
            if x is not None and y is not None:
                pts.append((x[0], y[0], y[1]))
        if not pts:
            continue
        pts.sort()
        ax.errorbar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            yerr=[p[2] for p in pts],
            marker="o",
            capsize=3,
            label=label,
        )
        drawn = True
    dense = _dense_top1(rows)
    if dense:
        ax.axhline(statistics.mean(dense), color="grey", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel("MACs of the pruned model (% of dense)")
    ax.set_ylabel("top-1 after fine-tuning (%)")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return drawn


def plot_ablation(rows: list[dict[str, Any]], path: Path) -> bool:
    variants = _variants(rows)
    if len(variants) < 2:
        return False
    plt = _pyplot()
    groups = group_rows(rows)
    panels = list(OrderedDict.fromkeys((g.strategy, g.budget) for g in groups))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(max(5, 1.3 * len(variants)) * len(panels), 4), squeeze=False
    )
    for ax, (strategy, budget) in zip(axes[0], panels, strict=True):
        gs = [g for g in groups if (g.strategy, g.budget) == (strategy, budget)]
        labels, means, stds, means_b, stds_b = [], [], [], [], []
        for g in gs:
            after, before = _mean_std(g.values("top1_after")), _mean_std(g.values("top1_before"))
            labels.append(g.variant)
            means.append(after[0] if after else math.nan)
            stds.append(after[1] if after else 0.0)
            means_b.append(before[0] if before else math.nan)
            stds_b.append(before[1] if before else 0.0)
        xs = range(len(labels))
        w = 0.38
        ax.bar([x - w / 2 for x in xs], means_b, w, yerr=stds_b, capsize=3, label="before fine-tune")
        ax.bar([x + w / 2 for x in xs], means, w, yerr=stds, capsize=3, label="after fine-tune")
        finite = [v for v in means + means_b if not math.isnan(v)]
        if finite:
            ax.set_ylim(min(finite) - 2, max(finite) + 1)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{strategy}, budget {budget:g}", fontsize=9)
        ax.set_ylabel("top-1 (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)
    return True


def write_report(
    directory: str | Path, out: str | Path | None = None, report_command: str = ""
) -> dict[str, Any]:
    """Merge the stores in ``directory`` and write the report files; returns what was written."""
    rows, meta = load_rows(directory)
    out = Path(out) if out is not None else Path(directory) / "report"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", markdown(rows, meta, report_command))
    write_csv(rows, out / "trials.csv")
    plot_accuracy_vs_macs(rows, out / "accuracy_vs_macs.png")
    files = [out / "report.md", out / "trials.csv", out / "accuracy_vs_macs.png"]
    if plot_ablation(rows, out / "ablation.png"):
        files.append(out / "ablation.png")
    done, failed, not_finished = status_counts(rows)
    return {
        "trials": len(rows),
        "files": [str(f) for f in files],
        "done": done,
        "failed": failed,
        "not_finished": not_finished,
    }
