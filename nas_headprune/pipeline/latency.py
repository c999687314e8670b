"""The latency table of a ``budget_kind: latency`` run: measured (or read from the cache) for the
search and kept in the run folder, and the evaluate stage's check of the pruned model's measured
latency against the table's prediction."""

from __future__ import annotations

import copy
from typing import Any

import torch

from nas_headprune.errors import CheckpointError
from nas_headprune.pipeline.state import RunState
from nas_headprune.runfolder import read_json


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
    data = None
    if run.main:
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
        data = table.to_dict()
        data["cache_file"] = str(cached) if cached else None
        atomic_write_json(path, data)
    if run.world > 1:
        box = [data]
        torch.distributed.broadcast_object_list(box, src=0)
        data = box[0]
    assert data is not None
    return LatencyTable.from_dict(data)


def latency_check(run: RunState, pruned: torch.nn.Module, arch: Any) -> dict[str, Any]:
    """Predicted against measured latency of the pruned model, both models timed interleaved at the
    latency budget's batch size, device and threads."""
    from nas_headprune.evaluator import metrics

    lat, table = run.cfg.latency, run.latency
    device = lat.device or str(run.device)
    timed = metrics.measure_throughput(
        {"dense": copy.deepcopy(run.model), "pruned": copy.deepcopy(pruned)},
        run.size,
        batch_size=lat.batch_size,
        device=device,
        warmup=lat.warmup,
        iters=lat.check_rounds,
        threads=lat.threads,
    )
    predicted = table.predict(run.space, arch)
    measured, dense = timed["pruned"]["ms_per_batch"], timed["dense"]["ms_per_batch"]
    # The machine's speed drifts between the table's measurement and this one (load, clocks), so the
    # budget and the prediction are compared as fractions of the dense latency timed alongside.
    predicted_fraction, measured_fraction = predicted / table.dense_ms, measured / dense
    return {
        "batch_size": lat.batch_size,
        "device": device,
        "device_name": table.setting.get("device_name"),
        "threads": table.setting.get("threads"),
        "budget": run.cfg.budget,
        "table_dense_ms": table.dense_ms,
        "target_ms": run.cfg.budget * table.dense_ms,
        "predicted_ms": predicted,
        "predicted_fraction": predicted_fraction,
        "measured_ms": measured,
        "measured_dense_ms": dense,
        "measured_fraction": measured_fraction,
        "measured_over_budget": measured_fraction / run.cfg.budget,
        "prediction_error": predicted_fraction / measured_fraction - 1.0,
    }
