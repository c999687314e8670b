"""``nas-headprune ablate --launcher submitit``: the trials of an ablation as a SLURM job array.

One array task runs exactly one trial. The trial with index ``i`` of an ablation of ``n`` trials runs
as ``--shard i/n`` would (:func:`nas_headprune.ablate.run_ablation` with ``shard=(i, n)``: shard
``i`` of ``n`` holds that one trial), so each task writes its own store
``results.shard-<i>-of-<n>.sqlite`` next to its run folder ``runs/<trial id>``. No two tasks write
the same SQLite file (SQLite locking is not reliable on the network file systems clusters share), and
``nas-headprune report`` merges the stores as it does for any sharded ablation.

Before it submits, the submitting process reads every store of the folder: finished trials are not
submitted again (one whose settings changed is refused, as with the local launcher), failed and
interrupted ones are. It records each trial's job in ``launcher.json``; a trial whose job from an
earlier submission is still queued or running is waited for, not submitted twice. A task that dies
without a result (time limit, memory, node failure) is recorded as failed in its store, with the
scheduler's state, by the process that waits for it.

submitit is an optional extra (``pip install 'nas-headprune[submitit]'``) imported only here, and only
when a sweep is submitted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from nas_headprune.ablate import (
    AblationSpec,
    LauncherConfig,
    Trial,
    expand,
    open_store,
    run_ablation,
    validate_trials,
)
from nas_headprune.ablation.sweep import progress_bar
from nas_headprune.errors import ConfigError, LaunchError, NasHeadpruneError, UsageError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'nas-headprune[submitit]'"
#: the trials' jobs, by trial id, in the ablation folder
JOBS_FILE = "launcher.json"
#: SLURM states of a job that has not ended (sacct's first word)
_SLURM_ACTIVE = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "RESIZING"}
)


def import_submitit() -> ModuleType:
    """The submitit module, or a usage error that says how to install it."""
    try:
        import submitit
    except ImportError as exc:
        raise UsageError(f"--launcher submitit needs the submitit package: {INSTALL_HINT}") from exc
    return submitit


def load_launcher_config(spec: AblationSpec, path: str | None = None) -> LauncherConfig:
    """The ablation file's ``launcher`` section with the keys of ``path`` (``--launcher-config``) over it.

    ``path`` is a YAML mapping of the section's fields, at the top level or under ``launcher:``."""
    from pydantic import ValidationError

    from nas_headprune.config import read_yaml, validation_message

    data = spec.launcher.model_dump(exclude_unset=True) if spec.launcher is not None else {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"launcher config file {path!r} does not exist")
        extra = read_yaml(path, what="launcher config")
        if set(extra) == {"launcher"} and isinstance(extra["launcher"], dict):
            extra = extra["launcher"]
        try:
            LauncherConfig.model_validate(extra)
        except ValidationError as exc:
            msg = validation_message(exc, prefix=f"{path}: launcher", model=LauncherConfig)
            raise ConfigError(msg) from exc
        data.update(extra)
    try:
        return LauncherConfig.model_validate(data)
    except ValidationError as exc:  # pragma: no cover - both parts validated on their own
        raise ConfigError(validation_message(exc, prefix="launcher", model=LauncherConfig)) from exc


# ------------------------------------------------------------------------------------ array task


def run_array_task(
    spec: dict[str, Any], out: str, index: int, total: int, threads: int | None, source: str, command: str
) -> dict[str, Any]:
    """What one array task runs: trial ``index`` of the ablation into its own store (shard index/total)."""
    parsed = AblationSpec.model_validate(spec)
    trials = expand(parsed)
    if len(trials) != total:
        raise NasHeadpruneError(f"the ablation expands to {len(trials)} trials here, {total} when submitted")
    outcome = run_ablation(
        parsed,
        out,
        shard=(index, total),
        progress=False,
        source=source,
        command=command,
        threads=threads,
    )
    return {
        "trial_id": trials[index].trial_id,
        "status": "failed" if outcome.failed else "done",
        "error": outcome.failures[0][1] if outcome.failures else None,
    }


# ------------------------------------------------------------------------------------ submission


@dataclass
class TrackedJob:
    """A trial's job: submitted now, or (``attached``) by an earlier command and still queued or running."""

    trial: Trial
    job: Any  # a submitit Job
    attached: bool = False
    pid: int | None = None  # a local job of an earlier command: its controller process

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)

    def done(self) -> bool:
        if self.pid is not None and not self.job.paths.result_pickle.exists():
            return not _process_running(self.pid)
        return bool(self.job.done())


