"""``nas-headprune`` command line. Exit codes: 0 ok, 1 runtime failure, 2 usage or config error."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from nas_headprune.errors import NasHeadpruneError, UsageError

log = logging.getLogger("nas_headprune")

DEFAULT_PRESET = "default"


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    try:
        from rich.console import Console
        from rich.logging import RichHandler

        # logs go to stderr so that stdout carries only the command's result (JSON)
        handler: logging.Handler = RichHandler(
            console=Console(stderr=True), show_path=False, rich_tracebacks=False
        )
    except ImportError:  # pragma: no cover
        handler = logging.StreamHandler()
    logging.basicConfig(level=level, handlers=[handler], format="%(message)s")
    # the project's own messages: INFO by default and with -v, DEBUG with -vv (other libraries:
    # warnings only, unless -v / -vv)
    logging.getLogger("nas_headprune").setLevel(logging.DEBUG if verbose > 1 else logging.INFO)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nas-headprune", description=__doc__)
    p.add_argument("-v", "--verbose", action="count", default=0)
    from nas_headprune import __version__

    p.add_argument("--version", action="version", version=f"nas-headprune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", help="prune a model to a MACs budget with a strategy")
    s.add_argument("--strategy", help="registered name or package.module:Class (default from the config)")
    s.add_argument("--config", default=None, help=f"YAML file or preset name (default: {DEFAULT_PRESET})")
    s.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. budget=0.7 or strategy_options.norm=l2 (repeatable)",
    )
    s.add_argument("--out", default=None, help="run folder (default: runs/<strategy>-b<budget>-s<seed>)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument(
        "--quick", action="store_true", help="apply the config's 'quick' section (a small run of the recipe)"
    )
    s.add_argument(
        "--restart",
        action="store_true",
        help="redo a stage of --out recorded with other settings, and every later stage (default: refuse)",
    )

    sub.add_parser("strategies", help="list installed strategies")

    c = sub.add_parser("config", help="show a strategy's options (defaults and schema)")
    c.add_argument("--strategy", required=True)
    c.add_argument("--schema", action="store_true", help="print the JSON schema instead of the defaults")

    t = sub.add_parser("train", help="train a dense base model (how the embedded default was made)")
    t.add_argument("--config", required=True, help="YAML file or preset name, e.g. train_vit_fmnist")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--out", required=True)
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("evaluate", help="evaluate a saved pruned model (a run folder or its model/)")
    e.add_argument("dir")
    e.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="data overrides, e.g. data.test_subset=1000 (only data.* keys)",
    )
    a = sub.add_parser(
        "ablate",
        help="run a declared sweep of strategies, budgets, seeds and config variants (resumable)",
    )
    a.add_argument("file", help="ablation YAML file or preset name (e.g. fmnist_baselines)")
    a.add_argument("--out", default=None, help="ablation folder (default: runs/ablate/<name>)")
    a.add_argument("--workers", type=int, default=1, help="trials run in parallel worker processes")
    a.add_argument("--shard", default=None, metavar="I/N", help="run only shard I of N (0-based)")
    a.add_argument("--quick", action="store_true", help="apply the file's 'quick' section (a small run)")
    a.add_argument("--no-progress", action="store_true")
    a.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    a.add_argument(
        "--launcher",
        choices=["local", "submitit"],
        default="local",
        help="local: trials run here (default); submitit: one SLURM array task per trial",
    )
    a.add_argument(
        "--launcher-config",
        default=None,
        metavar="FILE",
        help="YAML with launcher settings, over the file's launcher section (submitit only)",
    )
    a.add_argument(
        "--no-wait",
        action="store_true",
        help="submit and return; `nas-headprune report DIR` once the jobs ended (submitit only)",
    )

    r = sub.add_parser("report", help="write the Markdown/CSV/PNG report of an ablation folder")
    r.add_argument("dir", help="the output folder of `nas-headprune ablate`")
    r.add_argument("--out", default=None, help="report folder (default: DIR/report)")
    return p


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_search(args: argparse.Namespace) -> int:
    from nas_headprune.config import load_config

    overrides = list(args.overrides)
    if args.strategy:
        overrides.insert(0, f"strategy={args.strategy}")
    if args.no_progress:
        overrides.append("progress=false")
    # validated before torch is imported
    cfg = load_config(args.config or DEFAULT_PRESET, overrides, quick=args.quick)

    from nas_headprune.runner import run_search

    out = args.out or f"runs/{cfg.strategy.replace(':', '_').replace('.', '_')}-b{cfg.budget}-s{cfg.seed}"
    result = run_search(cfg, out, restart=args.restart)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the run
        return 0
    pruned, dense = result["pruned"], result["dense"]
    summary = {
        "run": str(out),
        "strategy": result["strategy"],
        "macs": f"{pruned['macs']:,} of {dense['macs']:,} ({pruned['macs_ratio']:.3f})",
        "params": f"{pruned['params']:,} of {dense['params']:,}",
        "top1_dense": dense.get("top1"),
        "top1_pruned_before_finetune": pruned["before_finetune"].get("top1"),
        "top1_pruned_after_finetune": pruned["after_finetune"].get("top1"),
        "speedup": result["throughput"].get("pruned", {}).get("speedup"),
        "seconds": {k: round(v, 1) for k, v in result["timings"].items()},
    }
    latency = result.get("latency")
    if latency:
        summary["latency"] = (
            f"{latency['measured_fraction']:.3f} of dense measured, {latency['predicted_fraction']:.3f} "
            f"predicted, budget {latency['budget']} (batch {latency['batch_size']}, {latency['device']})"
        )
        if latency.get("refinement"):
            rounds = latency["refinement"]["rounds"]
            summary["latency"] += (
                f"; table refined on {len(rounds)} measured search(es), #{latency['refinement']['chosen']} kept"
            )
    _print_json(summary)
    return 0


def cmd_strategies(args: argparse.Namespace) -> int:
    from nas_headprune.registry import STRATEGY_GROUP, list_plugins, strategy_class

    rows = []
    for info in list_plugins(STRATEGY_GROUP):
        try:
            summary = strategy_class(info.name).summary or "(no summary)"
        except Exception as exc:  # a broken plugin is listed, not fatal
            summary = f"[failed to load: {exc}]"
        rows.append((info.name, info.provider, summary))
    width = max((len(r[0]) for r in rows), default=4)
    pwidth = max((len(r[1]) for r in rows), default=8)
    for name, provider, summary in rows:
        print(f"{name:<{width}}  {provider:<{pwidth}}  {summary}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from nas_headprune.registry import strategy_class

    cls = strategy_class(args.strategy)
    if args.schema:
        _print_json(cls.Config.model_json_schema())
    else:
        print(
            f"# strategy_options of {args.strategy!r} (defaults); set with --set strategy_options.KEY=VALUE"
        )
        print(yaml.safe_dump(cls.Config().model_dump(mode="json"), sort_keys=False), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from nas_headprune.config import load_train_config

    overrides = list(args.overrides) + (["progress=false"] if args.no_progress else [])
    cfg = load_train_config(args.config, overrides)

    from nas_headprune.runner import run_train

    record = run_train(cfg, args.out)
    _print_json(
        {
            "out": args.out,
            "test": record["test"],
            "macs": record["macs"],
            "params": record["params"],
            "train_seconds": round(record["train"]["seconds"], 1),
        }
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from nas_headprune.config import load_evaluate_config

    root = Path(args.dir)
    if not root.is_dir():
        raise UsageError(
            f"{root} is not a directory (expected the run folder of `nas-headprune search` or a saved "
            "pruned model)"
        )
    model_dir = root / "model" if (root / "model" / "pruned.json").is_file() else root
    cfg = load_evaluate_config(root / "config.resolved.yaml", args.overrides)  # before torch loads

    from nas_headprune import data as data_mod
    from nas_headprune.evaluator import metrics
    from nas_headprune.evaluator.measure import measure_macs
    from nas_headprune.io import load_pruned

    model = load_pruned(model_dir).eval()
    bundle = data_mod.load_datasets(cfg.data, seed=0)
    _, test_loader = data_mod.make_loaders(bundle, cfg.data, seed=0)
    size = data_mod.input_size(bundle)
    report = metrics.evaluate(model, test_loader)
    report.update({"macs": measure_macs(model, size), "params": metrics.count_params(model)})
    report["flops"] = 2 * report["macs"]
    _print_json(report)
    return 0


def _command_line(argv: list[str] | None) -> str:
    import shlex

    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["nas-headprune", *args])


def cmd_ablate(args: argparse.Namespace) -> int:
    from nas_headprune.ablate import load_spec, parse_shard, run_ablation
    from nas_headprune.report import write_report

    shard = parse_shard(args.shard)
    spec = load_spec(args.file, quick=args.quick)
    out = Path(args.out or f"runs/ablate/{spec.name}")
    if args.launcher == "submitit":
        return _ablate_submitit(args, spec, out, shard)
    if args.launcher_config or args.no_wait:
        raise UsageError("--launcher-config and --no-wait apply to --launcher submitit")
    outcome = run_ablation(
        spec,
        out,
        workers=args.workers,
        shard=shard,
        progress=not args.no_progress,
        source=args.file,
        command=args.command_line,
    )
    summary: dict[str, Any] = {
        "out": str(out),
        "store": str(outcome.store),
        "trials": outcome.total,
        "already_finished": outcome.skipped,
        "finished_now": outcome.done,
        "failed": outcome.failed,
    }
    if outcome.failures:
        summary["failures"] = {tid: err for tid, err in outcome.failures}
    if not args.no_report and shard is None:
        summary["report"] = write_report(out)["files"]
    _print_json(summary)
    return 1 if outcome.failed else 0


def _ablate_submitit(args: argparse.Namespace, spec: Any, out: Path, shard: tuple[int, int] | None) -> int:
    """``ablate --launcher submitit``: submit the unfinished trials as a job array, then (by default)
    wait for them and write the report."""
    import shlex

    from nas_headprune.launchers import import_submitit, load_launcher_config, submit_ablation, wait_for
    from nas_headprune.report import write_report

    if shard is not None or args.workers != 1:
        raise UsageError(
            "--shard and --workers are for --launcher local; --launcher submitit runs every trial as "
            "its own array task (launcher.array_parallelism bounds how many run at once)"
        )
    import_submitit()  # a missing extra is named before anything else is read
    launcher = load_launcher_config(spec, args.launcher_config)
    sub = submit_ablation(spec, out, launcher, source=args.file, command=args.command_line)
    report_command = shlex.join(["nas-headprune", "report", str(out)])
    summary: dict[str, Any] = {
        "out": str(out),
        "launcher": f"submitit ({launcher.cluster})",
        "logs": str(sub.log_folder),
        "trials": sub.total,
        "already_finished": sub.skipped,
        "submitted": sub.submitted,
        "running_from_earlier_submission": sub.attached,
        "jobs": sub.job_ids,
    }
    ids = ", ".join(dict.fromkeys(j.job_id.split("_")[0] for j in sub.jobs))
    if sub.submitted:
        print(f"submitted {sub.submitted} trials as job(s) {ids}; logs in {sub.log_folder}", file=sys.stderr)
    if args.no_wait:
        summary["report_command"] = report_command
        _print_json(summary)
        return 0
    if sub.jobs:
        print(
            f"waiting for {len(sub.jobs)} jobs (Ctrl-C stops waiting; the jobs keep running)", file=sys.stderr
        )
    try:
        outcome = wait_for(sub, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(
            f"interrupted: stopped waiting, the jobs keep running ({ids}). Once they have ended, "
            f"`{report_command}` writes the report; running this command again waits for the jobs that "
            f"still run (it does not submit them twice) and submits the trials that failed",
            file=sys.stderr,
        )
        return 130
    summary.update(finished_now=outcome.done, failed=outcome.failed)
    if outcome.failures:
        summary["failures"] = {tid: err for tid, err in outcome.failures}
    if not args.no_report and any(out.glob("results*.sqlite")):
        summary["report"] = write_report(out)["files"]
    _print_json(summary)
    return 1 if outcome.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from nas_headprune.report import write_report

    written = write_report(args.dir, args.out, report_command=args.command_line)
    _print_json(written)
    return 0


COMMANDS = {
    "ablate": cmd_ablate,
    "report": cmd_report,
    "search": cmd_search,
    "strategies": cmd_strategies,
    "config": cmd_config,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = _parser().parse_args(argv)
    args.command_line = _command_line(argv)
    _setup_logging(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NasHeadpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a path that cannot be written or read, a full disk: the OS says why
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        # a file where a folder was asked for (or the reverse) is the caller's mistake
        return 2 if isinstance(exc, (FileExistsError, NotADirectoryError, IsADirectoryError)) else 1
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
