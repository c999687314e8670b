"""The finetune stage: train the reweighted model, with distillation from the dense one when
configured; ``finetune/`` epoch checkpoints, ``finetune.json`` and ``model/``, the final pruned model."""

from __future__ import annotations

import time
from typing import Any

import torch

from nas_headprune.errors import CheckpointError
from nas_headprune.jsonlog import finite_json
from nas_headprune.pipeline.state import RunState
from nas_headprune.runfolder import read_json


def stage_finetune(
    run: RunState, done: bool, pruned: torch.nn.Module
) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    """Fine-tune the reweighted model; ``model/`` holds the result (the final pruned model)."""
    from nas_headprune.atomic import atomic_write_json
    from nas_headprune.evaluator import finetune as ft
    from nas_headprune.io import load_pruned, save_pruned

    out, ft_cfg = run.out, run.cfg.finetune
    t0 = time.perf_counter()
    if done:
        pruned = load_pruned(out / "model").to(run.device)
        saved = read_json(out / "finetune.json", "fine-tune record")
        if not isinstance(saved, dict) or "record" not in saved or "seconds" not in saved:
            raise CheckpointError(f"{out / 'finetune.json'} is damaged or was edited; rerun with --restart")
        run.timings["finetune_s"] = float(saved["seconds"])
        return pruned, saved["record"]
    run.folder.start("finetune", run.inputs["finetune"])
    record = None
    if ft_cfg.epochs > 0:
        result = ft.finetune(
            pruned,
            run.train_loader,
            ft_cfg,
            seed=run.cfg.seed,
            device=run.device,
            teacher=run.model if ft_cfg.distill else None,
            checkpoint_dir=out / "finetune",
            metrics_log=out / "metrics.jsonl" if run.main else None,
            progress=run.cfg.progress and run.main,
        )
        record = {
            "epochs_run": result.epochs_run,
            "steps": result.steps,
            "final_train_loss": result.final_train_loss,
            "resumed_from_epoch": result.resumed_from_epoch,
        }
    run.timings["finetune_s"] = time.perf_counter() - t0
    if run.main:
        save_pruned(pruned, out / "model", base=run.base_record())
        atomic_write_json(
            out / "finetune.json",
            finite_json({"record": record, "seconds": run.timings["finetune_s"]})[0],
        )
    run.folder.finish("finetune")
    return pruned, record