@dataclass
class Submission:
    """What :func:`submit_ablation` did; :func:`wait_for` collects the outcome."""

    out: Path
    cluster: str
    log_folder: Path
    total: int
    skipped: int
    jobs: list[TrackedJob] = field(default_factory=list)

    @property
    def job_ids(self) -> dict[str, str]:
        return {j.trial.trial_id: j.job_id for j in self.jobs}

    @property
    def submitted(self) -> int:
        return sum(not j.attached for j in self.jobs)

    @property
    def attached(self) -> int:
        return sum(j.attached for j in self.jobs)


def submit_ablation(
    spec: AblationSpec,
    out: str | Path,
    launcher: LauncherConfig,
    *,
    source: str = "",
    command: str = "",
) -> Submission:
    """Submit every trial of ``spec`` that has not finished and has no live job, as one job array.

    Everything is checked before anything is submitted: submitit is installed, every trial's config
    and strategy, the stores, the executor's settings."""
    submitit = import_submitit()
    out = Path(out).absolute()
    every = expand(spec)
    validate_trials(every)
    finished = _finished_trials(out, every)
    todo = [t for t in every if t.trial_id not in finished]
    log_folder = Path(launcher.log_folder or out / "submitit").absolute()
    executor = _executor(submitit, launcher, log_folder, spec.name)
    jobs_file = out / JOBS_FILE
    record = _read_jobs(jobs_file)
    sub = Submission(out, launcher.cluster, log_folder, total=len(every), skipped=len(finished))
    live = _live_jobs(submitit, {t.trial_id: record[t.trial_id] for t in todo if t.trial_id in record})
    for t in todo:
        if t.trial_id in live:
            job, pid = live[t.trial_id]
            sub.jobs.append(TrackedJob(t, job, attached=True, pid=pid))
    fresh = [t for t in todo if t.trial_id not in live]
    if not fresh:
        return sub
    n = len(fresh)
    for t in fresh:  # each task's store lists its trial from now on, so one that never starts is reported
        open_store(spec, out, (t.index, len(every)), [t], every, source=source, command=command).close()
    try:
        jobs = executor.map_array(
            run_array_task,
            [spec.model_dump(mode="json")] * n,
            [str(out)] * n,
            [t.index for t in fresh],
            [len(every)] * n,
            [launcher.cpus_per_trial] * n,
            [source] * n,
            [command] * n,
        )
    except RuntimeError as exc:  # sbatch's message (an unknown partition or account, a bad flag)
        raise LaunchError(f"the scheduler refused the job array: {exc}") from exc
    sub.jobs += [TrackedJob(t, job) for t, job in zip(fresh, jobs, strict=True)]
    sub.jobs.sort(key=lambda j: j.trial.index)
    for t, job in zip(fresh, jobs, strict=True):
        record[t.trial_id] = {
            "job_id": str(job.job_id),
            "cluster": launcher.cluster,
            "folder": str(log_folder),
            "submitted": time.time(),
        }
    from nas_headprune.atomic import atomic_write_json

    atomic_write_json(jobs_file, record)
    return sub


