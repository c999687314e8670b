"""``nas-headprune ablate``: a declared grid of search runs, executed resumably into a results store.

An ablation file (YAML) names a base run config and the axes to sweep::

    name: my_sweep
    base: default                    # a run-config preset or YAML file
    set: {finetune.max_steps_per_epoch: 100}   # dotted overrides for every trial
    strategies: [magnitude, taylor]
    budgets: [0.5, 0.7]
    seeds: [0, 1, 2]
    strategy_options:                # per strategy, applied only to that strategy's trials
      taylor: {calib_batches: 2}
    grid:                            # dotted key -> values, crossed with everything above
      reweight.mode: [none, lstsq]
    variants:                        # or/and named variants, each a set of dotted overrides
      - {name: plain, set: {strategy_options.alpha: 0}}
    quick: {budgets: [0.5], seeds: [0], set: {data.test_subset: 500}}   # what --quick changes

Every trial is one :func:`nas_headprune.runner.run_search` run in ``DIR/runs/<trial id>``. The parent
process owns the store (:mod:`nas_headprune.store`): it skips finished trials, retries failed or
interrupted ones and records each outcome as soon as it arrives, so a killed ablation loses no
finished trial and its search/fine-tune checkpoints let an interrupted trial resume mid-way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from nas_headprune.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from nas_headprune.store import ResultsStore

log = logging.getLogger(__name__)

BASE_VARIANT = "base"


# ------------------------------------------------------------------------------------- spec


def _check_dotted(keys: Any) -> Any:
    for key in keys:
        if not key or any(not part for part in str(key).split(".")):
            raise ValueError(f"{key!r} is not a dotted config key such as finetune.lr")
    return keys


class Variant(BaseModel):
    """A named set of dotted overrides."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = Field(pattern=r"^[A-Za-z0-9_.+=-]+$", description="letters, digits and _ . + = -")
    set: dict[str, Any] = Field(default_factory=dict)

    @field_validator("set")
    @classmethod
    def _dotted(cls, v: dict[str, Any]) -> dict[str, Any]:
        _check_dotted(v)
        return v


class QuickSpec(BaseModel):
    """What ``--quick`` replaces; ``set`` is merged over the file's ``set``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    strategies: list[str] | None = None
    budgets: list[float] | None = None
    seeds: list[int] | None = None
    variants: list[str] | None = Field(None, description="keep only these variant names")
    set: dict[str, Any] = Field(default_factory=dict)
    strategy_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    equal_steps: int | None = Field(None, ge=0)


#: sbatch options that the launcher writes itself: the field to use instead, or None
_SBATCH_SET_BY_LAUNCHER = {
    "partition": "partition",
    "time": "timeout_min",
    "mem": "mem_gb",
    "gpus-per-node": "gpus_per_trial",
    "cpus-per-task": "cpus_per_trial",
    "array": "array_parallelism",
    "output": "log_folder",
    "error": "log_folder",
    "open-mode": None,
    "job-name": None,
    "nodes": None,
    "ntasks-per-node": None,
    "signal": None,
}


class LauncherConfig(BaseModel):
    """The ``launcher`` section: how ``--launcher submitit`` submits the trials (one array task each).

    The local launcher ignores it; ``cluster: local`` runs the array through submitit's local executor
    (processes on this machine), where ``partition``, ``array_parallelism`` and ``sbatch`` do nothing."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    cluster: Literal["slurm", "local"] = "slurm"
    partition: str | None = Field(None, pattern=r"^[^\s]+$", description="default: the cluster's")
    gpus_per_trial: int = Field(1, ge=0)
    cpus_per_trial: int = Field(4, ge=1, description="also the trial's torch thread count")
    timeout_min: int = Field(60, ge=1, description="time limit of one trial, in minutes")
    mem_gb: float | None = Field(None, gt=0, description="memory per trial; default: the partition's")
    array_parallelism: int = Field(256, ge=1, description="at most this many trials run at once")
    sbatch: dict[str, str | int | bool] = Field(
        default_factory=dict, description="extra #SBATCH options, e.g. {account: proj, qos: high}"
    )
    setup: list[str] = Field(default_factory=list, description="shell lines run before the trial")
    log_folder: str | None = Field(None, min_length=1, description="submitit's files; default <out>/submitit")

    @field_validator("sbatch")
    @classmethod
    def _sbatch(cls, v: dict[str, str | int | bool]) -> dict[str, str | int | bool]:
        for key, value in v.items():
            if not key or not all(c.isalnum() or c in "-_" for c in key) or not key[0].isalpha():
                raise ValueError(f"{key!r} is not an sbatch option name such as account or qos")
            name = key.replace("_", "-")  # submitit writes option names with hyphens
            if name in _SBATCH_SET_BY_LAUNCHER:
                own = _SBATCH_SET_BY_LAUNCHER[name]
                raise ValueError(
                    f"--{name} is set by the launcher" + (f"; use launcher.{own}" if own else "")
                )
            if value is False or "\n" in str(value):
                raise ValueError(f"{key}: {value!r} is not a value (true writes a flag without value)")
        return v


