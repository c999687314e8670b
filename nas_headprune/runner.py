"""The search pipeline, the same for every strategy:

load model and data -> build the space -> strategy.search -> validate -> materialise (fold scales)
-> reweight -> fine-tune -> evaluate (dense and pruned, accuracy, MACs, params, throughput).

A run folder holds ``config.resolved.yaml``, ``search.json`` (+ ``search_scales.safetensors``),
``model/`` (the pruned model, :func:`nas_headprune.save_pruned` format), ``finetune/`` (epoch
checkpoints), ``metrics.jsonl`` and finally ``result.json``. Every file is written atomically.
Re-running the same command on the same folder resumes: a finished stage is not redone.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError

from nas_headprune import __version__
from nas_headprune.config import RunConfig, validation_message
from nas_headprune.errors import ConfigError, StrategyError, UsageError

log = logging.getLogger(__name__)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is available; use 'cpu' or 'auto'")
    return name


def _sub(model_cls: Any, data: dict[str, Any], field: str) -> Any:
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, prefix=field, model=model_cls)) from exc


def load_base_model(cfg: RunConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The dense model and what is known about it (``data`` defaults for the embedded one)."""
    from nas_headprune.models.dense import embedded_dir, load_dense, load_weights
    from nas_headprune.models.factory import create_model

    if cfg.model.name.startswith("embedded"):
        model, record = load_dense(embedded_dir(cfg.model.name))
        return model, record
    model = create_model(cfg.model.name, **cfg.model.kwargs)
    if cfg.model.checkpoint:
        load_weights(model, cfg.model.checkpoint)
    else:
        log.warning("model %s has no checkpoint: pruning randomly initialised weights", cfg.model.name)
    return model.eval(), {"name": cfg.model.name, "kwargs": cfg.model.kwargs}


