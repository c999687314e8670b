"""The latency table of a ``budget_kind: latency`` run: measured (or read from the cache) for the
search and kept in the run folder, and the evaluate stage's check of the pruned model's measured
latency against the table's prediction."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch

from nas_headprune.errors import CheckpointError
from nas_headprune.pipeline.state import RunState
from nas_headprune.runfolder import read_json

log = logging.getLogger(__name__)


def run_latency_table(run: RunState, done: bool) -> Any:
    """The latency table of a ``budget_kind: latency`` run: read back from the run folder when the
    search has finished, else measured (or taken from the cache) by rank 0 and shared with every rank.
    It is kept in the run folder (``latency_table.json``) so the evaluate stage compares against the
    very table the search used."""
    from nas_headprune.atomic import atomic_write_json
    from nas_headprune.evaluator.latency import LatencyTable, latency_table

    path = run.out / "latency_table.json"
    if done:
        try:
            table = LatencyTable.from_dict(read_json(path, "latency table"))
            if set(table.layers) != set(run.space.layers):
                raise ValueError("its layers are not this model's")
            return table
        except ValueError as exc:
            raise CheckpointError(f"{path} is damaged or was edited ({exc}); rerun with --restart") from exc
    lat = run.cfg.latency

    def measure() -> dict[str, Any]:
        table, cached = latency_table(
            run.model,
            run.space,
            batch_size=lat.batch_size,
            device=lat.device or str(run.device),
            threads=lat.threads,
            points=lat.points,
            rounds=lat.rounds,
            warmup=lat.warmup,
            cache_dir=lat.cache_dir,
            progress=run.cfg.progress,
        )
        data = {**table.to_dict(), "cache_file": str(cached) if cached else None}
        atomic_write_json(path, data)
        return data

    return LatencyTable.from_dict(_on_rank0(run, measure))


def _on_rank0(run: RunState, work: Callable[[], Any]) -> Any:
    """What ``work()`` returns on rank 0, where alone it runs, on every rank (a picklable object)."""
    value = work() if run.main else None
    if run.world > 1:
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def measured_fraction(run: RunState, pruned: torch.nn.Module) -> dict[str, float]:
    """The pruned model's latency as a fraction of the dense model's, both timed interleaved at the
    latency budget's batch size, device and threads (``latency.check_rounds`` rounds, medians).
    Under torchrun rank 0 times them and every rank gets its numbers."""
    from nas_headprune.evaluator import metrics

    lat = run.cfg.latency

    def measure() -> dict[str, float]:
        both = metrics.measure_throughput(
            {"dense": copy.deepcopy(run.model), "pruned": copy.deepcopy(pruned)},
            run.size,
            batch_size=lat.batch_size,
            device=lat.device or str(run.device),
            warmup=lat.warmup,
            iters=lat.check_rounds,
            threads=lat.threads,
        )
        measured, dense = both["pruned"]["ms_per_batch"], both["dense"]["ms_per_batch"]
        return {"measured_ms": measured, "measured_dense_ms": dense, "measured_fraction": measured / dense}

    return dict(_on_rank0(run, measure))


def refine_search(run: RunState, ctx: Any, search: Callable[[Any], tuple[Any, Any]]) -> tuple[Any, Any, dict]:
    """Search under the latency table, time the pruned model whole, calibrate the table again through
    that measurement (:meth:`LatencyTable.refitted`) and search again, up to ``latency.refine_rounds``
    times or until the measured fraction is within ``latency.refine_tolerance`` of the budget.

    ``search(ctx)`` runs the strategy and validates its result: ``(result, selection)``. Returns the
    result and selection of the round measured closest to the budget, and the refinement's record
    (every round's table calibration, prediction and measurement; the chosen round; why it stopped:
    ``within_tolerance``, ``rounds_spent``, or ``budget_unreachable`` / ``refit_failed`` with the
    reason in ``stop_reason``; the chosen round's table, which becomes ``run.latency`` so the evaluate
    stage predicts with the table the selection was made on).
    """
    from dataclasses import replace

    from nas_headprune.allocate import BudgetError
    from nas_headprune.evaluator.materialize import materialize

    lat, budget = run.cfg.latency, run.cfg.budget
    table = ctx.latency
    rounds: list[dict[str, Any]] = []
    best: tuple[float, Any, Any, Any, int] | None = None
    stopped, reason = "rounds_spent", ""
    for index in range(lat.refine_rounds + 1):
        try:
            result, selection = search(replace(ctx, latency=table))
        except BudgetError as exc:
            if best is None:
                raise
            stopped, reason = "budget_unreachable", f"the refitted table {exc}"
            log.warning("latency refinement stops after round %d: %s", index - 1, reason)
            break
        arch = selection.architecture()
        predicted = table.predict(run.space, arch) / table.dense_ms
        timed = measured_fraction(run, materialize(run.model, run.space, selection))
        fraction = timed["measured_fraction"]
        rounds.append(
            {
                "round": index,
                "scale": table.scale,
                "fixed_ms": table.fixed_ms,
                "predicted_fraction": predicted,
                "measured_fraction": fraction,
            }
        )
        log.info(
            "latency round %d: predicted %.3f, measured %.3f of dense (budget %.3f)",
            index,
            predicted,
            fraction,
            budget,
        )
        off = abs(fraction / budget - 1.0)
        if best is None or off < best[0]:
            best = (off, result, selection, table, index)
        if off <= lat.refine_tolerance:
            stopped = "within_tolerance"
            break
        if index == lat.refine_rounds:
            break
        refit = table.refitted(run.space, arch, fraction)
        if refit is None:
            stopped, reason = "refit_failed", "the measurement cannot refit the table"
            log.warning("latency refinement stops after round %d: %s", index, reason)
            break
        table = refit
    assert best is not None
    _, result, selection, table, chosen = best
    run.latency = table
    record = {"rounds": rounds, "chosen": chosen, "stopped": stopped, "table": table.to_dict()}
    return result, selection, {**record, "stop_reason": reason} if reason else record


def refinement_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What result.json reports of a refinement record: everything but the table. A record without
    its rounds or chosen round raises KeyError (a damaged search.json, to the caller)."""
    missing = {"rounds", "chosen"} - record.keys()
    if missing:
        raise KeyError(", ".join(sorted(missing)))
    return {k: v for k, v in record.items() if k != "table"}


def latency_check(run: RunState, pruned: torch.nn.Module, arch: Any) -> dict[str, Any]:
    """Predicted against measured latency of the pruned model, both models timed interleaved at the
    latency budget's batch size, device and threads."""
    lat, table = run.cfg.latency, run.latency
    timed = measured_fraction(run, pruned)
    predicted = table.predict(run.space, arch)
    # The machine's speed drifts between the table's measurement and this one (load, clocks), so the
    # budget and the prediction are compared as fractions of the dense latency timed alongside.
    predicted_fraction = predicted / table.dense_ms
    return {
        "batch_size": lat.batch_size,
        "device": lat.device or str(run.device),
        "device_name": table.setting.get("device_name"),
        "threads": table.setting.get("threads"),
        "budget": run.cfg.budget,
        "table_dense_ms": table.dense_ms,
        "target_ms": run.cfg.budget * table.dense_ms,
        "predicted_ms": predicted,
        "predicted_fraction": predicted_fraction,
        **timed,
        "measured_over_budget": timed["measured_fraction"] / run.cfg.budget,
        "prediction_error": predicted_fraction / timed["measured_fraction"] - 1.0,
        "refinement": run.latency_rounds,
    }