class AblationSpec(BaseModel):
    """An ablation file, validated; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    base: str = "default"
    set: dict[str, Any] = Field(default_factory=dict)
    strategies: list[str] = Field(min_length=1)
    budgets: list[float] = Field(default_factory=lambda: [0.5], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    strategy_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    variants: list[Variant] = Field(default_factory=list)
    quick: QuickSpec | None = None
    launcher: LauncherConfig | None = None
    equal_steps: int | None = Field(
        None,
        ge=0,
        description="give every trial this many training steps in all: the fine-tune gets what the "
        "strategy's search does not spend on the weights (one epoch of that many steps, or equal "
        "epochs of at most epoch_steps); a trial whose run trained another number of steps fails",
    )
    epoch_steps: int | None = Field(
        None,
        ge=1,
        description="with equal_steps: the most optimizer steps one fine-tune epoch can take (the "
        "training split's batches per epoch); the fine-tune is split into as few equal epochs as keep "
        "each within it",
    )

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[float]) -> list[float]:
        for b in v:
            if not 0 < b <= 1:
                raise ValueError(f"budget {b} is outside (0, 1]")
        return v

    @field_validator("set")
    @classmethod
    def _set_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        _check_dotted(v)
        return v

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        _check_dotted(v)
        for key, values in v.items():
            if not values:
                raise ValueError(f"grid axis {key!r} has no values")
        return v

    @field_validator("variants")
    @classmethod
    def _unique(cls, v: list[Variant]) -> list[Variant]:
        names = [x.name for x in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dup)}")
        return v

    def quick_version(self) -> AblationSpec:
        """The spec with the ``quick`` section applied (an error if the file has none)."""
        if self.quick is None:
            raise ConfigError(f"ablation {self.name!r} has no 'quick' section; --quick needs one")
        q = self.quick
        data = self.model_dump()
        data["name"] = f"{self.name}-quick"
        data["quick"] = None
        for key in ("strategies", "budgets", "seeds", "equal_steps"):
            if getattr(q, key) is not None:
                data[key] = getattr(q, key)
        if q.variants is not None:
            known = [v.name for v in self.variants]
            unknown = [n for n in q.variants if n not in known]
            if unknown:
                raise ConfigError(
                    f"quick.variants names unknown variants {unknown}; the file declares {known}"
                )
            data["variants"] = [v for v in data["variants"] if v["name"] in q.variants]
        data["set"] = {**self.set, **q.set}
        opts = {k: dict(v) for k, v in self.strategy_options.items()}
        for name, extra in q.strategy_options.items():
            opts[name] = {**opts.get(name, {}), **extra}
        data["strategy_options"] = opts
        return AblationSpec.model_validate(data)


def preset_names() -> list[str]:
    from nas_headprune.config import preset_names as names

    return names("ablations")


def load_spec(source: str, quick: bool = False) -> AblationSpec:
    """An ablation YAML file, or the name of a preset in ``nas_headprune/configs/ablations``."""
    from nas_headprune.config import read_yaml

    data = read_yaml(source, subdir="ablations", what="ablation")
    try:
        spec = AblationSpec.model_validate(data)
    except ValidationError as exc:
        from nas_headprune.config import validation_message

        raise ConfigError(validation_message(exc, prefix="ablation: ", model=AblationSpec)) from exc
    return spec.quick_version() if quick else spec


# ------------------------------------------------------------------------------------ trials


@dataclass(frozen=True)
class Trial:
    """One search run of an ablation: its axes and the overrides that make its config."""

    trial_id: str
    strategy: str
    budget: float
    seed: int
    variant: str
    overrides: tuple[str, ...]
    base: str
    index: int = 0
    axes: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overrides"] = list(self.overrides)
        return d


def _fmt_value(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return "".join(c if c.isalnum() or c in "._+-" else "_" for c in text)


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"


def expand(spec: AblationSpec) -> list[Trial]:
    """All trials in a stable order: strategy, budget, variant, then seed (innermost)."""
    grid_keys = list(spec.grid)
    grid_combos = list(itertools.product(*(spec.grid[k] for k in grid_keys))) if grid_keys else [()]
    variants = spec.variants or [Variant(name=BASE_VARIANT)]
    trials: list[Trial] = []
    for strategy in spec.strategies:
        for budget in spec.budgets:
            for variant in variants:
                for combo in grid_combos:
                    grid_part = dict(zip(grid_keys, combo, strict=True))
                    name_parts = [] if variant.name == BASE_VARIANT and grid_part else [variant.name]
                    name_parts += [f"{k}={_fmt_value(v)}" for k, v in grid_part.items()]
                    vname = ",".join(name_parts)
                    for seed in spec.seeds:
                        overrides = [_override(k, v) for k, v in spec.set.items()]
                        overrides += [
                            _override(f"strategy_options.{k}", v)
                            for k, v in spec.strategy_options.get(strategy, {}).items()
                        ]
                        overrides += [_override(k, v) for k, v in variant.set.items()]
                        overrides += [_override(k, v) for k, v in grid_part.items()]
                        overrides += [
                            _override("strategy", strategy),
                            _override("budget", budget),
                            _override("seed", seed),
                            "progress=false",
                        ]
                        safe_strategy = strategy.replace(":", "_").replace("/", "_")
                        tid = f"{safe_strategy}-b{budget:g}-{_fmt_value(vname)}-s{seed}"
                        trials.append(
                            Trial(
                                trial_id=tid,
                                strategy=strategy,
                                budget=float(budget),
                                seed=int(seed),
                                variant=vname,
                                overrides=tuple(overrides),
                                base=spec.base,
                                index=len(trials),
                                axes=grid_part,
                            )
                        )
    if spec.equal_steps is not None:
        trials = [_with_equal_steps(t, spec.equal_steps, spec.epoch_steps) for t in trials]
    ids = [t.trial_id for t in trials]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ConfigError(f"ablation {spec.name!r} expands to repeated trials: {', '.join(dup[:5])}")
    return trials


def _with_equal_steps(trial: Trial, total: int, epoch_steps: int | None = None) -> Trial:
    """``trial`` with a fine-tune of ``total`` minus the steps its search trains the weights: one
    epoch of that many steps, or the fewest equal epochs of at most ``epoch_steps`` each."""
    from nas_headprune.config import load_config
    from nas_headprune.registry import make_strategy

    try:
        cfg = load_config(trial.base, list(trial.overrides))
        planned = make_strategy(cfg.strategy, cfg.strategy_options).planned_weight_steps()
    except UsageError as exc:
        raise type(exc)(f"trial {trial.trial_id}: {exc}") from exc
    rest = total - planned
    if rest < 0:
        raise ConfigError(
            f"trial {trial.trial_id}: equal_steps={total} is less than the {planned} steps its search "
            "trains the weights; raise equal_steps or shorten the search"
        )
    epochs = 1
    if epoch_steps is not None and rest > 0:  # the fewest equal epochs that each fit in one
        epochs = next(k for k in range(1, rest + 1) if rest % k == 0 and rest // k <= epoch_steps)
    finetune = (
        ["finetune.epochs=0"]
        if rest == 0
        else [f"finetune.epochs={epochs}", f"finetune.max_steps_per_epoch={rest // epochs}"]
    )
    return dataclasses.replace(trial, overrides=(*trial.overrides[:-1], *finetune, trial.overrides[-1]))


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` with 0 <= i < n (0-based, like most array-job indices)."""
    if text is None:
        return None
    i_s, sep, n_s = text.partition("/")
    try:
        i, n = int(i_s), int(n_s)
    except ValueError:
        i, n = -1, 0
    if not sep or n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard expects i/n with 0 <= i < n (for example 0/4), got {text!r}")
    return i, n