def _read_jobs(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or not all(
            isinstance(r, dict) and {"job_id", "cluster", "folder"} <= set(r) for r in record.values()
        ):
            raise ValueError("not a mapping of trial ids to jobs")
    except (ValueError, OSError) as exc:
        raise LaunchError(
            f"{path} is not a launcher job record ({exc}); move it away to submit without it (a job it "
            f"lists that is still queued or running would then run its trial a second time)"
        ) from exc
    return record


def _finished_trials(out: Path, every: list[Trial]) -> set[str]:
    """Ids of the trials finished in any store of ``out``; a finished trial with other settings is an
    error, as :meth:`nas_headprune.store.ResultsStore.register` makes it for one store."""
    from nas_headprune.store import load_rows

    if not out.is_dir() or not any(out.glob("results*.sqlite")):
        return set()
    rows, _ = load_rows(out)
    by_id = {t.trial_id: t for t in every}
    done = set()
    for row in rows:
        trial = by_id.get(row["trial_id"])
        if trial is None or row["status"] != "done":
            continue
        if row["overrides"] != list(trial.overrides):
            raise UsageError(
                f"trial {trial.trial_id} finished in {out / row['store']} with other settings "
                f"({json.dumps(row['overrides'])}); the ablation file changed: use a new output directory"
            )
        done.add(trial.trial_id)
    return done


def _executor(submitit: ModuleType, launcher: LauncherConfig, log_folder: Path, name: str) -> Any:
    """A submitit executor with the launcher's settings (nothing is submitted yet)."""
    if launcher.cluster == "slurm" and shutil.which("sbatch") is None:
        raise UsageError(
            "launcher.cluster is slurm but sbatch is not on this machine's PATH; submit from a SLURM "
            "login node, or set launcher.cluster: local to run the array here"
        )
    try:
        executor = submitit.AutoExecutor(folder=log_folder, cluster=launcher.cluster)
        executor.update_parameters(
            name=f"nas-headprune-{name}",
            timeout_min=launcher.timeout_min,
            gpus_per_node=launcher.gpus_per_trial,
            cpus_per_task=launcher.cpus_per_trial,
            mem_gb=launcher.mem_gb,
            nodes=1,
            tasks_per_node=1,
            slurm_partition=launcher.partition,
            slurm_array_parallelism=launcher.array_parallelism,
            slurm_additional_parameters=dict(launcher.sbatch) or None,
            slurm_setup=list(launcher.setup) or None,
            local_setup=list(launcher.setup) or None,
        )
    except (ValueError, NameError, AssertionError, RuntimeError) as exc:
        raise ConfigError(f"launcher: submitit refused the settings: {exc}") from exc
    return executor


def _live_jobs(submitit: ModuleType, record: dict[str, dict[str, Any]]) -> dict[str, tuple[Any, int | None]]:
    """The jobs of ``record`` (trial id -> job) that are still queued or running: (job, local pid)."""
    live: dict[str, tuple[Any, int | None]] = {}
    slurm: dict[str, Any] = {}
    for tid, rec in record.items():
        folder, job_id = rec["folder"], str(rec["job_id"])
        if rec["cluster"] == "local":
            job = submitit.LocalJob(folder=folder, job_id=job_id)
            if not job.paths.result_pickle.exists() and _process_running(int(job_id)):
                live[tid] = (job, int(job_id))
        elif shutil.which("sacct") is not None:
            slurm[tid] = submitit.SlurmJob(folder=folder, job_id=job_id)  # all registered: one sacct call
    for tid, job in slurm.items():
        state = (job.state or "UNKNOWN").split()[0].upper()
        if state in _SLURM_ACTIVE and not job.paths.result_pickle.exists():
            live[tid] = (job, None)
    return live


def _process_running(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) submitit process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc") / str(pid)
    try:
        if "submitit" not in (proc / "cmdline").read_bytes().decode(errors="replace"):
            return False  # the id went to another process
        return (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux): trust kill()
        return True


# --------------------------------------------------------------------------------------- waiting


@dataclass
class LaunchOutcome:
    done: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)


def wait_for(
    sub: Submission, *, progress: bool = True, poll_s: float = 2.0, first_poll_s: float = 0.25
) -> LaunchOutcome:
    """Wait until every job of ``sub`` has ended; a task that died without a result is recorded as failed.

    The jobs are polled after ``first_poll_s``, then at twice the previous interval up to ``poll_s``,
    so short trials are reported soon and long ones cost the scheduler little. A KeyboardInterrupt
    stops the waiting, never the jobs."""
    outcome = LaunchOutcome()
    pending = list(sub.jobs)
    interval = min(first_poll_s, poll_s)
    with progress_bar(progress, sub.total, sub.skipped) as advance:
        while pending:
            running = []
            for tj in pending:
                if not tj.done():
                    running.append(tj)
                    continue
                res = _result(sub, tj)
                if res["status"] == "done":
                    outcome.done += 1
                else:
                    outcome.failed += 1
                    outcome.failures.append((tj.trial.trial_id, str(res.get("error"))))
                    log.warning("trial %s failed: %s", tj.trial.trial_id, res.get("error"))
                advance(tj.trial.trial_id)
            pending = running
            if pending:
                time.sleep(interval)
                interval = min(2 * interval, poll_s)
    return outcome


def _result(sub: Submission, tj: TrackedJob) -> dict[str, Any]:
    try:
        res: dict[str, Any] = tj.job.result()
        return res
    except Exception as exc:  # submitit's UncompletedJobError/FailedJobError: the task itself died
        text = str(exc)
        state = re.search(r"\(state: ([^)]*)\)", text)  # the scheduler's: TIMEOUT, OUT_OF_MEMORY, ...
        trace = re.search(r"with trace:\n-+\n(.*?)\n-+\n", text, re.DOTALL)  # raised inside the task
        if state:
            why = f"state {state.group(1)}"
        elif trace:
            why = trace.group(1).strip().splitlines()[-1]
        else:
            why = type(exc).__name__
        error = f"job {tj.job_id} failed ({why}); its log: {tj.job.paths.stderr}"
        _record_lost(sub, tj.trial, error, str(exc)[-4000:] or traceback.format_exc(limit=4))
        return {"status": "failed", "error": error}


def _record_lost(sub: Submission, trial: Trial, error: str, detail: str) -> None:
    """Mark an unfinished trial failed in its store; its task is gone, so no one else writes there."""
    from nas_headprune.store import ResultsStore, store_name

    path = sub.out / store_name((trial.index, sub.total))
    if not path.is_file():
        return
    with ResultsStore.open(path) as store:
        row = next((r for r in store.rows() if r["trial_id"] == trial.trial_id), None)
        if row is not None and row["status"] != "done":
            store.record(trial.trial_id, {"status": "failed", "error": error, "detail": detail})
