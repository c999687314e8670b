"""The reweight stage: materialise the selection (folding scales) and refit the layers that consume
pruned channels; ``reweighted/`` and ``reweight.json``."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from nas_headprune.errors import CheckpointError, StrategyError
from nas_headprune.jsonlog import finite_json
from nas_headprune.pipeline.state import RunState
from nas_headprune.runfolder import read_json


def stage_reweight(
    run: RunState, done: bool, selection: Any, scales: Any, weights: Any
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Materialise the selection (folding scales) and refit the consumers of pruned channels."""
    from nas_headprune.atomic import atomic_write_json
    from nas_headprune.evaluator.materialize import materialize
    from nas_headprune.evaluator.reweight import reweight
    from nas_headprune.io import load_pruned, save_pruned

    out = run.out
    t0 = time.perf_counter()
    if done:
        pruned = load_pruned(out / "reweighted").to(run.device)
        rw_report = read_json(out / "reweight.json", "reweight record")
        _check_architecture(pruned, selection, out / "reweighted")
    else:
        run.folder.start("reweight", run.inputs["reweight"])
        source = run.model
        if weights:  # the strategy trained the weights with the architecture: prune those
            source = copy.deepcopy(run.model)
            try:
                source.load_state_dict(weights)
            except RuntimeError as exc:
                raise StrategyError(
                    f"strategy {run.cfg.strategy!r} returned weights that do not fit the model: {exc}"
                ) from exc
        pruned = materialize(source, run.space, selection, scales=scales or None)
        rw_report = reweight(run.model, pruned, run.space, run.calib, run.cfg.reweight, device=run.device)
        rw_report = finite_json(rw_report.to_dict())[0]
        if run.main:
            save_pruned(pruned, out / "reweighted", base=run.base_record())
            atomic_write_json(out / "reweight.json", rw_report)
        run.folder.finish("reweight")
    run.timings["materialize_reweight_s"] = time.perf_counter() - t0
    run.mlog.write("reweight_done", report=rw_report)
    return pruned, rw_report


def _check_architecture(pruned: torch.nn.Module, selection: Any, where: Path) -> None:
    """A saved pruned model must have the searched architecture (guards against edited files)."""
    from nas_headprune.evaluator.materialize import META_ATTR

    saved = (getattr(pruned, META_ATTR, None) or {}).get("architecture")
    expected = selection.architecture().to_dict()
    if saved is not None and saved != expected:
        diff = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
        raise CheckpointError(
            f"{where} does not hold the searched architecture (differs at {', '.join(diff[:4])}); "
            "rerun with --restart"
        )
