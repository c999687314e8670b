"""The evaluate stage: dense and pruned accuracy, MACs, parameters, throughput and (for a latency
budget) the latency check; ``result.json``."""

from __future__ import annotations

import logging
from typing import Any

import torch

from nas_headprune.jsonlog import finite_json
from nas_headprune.pipeline.latency import latency_check
from nas_headprune.pipeline.loading import versions
from nas_headprune.pipeline.search import Searched
from nas_headprune.pipeline.state import RunState

log = logging.getLogger(__name__)


def evaluate_model(run: RunState, model: torch.nn.Module) -> dict[str, Any]:
    """Test metrics, and validation metrics under ``"val"`` when the data holds a validation split."""
    from nas_headprune import data as data_mod
    from nas_headprune.evaluator import metrics

    report: dict[str, Any] = dict(metrics.evaluate(model, run.test_loader, device=run.device))
    if run.bundle.val is not None:
        val_loader = data_mod.make_eval_loader(run.bundle.val, run.data_cfg)
        report["val"] = metrics.evaluate(model, val_loader, device=run.device)
    return report


def stage_evaluate(
    run: RunState,
    searched: Searched,
    pruned: torch.nn.Module,
    rw_report: dict[str, Any],
    ft_record: dict[str, Any] | None,
    before: dict[str, Any],
) -> dict[str, Any]:
    """Dense and pruned accuracy, MACs, parameters and throughput; writes ``result.json``."""
    from nas_headprune.atomic import atomic_write_json
    from nas_headprune.evaluator import metrics
    from nas_headprune.evaluator.cost import analytic_cost
    from nas_headprune.evaluator.measure import measure_macs

    cfg, model = run.cfg, run.model
    run.folder.start("evaluate", run.inputs["evaluate"])
    dense_eval = evaluate_model(run, model)
    run.mlog.write("evaluated", dense=dense_eval, pruned_before_finetune=before)
    after = evaluate_model(run, pruned)
    # validation metrics sit beside the test ones; None when the data holds no validation split
    before, after = dict(before), dict(after)
    dense_val, before_val, after_val = (d.pop("val", None) for d in (dense_eval, before, after))
    search_steps = searched.weight_steps
    finetune_steps = int(ft_record["steps"]) if ft_record else 0
    throughput = metrics.measure_throughput(
        {"dense": model, "pruned": pruned},
        run.size,
        batch_size=cfg.throughput_batch,
        device=run.device,
        iters=cfg.throughput_rounds,
    )
    pruned_macs = measure_macs(pruned, run.size)
    arch = searched.selection.architecture()
    cost = analytic_cost(run.space, arch)
    latency = latency_check(run, pruned, arch) if cfg.budget_kind == "latency" else None
    dense_macs = run.dense_macs
    record = {
        "strategy": cfg.strategy,
        "budget": cfg.budget,
        "budget_kind": cfg.budget_kind,
        "seed": cfg.seed,
        "architecture": arch.to_dict(),
        "dense": {
            "macs": dense_macs,
            "flops": 2 * dense_macs,
            "params": metrics.count_params(model),
            **dense_eval,
            "val": dense_val,
            "val_top1": dense_val["top1"] if dense_val else None,
        },
        "pruned": {
            "macs": pruned_macs,
            "flops": 2 * pruned_macs,
            "analytic_macs": float(cost.macs),
            "reported_macs": searched.reported_macs if searched.reported_macs is not None else pruned_macs,
            "macs_ratio": pruned_macs / dense_macs,
            "params": metrics.count_params(pruned),
            "before_finetune": before,
            "after_finetune": after,
            "val_before_finetune": before_val,
            "val_after_finetune": after_val,
            "val_top1": after_val["top1"] if after_val else None,
        },
        # optimizer steps that trained the model's weights: the search's and the fine-tune's
        "training_steps": {
            "search": search_steps,
            "finetune": finetune_steps,
            "total": search_steps + finetune_steps,
        },
        "reweight": rw_report,
        "finetune": ft_record,
        "throughput": throughput,
        "latency": latency,
        "strategy_info": searched.info,
        "timings": run.timings,
        "versions": versions(),
        "device": str(run.device),
        "dense_sha256": run.dense_sha256,
        "fingerprints": run.fingerprints,
        "config": run.resolved,
    }
    record, replaced = finite_json(record)
    if replaced:
        log.warning(
            "non-finite values written as null in result.json: %s",
            ", ".join(replaced[:8]),
        )
    if run.main:
        atomic_write_json(run.out / "result.json", record)
    run.folder.finish("evaluate")
    run.mlog.write("done", top1=after.get("top1"), macs_ratio=pruned_macs / dense_macs)
    return record