def shard_trials(trials: list[Trial], shard: tuple[int, int] | None) -> list[Trial]:
    if shard is None:
        return trials
    i, n = shard
    return [t for t in trials if t.index % n == i]


def validate_trials(trials: list[Trial]) -> None:
    """Build every trial's config and look up its strategy before running anything."""
    from nas_headprune.config import load_config
    from nas_headprune.registry import make_strategy

    seen: set[tuple[str, tuple[str, ...]]] = set()
    for t in trials:
        key = (t.strategy, tuple(o for o in t.overrides if o.startswith("strategy_options.")))
        try:
            cfg = load_config(t.base, list(t.overrides))
            if key not in seen:
                make_strategy(cfg.strategy, cfg.strategy_options)
                seen.add(key)
        except UsageError as exc:
            raise type(exc)(f"trial {t.trial_id}: {exc}") from exc


# --------------------------------------------------------------------------------- execution


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The flat metrics a store row keeps next to the full result record."""
    pruned, dense = result["pruned"], result["dense"]
    throughput = result.get("throughput", {}).get("pruned", {})
    steps = result.get("training_steps") or {}
    return {
        "top1_dense": dense.get("top1"),
        "top1_before": pruned["before_finetune"].get("top1"),
        "top1_after": pruned["after_finetune"].get("top1"),
        "loss_after": pruned["after_finetune"].get("loss"),
        "macs": pruned["macs"],
        "macs_ratio": pruned["macs_ratio"],
        "params": pruned["params"],
        "params_ratio": pruned["params"] / dense["params"],
        "speedup": throughput.get("speedup"),
        **{k: float(v) for k, v in result.get("timings", {}).items()},
        "top1_val_dense": dense.get("val_top1"),
        "top1_val_before": (pruned.get("val_before_finetune") or {}).get("top1"),
        "top1_val_after": pruned.get("val_top1"),
        "steps_search": steps.get("search"),
        "steps_finetune": steps.get("finetune"),
        "steps_total": steps.get("total"),
    }


def run_trial(trial: dict[str, Any], run_dir: str, threads: int | None = None) -> dict[str, Any]:
    """Run one trial (in a worker process or in-process); never raises for a failed run."""
    t0 = time.time()
    logger = logging.getLogger("nas_headprune")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(run_dir) / "trial.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)  # the trial's log goes to its folder, the console keeps the progress bar
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        from nas_headprune.config import load_config
        from nas_headprune.runner import run_search

        cfg = load_config(trial["base"], list(trial["overrides"]))
        result = run_search(cfg, run_dir)
        slim = {k: v for k, v in result.items() if k != "config"}
        return {
            "status": "done",
            "summary": summarize(result),
            "result": slim,
            "started": t0,
            "finished": time.time(),
        }
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a failed trial is recorded, never hidden, and never stops the sweep
        from nas_headprune.errors import NasHeadpruneError

        message = f"{type(exc).__name__}: {exc}"
        detail = message if isinstance(exc, NasHeadpruneError) else traceback.format_exc(limit=8)
        logger.error("trial failed: %s", detail)
        return {
            "status": "failed",
            "error": message,
            "detail": detail,
            "started": t0,
            "finished": time.time(),
        }
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _worker_init(device_queue: Any, threads: int) -> None:
    device = device_queue.get() if device_queue is not None else None
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(device)
    os.environ["NAS_HEADPRUNE_WORKER_THREADS"] = str(threads)


def _worker_run(trial: dict[str, Any], run_dir: str) -> dict[str, Any]:
    threads = int(os.environ.get("NAS_HEADPRUNE_WORKER_THREADS", "1"))
    return run_trial(trial, run_dir, threads=threads)


def _cuda_devices() -> list[int]:
    try:
        import torch

        return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    except Exception:  # pragma: no cover - a broken CUDA install runs trials on the CPU
        return []


@dataclass
class AblationOutcome:
    total: int
    skipped: int
    done: int
    failed: int
    store: Path
    failures: list[tuple[str, str]] = field(default_factory=list)


def open_store(
    spec: AblationSpec,
    out: Path,
    shard: tuple[int, int] | None,
    trials: list[Trial],
    every: list[Trial],
    *,
    source: str = "",
    command: str = "",
) -> ResultsStore:
    """The store of ``shard`` in ``out``, created if needed, with ``trials`` registered (``every``: all
    trials of the ablation) and the ablation's meta data."""
    from nas_headprune.store import ResultsStore, store_name

    out.mkdir(parents=True, exist_ok=True)
    store = ResultsStore.open(out / store_name(shard), create=True)
    store.set_meta(
        ablation=spec.name,
        spec=json.dumps(spec.model_dump(mode="json")),
        source=source,
        command=command,
        shard="" if shard is None else f"{shard[0]}/{shard[1]}",
    )
    store.register(trials, all_ids=[t.trial_id for t in every])
    return store


