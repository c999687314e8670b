"""Running an ablation: the shard's store, the trials that have not finished, one after another or in
a pool of workers, each outcome recorded in the store as soon as it arrives."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_headprune.ablation.execute import run_trial
from nas_headprune.ablation.pool import run_pool
from nas_headprune.ablation.spec import AblationSpec
from nas_headprune.ablation.trials import Trial, expand, shard_trials, validate_trials
from nas_headprune.errors import UsageError

if TYPE_CHECKING:
    from nas_headprune.store import ResultsStore

log = logging.getLogger(__name__)


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

    with progress_bar(progress, len(trials), outcome.skipped) as advance:
        if workers == 1 or len(todo) <= 1:
            for trial in todo:
                store.mark_running(trial.trial_id)
                record(trial, run_trial(trial.to_dict(), str(out / "runs" / trial.trial_id), threads))
                advance(trial.trial_id)
        else:
            run_pool(todo, out, workers, store, record, advance)
    store.close()
    return outcome


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, already: int) -> Iterator[Callable[[str], None]]:
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