def versions() -> dict[str, str]:
    import timm

    return {
        "nas_headprune": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


class MetricsLog:
    """Append-only JSON lines (one event per line), flushed at once."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
            fh.flush()


def run_search(cfg: RunConfig, out: str | Path) -> dict[str, Any]:
    """Run the whole pipeline into ``out``; returns the result record (also in result.json)."""
    from safetensors.torch import load_file, save_file

    from nas_headprune import data as data_mod
    from nas_headprune.atomic import atomic_path, atomic_write_json, atomic_write_text
    from nas_headprune.evaluator import finetune as ft
    from nas_headprune.evaluator import metrics
    from nas_headprune.evaluator.materialize import materialize
    from nas_headprune.evaluator.measure import measure_macs
    from nas_headprune.evaluator.reweight import ReweightConfig, reweight
    from nas_headprune.io import load_pruned, save_pruned
    from nas_headprune.registry import make_strategy
    from nas_headprune.space import build_space
    from nas_headprune.strategy import SearchContext, validate_result

    out = Path(out)
    strategy = make_strategy(cfg.strategy, cfg.strategy_options)  # config errors before any work
    ft_cfg = _sub(ft.FinetuneConfig, cfg.finetune, "finetune")
    rw_cfg = _sub(ReweightConfig, cfg.reweight, "reweight")
    device: str | torch.device = resolve_device(cfg.device)
    rank, world, dist_device = ft.init_distributed_from_env()
    if world > 1:
        device = dist_device
    main = rank == 0

    model, record = load_base_model(cfg)
    data_dict = (
        {**record.get("data", {}), **cfg.data} if cfg.model.name.startswith("embedded") else dict(cfg.data)
    )
    data_cfg = _sub(data_mod.DataConfig, data_dict, "data")

    out.mkdir(parents=True, exist_ok=True)
    resolved = cfg.model_dump(mode="json")
    resolved["data"] = data_cfg.model_dump(mode="json")
    resolved["finetune"] = ft_cfg.model_dump(mode="json")
    resolved["reweight"] = rw_cfg.model_dump(mode="json")
    resolved["strategy_options"] = strategy.config.model_dump(mode="json")
    if (out / "result.json").is_file():
        done = json.loads((out / "result.json").read_text())
        if done.get("config") == resolved:
            log.info("%s already holds a finished run with this config; nothing to do", out)
            return done
        raise UsageError(f"{out} holds a finished run with a different config; choose another --out")
    if main:
        atomic_write_text(out / "config.resolved.yaml", yaml.safe_dump(resolved, sort_keys=False))
    mlog = MetricsLog(out / "metrics.jsonl", enabled=main)
    timings: dict[str, float] = {}

    torch.manual_seed(cfg.seed)
    bundle = data_mod.load_datasets(data_cfg, seed=cfg.seed)
    train_loader, test_loader = data_mod.make_loaders(bundle, data_cfg, seed=cfg.seed, distributed=world > 1)
    calib = data_mod.calibration_batches(bundle, data_cfg, seed=cfg.seed)
    size = data_mod.input_size(bundle)
    model = model.to(device)
    space = build_space(model, size, skip_unsupported=cfg.space.skip_unsupported)
    dense_macs = measure_macs(model, size)
    mlog.write("start", strategy=cfg.strategy, budget=cfg.budget, seed=cfg.seed, dense_macs=dense_macs)

    # ---------------------------------------------------------------- search
    search_file = out / "search.json"
    ctx = SearchContext(
        model=model,
        space=space,
        budget=cfg.budget,
        dense_macs=dense_macs,
        calib=calib,
        seed=cfg.seed,
        device=str(device),
        train_loader=train_loader,
        work_dir=out / "search_state",
        progress=cfg.progress and main,
    )
    if search_file.is_file():
        saved = json.loads(search_file.read_text())
        selection = space.selection(saved["selection"])
        scales = load_file(str(out / "search_scales.safetensors")) if saved.get("has_scales") else None
        weights = load_file(str(out / "search_weights.safetensors")) if saved.get("has_weights") else None
        info, reported = saved["info"], saved.get("reported_macs")
        timings["search_s"] = saved["search_s"]
        log.info("search already finished; resuming from %s", search_file)
    else:
        (out / "search_state").mkdir(exist_ok=True)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            result = strategy.search(ctx)
        timings["search_s"] = time.perf_counter() - t0
        selection, _ = validate_result(cfg.strategy, ctx, result)
        scales = {k: v.detach().cpu().contiguous() for k, v in (result.scales or {}).items()}
        info, reported = result.info, result.reported_macs
        weights = {k: v.detach().cpu().contiguous() for k, v in (result.weights or {}).items()} or None
        if main:
            if scales:
                with atomic_path(out / "search_scales.safetensors") as tmp:
                    save_file(scales, str(tmp))
            if weights:
                with atomic_path(out / "search_weights.safetensors") as tmp:
                    save_file(weights, str(tmp))
            atomic_write_json(
                search_file,
                {
                    "selection": selection.to_lists(),
                    "info": info,
                    "reported_macs": reported,
                    "has_scales": bool(scales),
                    "has_weights": bool(weights),
                    "search_s": timings["search_s"],
                },
            )
        mlog.write("search_done", seconds=timings["search_s"], info=info)
    arch = selection.architecture()

    # -------------------------------------------------- materialise, reweight
    t0 = time.perf_counter()
    if (out / "model" / "pruned.json").is_file() and (out / "reweight.json").is_file():
        pruned = load_pruned(out / "model").to(device)
        rw_report = json.loads((out / "reweight.json").read_text())
    else:
        source = model
        if weights:  # the strategy trained the weights with the architecture: prune those
            source = copy.deepcopy(model)
            try:
                source.load_state_dict(weights)
            except RuntimeError as exc:
                raise StrategyError(
                    f"strategy {cfg.strategy!r} returned weights that do not fit the model: {exc}"
                ) from exc
        pruned = materialize(source, space, selection, scales=scales or None)
        rw_report = reweight(model, pruned, space, calib, rw_cfg, device=device).to_dict()
        if main:
            save_pruned(
                pruned, out / "model", base={"name": record["name"], "kwargs": record.get("kwargs", {})}
            )
            atomic_write_json(out / "reweight.json", rw_report)
    timings["materialize_reweight_s"] = time.perf_counter() - t0
    mlog.write("reweight_done", report=rw_report)

    dense_eval = metrics.evaluate(model, test_loader, device=device)
    before = metrics.evaluate(pruned, test_loader, device=device)
    mlog.write("evaluated", dense=dense_eval, pruned_before_finetune=before)

    # ------------------------------------------------------------- fine-tune
    t0 = time.perf_counter()
    ft_result = None
    if ft_cfg.epochs > 0:
        ft_result = ft.finetune(
            pruned,
            train_loader,
            ft_cfg,
            seed=cfg.seed,
            device=device,
            teacher=model if ft_cfg.distill else None,
            checkpoint_dir=out / "finetune",
            metrics_log=out / "metrics.jsonl" if main else None,
            progress=cfg.progress and main,
        )
        if main:
            save_pruned(
                pruned, out / "model", base={"name": record["name"], "kwargs": record.get("kwargs", {})}
            )
    timings["finetune_s"] = time.perf_counter() - t0
    after = metrics.evaluate(pruned, test_loader, device=device)
    throughput = metrics.measure_throughput(
        {"dense": model, "pruned": pruned}, size, batch_size=cfg.throughput_batch, device=device
    )
    pruned_macs = measure_macs(pruned, size)
    cost = ctx.cost(arch)
    result_record = {
        "strategy": cfg.strategy,
        "budget": cfg.budget,
        "seed": cfg.seed,
        "architecture": arch.to_dict(),
        "dense": {
            "macs": dense_macs,
            "flops": 2 * dense_macs,
            "params": metrics.count_params(model),
            **dense_eval,
        },
        "pruned": {
            "macs": pruned_macs,
            "flops": 2 * pruned_macs,
            "analytic_macs": float(cost.macs),
            "reported_macs": reported if reported is not None else pruned_macs,
            "macs_ratio": pruned_macs / dense_macs,
            "params": metrics.count_params(pruned),
            "before_finetune": before,
            "after_finetune": after,
        },
        "reweight": rw_report,
        "finetune": None
        if ft_result is None
        else {
            "epochs_run": ft_result.epochs_run,
            "steps": ft_result.steps,
            "final_train_loss": ft_result.final_train_loss,
            "resumed_from_epoch": ft_result.resumed_from_epoch,
        },
        "throughput": throughput,
        "strategy_info": info,
        "timings": timings,
        "versions": versions(),
        "device": device,
        "config": resolved,
    }
    if main:
        atomic_write_json(out / "result.json", result_record)
    mlog.write("done", top1=after.get("top1"), macs_ratio=pruned_macs / dense_macs)
    ft.cleanup_distributed()
    return result_record


def run_train(cfg: Any, out: str | Path) -> dict[str, Any]:
    """Train a dense model from scratch (``nas-headprune train``); writes a dense model folder."""
    from nas_headprune import data as data_mod
    from nas_headprune.evaluator import finetune as ft
    from nas_headprune.evaluator import metrics
    from nas_headprune.evaluator.measure import measure_macs
    from nas_headprune.models.dense import save_dense
    from nas_headprune.models.factory import create_model

    out = Path(out)
    data_cfg = _sub(data_mod.DataConfig, cfg.data, "data")
    train_cfg = _sub(ft.FinetuneConfig, cfg.train, "train")
    device: str | torch.device = resolve_device(cfg.device)
    rank, world, dist_device = ft.init_distributed_from_env()
    if world > 1:
        device = dist_device
    torch.manual_seed(cfg.seed)
    bundle = data_mod.load_datasets(data_cfg, seed=cfg.seed)
    kwargs = {"num_classes": bundle.num_classes, "in_chans": bundle.in_chans, **cfg.model.kwargs}
    model = create_model(cfg.model.name, **kwargs).to(device)
    train_loader, test_loader = data_mod.make_loaders(bundle, data_cfg, seed=cfg.seed, distributed=world > 1)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = ft.finetune(
        model,
        train_loader,
        train_cfg,
        seed=cfg.seed,
        device=device,
        checkpoint_dir=out / "train_state",
        metrics_log=out / "metrics.jsonl" if rank == 0 else None,
        progress=cfg.progress and rank == 0,
    )
    seconds = time.perf_counter() - t0
    evaluation = metrics.evaluate(model, test_loader, device=device)
    size = data_mod.input_size(bundle)
    record = {
        "name": cfg.model.name,
        "kwargs": kwargs,
        "input_size": list(size),
        "data": {"name": data_cfg.name},
        "test": evaluation,
        "macs": measure_macs(model, size),
        "params": metrics.count_params(model),
        "train": {
            "epochs": result.epochs_run,
            "steps": result.steps,
            "seconds": seconds,
            "seed": cfg.seed,
            "config": train_cfg.model_dump(mode="json"),
        },
        "versions": versions(),
    }
    if rank == 0:
        save_dense(model.cpu(), out, record)
    ft.cleanup_distributed()
    return record