def run_ablation(
    spec: AblationSpec,
    out: str | Path,
    *,
    workers: int = 1,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    source: str = "",
    command: str = "",
    threads: int | None = None,
) -> AblationOutcome:
    """Run (or resume) every trial of ``spec`` that this shard owns and that has not finished.

    ``threads`` sets torch's thread count of the trials that run in this process (not in workers)."""
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    out = Path(out)
    every = expand(spec)
    trials = shard_trials(every, shard)
    validate_trials(trials)
    store = open_store(spec, out, shard, trials, every, source=source, command=command)
    finished = store.finished_ids()
    todo = [t for t in trials if t.trial_id not in finished]
    outcome = AblationOutcome(
        total=len(trials), skipped=len(trials) - len(todo), done=0, failed=0, store=store.path
    )
    if outcome.skipped:
        log.info(
            "%d of %d trials already finished; running the other %d", outcome.skipped, len(trials), len(todo)
        )

    def record(trial: Trial, res: dict[str, Any]) -> None:
        steps = (res.get("summary") or {}).get("steps_total")
        if res["status"] == "done" and spec.equal_steps is not None and steps != spec.equal_steps:
            # e.g. a fine-tune epoch shorter than its cap: the comparison would not be at equal steps
            res = {
                **res,
                "status": "failed",
                "error": f"the run trained {steps} steps, not equal_steps={spec.equal_steps} (is an epoch "
                "of the training split shorter than the fine-tune's steps per epoch? set epoch_steps)",
            }
        store.record(trial.trial_id, res)
        if res["status"] == "done":
            outcome.done += 1
        else:
            outcome.failed += 1
            outcome.failures.append((trial.trial_id, res["error"]))
            log.warning("trial %s failed: %s", trial.trial_id, res["error"])

    with _progress_bar(progress, len(trials), outcome.skipped) as advance:
        if workers == 1 or len(todo) <= 1:
            for trial in todo:
                store.mark_running(trial.trial_id)
                record(trial, run_trial(trial.to_dict(), str(out / "runs" / trial.trial_id), threads))
                advance(trial.trial_id)
        else:
            _run_pool(todo, out, workers, store, record, advance)
    store.close()
    return outcome


