"""``run_search``: the whole pipeline into a run folder. It checks every stage's fingerprint against
the config before any work, then loads the data and runs the stages that have not finished."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from nas_headprune.atomic import atomic_write_text
from nas_headprune.config import RunConfig
from nas_headprune.errors import CheckpointError, ConfigError
from nas_headprune.pipeline.evaluate import evaluate_model, stage_evaluate
from nas_headprune.pipeline.finetune import stage_finetune
from nas_headprune.pipeline.loading import (
    check_fits_data,
    load_base_model,
    resolve_data,
    resolve_device,
    weights_sha256,
)
from nas_headprune.pipeline.reweight import stage_reweight
from nas_headprune.pipeline.search import stage_search
from nas_headprune.pipeline.state import MetricsLog, RunState
from nas_headprune.runfolder import RunFolder, read_json

log = logging.getLogger(__name__)

#: data fields that only change evaluation (or nothing about the numbers): left out of the training
#: stages' fingerprints
_EVAL_ONLY_DATA = ("eval_batch_size", "test_subset", "num_workers", "download")
#: fine-tune fields that change nothing about the trained weights
_FINETUNE_UNFINGERPRINTED = ("log_every",)


def run_search(cfg: RunConfig, out: str | Path, *, restart: bool = False) -> dict[str, Any]:
    """Run the whole pipeline into ``out``; returns the result record (also in result.json).

    ``restart=True`` redoes a stage whose recorded settings differ from ``cfg`` (and every later
    stage) instead of stopping with :class:`~nas_headprune.errors.RunFolderError`.
    """
    from nas_headprune.evaluator import finetune as ft
    from nas_headprune.registry import make_strategy

    strategy = make_strategy(cfg.strategy, cfg.strategy_options)  # config errors before any work
    if cfg.space.drop_sublayers and not strategy.drops_sublayers():
        raise ConfigError(
            f"strategy {cfg.strategy!r} cannot drop whole sublayers (space.drop_sublayers: true); "
            "dropping sublayers needs a scoring strategy, e.g. magnitude, taylor or random; or set "
            "space.drop_sublayers: false"
        )
    if cfg.space.prune_heads and not strategy.searches_heads():
        option = type(strategy).head_pruning_option if type(strategy).head_pruning else None
        how = (
            f"it does with strategy_options.{option}: true"
            if option
            else "whole-head pruning needs a scoring strategy, e.g. magnitude, taylor or random"
        )
        raise ConfigError(
            f"strategy {cfg.strategy!r} cannot search whole heads (space.prune_heads: true); {how}"
        )
    kinds = getattr(type(strategy), "budget_kinds", ("macs",))
    if cfg.budget_kind not in kinds:
        raise ConfigError(
            f"strategy {cfg.strategy!r} cannot meet budget_kind {cfg.budget_kind!r} (it meets: "
            f"{', '.join(kinds)}); a latency budget needs a scoring strategy, e.g. magnitude, taylor or random"
        )
    device: str | torch.device = resolve_device(cfg.device)
    rank, world, dist_device = ft.init_distributed_from_env()
    if world > 1:
        device = dist_device
    main = rank == 0
    try:
        folder = RunFolder(out, write=main)
        with folder:
            if world > 1:  # every rank reads the manifest before rank 0 writes to it
                torch.distributed.barrier()
            model, record = load_base_model(cfg)
            data_cfg = resolve_data(cfg, record)
            resolved = cfg.model_dump(mode="json")
            resolved["data"] = data_cfg.model_dump(mode="json")
            resolved["strategy_options"] = strategy.config.model_dump(mode="json")
            run = RunState(
                cfg=cfg,
                folder=folder,
                restart=restart,
                strategy=strategy,
                data_cfg=data_cfg,
                record=record,
                model=model,
                device=device,
                rank=rank,
                world=world,
                mlog=MetricsLog(folder.path / "metrics.jsonl", enabled=main),
                resolved=resolved,
                dense_sha256=weights_sha256(model),
            )
            return _pipeline(run)
    finally:
        ft.cleanup_distributed()


def _pipeline(run: RunState) -> dict[str, Any]:
    from nas_headprune import data as data_mod

    cfg = run.cfg
    search_inputs = {
        "strategy": cfg.strategy,
        "strategy_options": run.resolved["strategy_options"],
        "budget": cfg.budget,
        "seed": cfg.seed,
        "model": run.resolved["model"],
        # prune_heads and drop_sublayers enter only when on, so older run folders keep their fingerprints
        "space": {
            k: v for k, v in run.resolved["space"].items() if k not in ("prune_heads", "drop_sublayers") or v
        },
        "data": {k: v for k, v in run.resolved["data"].items() if k not in _EVAL_ONLY_DATA},
        "dense_sha256": run.dense_sha256,
    }
    if cfg.budget_kind == "latency":  # absent for MACs budgets, so their fingerprints stay as they were
        search_inputs["budget_kind"] = cfg.budget_kind
        search_inputs["latency"] = {
            k: v for k, v in run.resolved["latency"].items() if k not in ("check_rounds", "cache_dir")
        }
    reweight_inputs = {"reweight": run.resolved["reweight"]}
    finetune_inputs = {
        "finetune": {k: v for k, v in run.resolved["finetune"].items() if k not in _FINETUNE_UNFINGERPRINTED}
    }
    evaluate_inputs = {
        "data": {k: run.resolved["data"][k] for k in ("test_subset", "eval_batch_size")},
        "throughput_batch": cfg.throughput_batch,
    }
    if cfg.throughput_rounds != RunConfig.model_fields["throughput_rounds"].default:  # absent at the default,
        # so older run folders keep their fingerprints
        evaluate_inputs["throughput_rounds"] = cfg.throughput_rounds
    if cfg.budget_kind == "latency":
        evaluate_inputs["latency_check_rounds"] = cfg.latency.check_rounds
    # every recorded stage is checked against this config before any work (and before data loads)
    chain = {
        "search": search_inputs,
        "reweight": reweight_inputs,
        "finetune": finetune_inputs,
        "evaluate": evaluate_inputs,
    }
    done: dict[str, bool] = {}
    previous = None
    for stage, inputs in chain.items():
        if previous is not None:
            inputs[previous] = run.fingerprints[previous]  # a stage depends on the one before it
        run.fingerprints[stage], done[stage] = run.folder.check(stage, inputs, restart=run.restart)
        previous = stage
    run.inputs = chain
    if done["evaluate"]:
        record = read_json(run.out / "result.json", "result record")
        if not isinstance(record, dict) or record.get("fingerprints") != run.fingerprints:
            raise CheckpointError(
                f"{run.out / 'result.json'} does not match its stage records; rerun with --restart"
            )
        log.info("%s already holds a finished run with this config; nothing to do", run.out)
        return record
    if run.main:
        atomic_write_text(
            run.out / "config.resolved.yaml",
            yaml.safe_dump(run.resolved, sort_keys=False),
        )

    torch.manual_seed(cfg.seed)
    run.bundle = data_mod.load_datasets(run.data_cfg, seed=cfg.seed)
    run.train_loader, run.test_loader = data_mod.make_loaders(
        run.bundle, run.data_cfg, seed=cfg.seed, distributed=run.world > 1
    )
    run.calib = data_mod.calibration_batches(run.bundle, run.data_cfg, seed=cfg.seed)
    run.size = data_mod.input_size(run.bundle)
    run.model = run.model.to(run.device)
    check_fits_data(run.model, run.size, run.bundle.num_classes, cfg)

    searched = stage_search(run, done["search"])
    pruned, rw_report = stage_reweight(
        run, done["reweight"], searched.selection, searched.scales, searched.weights
    )
    before = evaluate_model(run, pruned)
    pruned, ft_record = stage_finetune(run, done["finetune"], pruned)
    return stage_evaluate(run, searched, pruned, rw_report, ft_record, before)