def _run_pool(todo: list[Trial], out: Path, workers: int, store: Any, record: Any, advance: Any) -> None:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    workers = min(workers, len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    devices = _cuda_devices()
    queue = None
    if devices:
        queue = ctx.Queue()
        for w in range(workers):
            queue.put(devices[w % len(devices)])
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_worker_init, initargs=(queue, threads)
    ) as pool:
        pending = list(todo)
        running: dict[Any, Trial] = {}
        try:
            while pending or running:
                while pending and len(running) < workers:
                    trial = pending.pop(0)
                    store.mark_running(trial.trial_id)
                    fut = pool.submit(_worker_run, trial.to_dict(), str(out / "runs" / trial.trial_id))
                    running[fut] = trial
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in finished:
                    trial = running.pop(fut)
                    try:
                        res = fut.result()
                    except Exception as exc:  # the worker process died (out of memory, killed)
                        res = {
                            "status": "failed",
                            "error": f"worker process failed: {type(exc).__name__}: {exc}",
                            "detail": traceback.format_exc(limit=4),
                            "started": None,
                            "finished": time.time(),
                        }
                    record(trial, res)
                    advance(trial.trial_id)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int, already: int) -> Iterator[Callable[[str], None]]:
    """A progress bar over trials; yields ``advance(trial_id)`` (a no-op when disabled)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from nas_headprune.progress import stderr_progress

    columns = (
        TextColumn("trials"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
    )
    with stderr_progress(*columns, enabled=enabled) as bar:
        task = bar.add_task("", total=total, completed=already)
        yield lambda name: bar.update(task, advance=1, description=name)
