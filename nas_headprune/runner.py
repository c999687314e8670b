"""The search pipeline, the same for every strategy, as four resumable stages over a run folder:

1. ``search``: load model and data, build the space, ``strategy.search``, validate the selection
   (``search.json``, ``search_scales.safetensors``, ``search_weights.safetensors``, ``search_state/``);
2. ``reweight``: materialise (fold scales) and refit the layers that consume pruned channels
   (``reweighted/``, a :func:`nas_headprune.save_pruned` folder, and ``reweight.json``);
3. ``finetune``: train the pruned model, with distillation from the dense one when configured
   (``finetune/`` epoch checkpoints, ``finetune.json``, and ``model/``, the final pruned model);
4. ``evaluate``: dense and pruned accuracy, MACs, parameters, throughput (``result.json``).

Every stage records in ``stages.json`` a fingerprint of what it depends on (its config section, the
seed, the dense weights' hash and the previous stage's fingerprint; see
:mod:`nas_headprune.runfolder`). Running the same command again reuses finished stages and resumes
the unfinished one from its checkpoints; running another config in the folder stops with exit 2 and
names the stage and keys that differ, or with ``restart=True`` redoes that stage and the later ones.
A process holds the folder's lock while it works in it. Every file is written atomically.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from nas_headprune import __version__
from nas_headprune.atomic import atomic_write_text
from nas_headprune.config import DataConfig, RunConfig, TrainConfig
from nas_headprune.errors import CheckpointError, ConfigError, StrategyError
from nas_headprune.runfolder import JsonLines, RunFolder, finite_json, read_json, read_tensors

log = logging.getLogger(__name__)

#: data fields that only change evaluation (or nothing about the numbers): left out of the training
#: stages' fingerprints
_EVAL_ONLY_DATA = ("eval_batch_size", "test_subset", "num_workers", "download")
#: fine-tune fields that change nothing about the trained weights
_FINETUNE_UNFINGERPRINTED = ("log_every",)


def resolve_device(name: str) -> str:
    """A run config's ``device`` as the device string the stages use (``"auto"``: CUDA when
    available); the rule is :func:`nas_headprune.evaluator.metrics.resolve_device`'s."""
    from nas_headprune.evaluator.metrics import resolve_device as resolve

    return str(resolve(name))


def load_base_model(cfg: RunConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The dense model and what is known about it (``data`` defaults for the embedded one)."""
    from nas_headprune.models.dense import embedded_dir, load_dense, load_weights
    from nas_headprune.models.factory import create_model

    if cfg.model.name.startswith("embedded"):
        model, record = load_dense(embedded_dir(cfg.model.name))
        return model, record
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # random initial weights are the seed's, so a rerun gets the same model
        model = create_model(cfg.model.name, **cfg.model.kwargs)
    if cfg.model.checkpoint and cfg.model.checkpoint_format == "flatten_official":
        from nas_headprune.models.flatten import load_official_checkpoint

        if not Path(cfg.model.checkpoint).is_file():
            raise ConfigError(f"model.checkpoint: weights file {cfg.model.checkpoint} does not exist")
        load_official_checkpoint(model, cfg.model.checkpoint)
    elif cfg.model.checkpoint:
        load_weights(model, cfg.model.checkpoint)
    else:
        log.warning("model %s has no checkpoint: pruning randomly initialised weights", cfg.model.name)
    return model.eval(), {"name": cfg.model.name, "kwargs": cfg.model.kwargs}


def resolve_data(cfg: RunConfig, record: dict[str, Any]) -> DataConfig:
    """The run's data section: the embedded model's defaults, then what the config sets."""
    if not cfg.model.name.startswith("embedded"):
        return cfg.data
    merged = {**record.get("data", {}), **cfg.data.model_dump(exclude_unset=True)}
    return DataConfig.model_validate(merged)


def weights_sha256(model: torch.nn.Module) -> str:
    """A hash of the model's state (names, shapes, dtypes and values): what the dense model *is*."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{list(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def versions() -> dict[str, str]:
    import timm

    return {
        "nas_headprune": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


class MetricsLog:
    """The run's ``metrics.jsonl``: one event per line, with its name and time."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.lines = JsonLines(path, enabled)

    def write(self, event: str, **fields: Any) -> None:
        self.lines.write({"event": event, "time": time.time(), **fields})


def _check_fits_data(model: torch.nn.Module, size: tuple[int, ...], num_classes: int, cfg: RunConfig) -> None:
    """One forward on a blank image of the data's size: a model that cannot take it is a config error."""
    p = next(model.parameters(), None)
    x = torch.zeros(1, *size, device=p.device if p is not None else "cpu")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, AssertionError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"model {cfg.model.name!r} cannot take the images of data.name={cfg.data.name!r} "
            f"(channels, height, width = {tuple(size)}): {first}. Build the model to fit the data, e.g. "
            "--set model.kwargs.in_chans=1 --set model.kwargs.img_size=28 --set model.kwargs.num_classes=10"
        ) from exc
    finally:
        model.train(was)
    logits = out[0] if isinstance(out, (tuple, list)) else out
    if isinstance(logits, torch.Tensor) and logits.ndim == 2 and logits.shape[-1] < num_classes:
        raise ConfigError(
            f"model {cfg.model.name!r} has {logits.shape[-1]} outputs but data.name={cfg.data.name!r} has "
            f"{num_classes} classes; set model.kwargs.num_classes={num_classes}"
        )


@dataclass
class _Run:
    """What the stages share: the config, the folder, the dense model, the data and the space."""

    cfg: RunConfig
    folder: RunFolder
    restart: bool
    strategy: Any
    data_cfg: DataConfig
    record: dict[str, Any]
    model: torch.nn.Module
    device: str | torch.device
    rank: int
    world: int
    mlog: MetricsLog
    resolved: dict[str, Any]
    dense_sha256: str
    timings: dict[str, float] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # filled by the stages
    bundle: Any = None
    train_loader: Any = None
    test_loader: Any = None
    calib: Any = None
    size: tuple[int, ...] = ()
    space: Any = None
    dense_macs: int = 0
    latency: Any = None  # the LatencyTable of a budget_kind: latency run

    @property
    def out(self) -> Path:
        return self.folder.path

    @property
    def main(self) -> bool:
        return self.rank == 0

    def base_record(self) -> dict[str, Any]:
        return {"name": self.record["name"], "kwargs": self.record.get("kwargs", {})}


def run_search(cfg: RunConfig, out: str | Path, *, restart: bool = False) -> dict[str, Any]:
    """Run the whole pipeline into ``out``; returns the result record (also in result.json).

    ``restart=True`` redoes a stage whose recorded settings differ from ``cfg`` (and every later
    stage) instead of stopping with :class:`~nas_headprune.errors.RunFolderError`.
    """
    from nas_headprune.evaluator import finetune as ft
    from nas_headprune.registry import make_strategy

    strategy = make_strategy(cfg.strategy, cfg.strategy_options)  # config errors before any work
    if cfg.space.prune_heads and not getattr(type(strategy), "head_pruning", False):
        raise ConfigError(
            f"strategy {cfg.strategy!r} cannot search whole heads (space.prune_heads: true); "
            "whole-head pruning needs a scoring strategy, e.g. magnitude, taylor or random"
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
            run = _Run(
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


def _pipeline(run: _Run) -> dict[str, Any]:
    from nas_headprune import data as data_mod

    cfg = run.cfg
    search_inputs = {
        "strategy": cfg.strategy,
        "strategy_options": run.resolved["strategy_options"],
        "budget": cfg.budget,
        "seed": cfg.seed,
        "model": run.resolved["model"],
        # prune_heads enters only when on, so older run folders keep their fingerprints
        "space": {k: v for k, v in run.resolved["space"].items() if k != "prune_heads" or v},
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
        atomic_write_text(run.out / "config.resolved.yaml", yaml.safe_dump(run.resolved, sort_keys=False))

    torch.manual_seed(cfg.seed)
    run.bundle = data_mod.load_datasets(run.data_cfg, seed=cfg.seed)
    run.train_loader, run.test_loader = data_mod.make_loaders(
        run.bundle, run.data_cfg, seed=cfg.seed, distributed=run.world > 1
    )
    run.calib = data_mod.calibration_batches(run.bundle, run.data_cfg, seed=cfg.seed)
    run.size = data_mod.input_size(run.bundle)
    run.model = run.model.to(run.device)
    _check_fits_data(run.model, run.size, run.bundle.num_classes, cfg)

    searched = stage_search(run, done["search"])
    pruned, rw_report = stage_reweight(
        run, done["reweight"], searched.selection, searched.scales, searched.weights
    )
    before = _evaluate(run, pruned)
    pruned, ft_record = stage_finetune(run, done["finetune"], pruned)
    return stage_evaluate(run, searched, pruned, rw_report, ft_record, before)


def _evaluate(run: _Run, model: torch.nn.Module) -> dict[str, Any]:
    """Test metrics, and validation metrics under ``"val"`` when the data holds a validation split."""
    from nas_headprune import data as data_mod
    from nas_headprune.evaluator import metrics

    report: dict[str, Any] = dict(metrics.evaluate(model, run.test_loader, device=run.device))
    if run.bundle.val is not None:
        val_loader = data_mod.make_eval_loader(run.bundle.val, run.data_cfg)
        report["val"] = metrics.evaluate(model, val_loader, device=run.device)
    return report


@dataclass
class Searched:
    """What the search stage hands on: the selection and what the strategy learned with it."""

    selection: Any
    scales: dict[str, torch.Tensor] | None
    weights: dict[str, torch.Tensor] | None
    info: dict[str, Any]
    reported_macs: float | None
    weight_steps: int  # optimizer steps of the search that updated the model's weights


def stage_search(run: _Run, done: bool) -> Searched:
    """Build the space and run the strategy, or read the finished search back."""
    from safetensors.torch import save_file

    from nas_headprune.atomic import atomic_path, atomic_write_json
    from nas_headprune.build import build_space
    from nas_headprune.evaluator.measure import measure_macs
    from nas_headprune.strategy import SearchContext, validate_result

    cfg, out = run.cfg, run.out
    run.space = build_space(run.model, run.size, skip_unsupported=cfg.space.skip_unsupported)
    if cfg.space.prune_heads:
        run.space = run.space.with_heads()
    run.dense_macs = measure_macs(run.model, run.size)
    run.mlog.write(
        "start", strategy=cfg.strategy, budget=cfg.budget, seed=cfg.seed, dense_macs=run.dense_macs
    )
    search_file = out / "search.json"
    if cfg.budget_kind == "latency":
        run.latency = _latency_table(run, done)
    if done:
        saved = read_json(search_file, "search record")
        try:
            selection = run.space.selection(saved["selection"])
            scales = read_tensors(out / "search_scales.safetensors") if saved["has_scales"] else None
            weights = read_tensors(out / "search_weights.safetensors") if saved["has_weights"] else None
            info, reported = saved["info"], saved["reported_macs"]
            weight_steps = int(saved["weight_steps"])
            run.timings["search_s"] = float(saved["search_s"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{search_file} is damaged or was edited ({type(exc).__name__}: {exc}); rerun with --restart"
            ) from exc
        log.info("search already finished; resuming from %s", search_file)
        return Searched(selection, scales, weights, info, reported, weight_steps)
    run.folder.start("search", run.inputs["search"])
    (out / "search_state").mkdir(exist_ok=True)
    ctx = SearchContext(
        model=run.model,
        space=run.space,
        budget=cfg.budget,
        dense_macs=run.dense_macs,
        calib=run.calib,
        seed=cfg.seed,
        device=str(run.device),
        train_loader=run.train_loader,
        work_dir=out / "search_state",
        progress=cfg.progress and run.main,
        rank=run.rank,
        world_size=run.world,
        budget_kind=cfg.budget_kind,
        latency=run.latency,
    )
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        result = run.strategy.search(ctx)
    run.timings["search_s"] = time.perf_counter() - t0
    selection, _ = validate_result(cfg.strategy, ctx, result)
    if run.world > 1:
        _same_on_every_rank(cfg.strategy, selection)
    scales = {k: v.detach().cpu().contiguous() for k, v in (result.scales or {}).items()} or None
    weights = {k: v.detach().cpu().contiguous() for k, v in (result.weights or {}).items()} or None
    info, reported = finite_json(result.info)[0], result.reported_macs
    if run.main:
        for name, tensors in (("search_scales", scales), ("search_weights", weights)):
            if tensors:
                with atomic_path(out / f"{name}.safetensors") as tmp:
                    save_file(tensors, str(tmp))
        atomic_write_json(
            search_file,
            {
                "selection": selection.to_lists(),
                "info": info,
                "reported_macs": reported,
                "has_scales": bool(scales),
                "has_weights": bool(weights),
                "weight_steps": result.weight_steps,
                "search_s": run.timings["search_s"],
                "fingerprint": run.fingerprints["search"],
            },
        )
    run.folder.finish("search")
    run.mlog.write("search_done", seconds=run.timings["search_s"], info=info)
    return Searched(selection, scales, weights, info, reported, result.weight_steps)


def _latency_table(run: _Run, done: bool) -> Any:
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


def _latency_check(run: _Run, pruned: torch.nn.Module, arch: Any) -> dict[str, Any]:
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


def _same_on_every_rank(strategy: str, selection: Any) -> None:
    """Every rank must prune the same channels: compare the selections' hashes across ranks."""
    import torch.distributed as dist

    digest = hashlib.sha256(json.dumps(selection.to_lists(), sort_keys=True).encode()).hexdigest()
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        groups = ", ".join(f"rank {r}: {d[:12]}" for r, d in enumerate(digests))
        raise StrategyError(
            f"strategy {strategy!r} chose different channels on different ranks ({groups}); under torchrun "
            "a strategy must return the same selection on every rank (make it deterministic, or use "
            "SearchContext.shard / all_reduce_sum / broadcast to share its work)"
        )


def stage_reweight(
    run: _Run, done: bool, selection: Any, scales: Any, weights: Any
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


def stage_finetune(
    run: _Run, done: bool, pruned: torch.nn.Module
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
            out / "finetune.json", finite_json({"record": record, "seconds": run.timings["finetune_s"]})[0]
        )
    run.folder.finish("finetune")
    return pruned, record


def stage_evaluate(
    run: _Run,
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
    dense_eval = _evaluate(run, model)
    run.mlog.write("evaluated", dense=dense_eval, pruned_before_finetune=before)
    after = _evaluate(run, pruned)
    # validation metrics sit beside the test ones; None when the data holds no validation split
    before, after = dict(before), dict(after)
    dense_val, before_val, after_val = (d.pop("val", None) for d in (dense_eval, before, after))
    search_steps = searched.weight_steps
    finetune_steps = int(ft_record["steps"]) if ft_record else 0
    throughput = metrics.measure_throughput(
        {"dense": model, "pruned": pruned}, run.size, batch_size=cfg.throughput_batch, device=run.device
    )
    pruned_macs = measure_macs(pruned, run.size)
    arch = searched.selection.architecture()
    cost = analytic_cost(run.space, arch)
    latency = _latency_check(run, pruned, arch) if cfg.budget_kind == "latency" else None
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
        log.warning("non-finite values written as null in result.json: %s", ", ".join(replaced[:8]))
    if run.main:
        atomic_write_json(run.out / "result.json", record)
    run.folder.finish("evaluate")
    run.mlog.write("done", top1=after.get("top1"), macs_ratio=pruned_macs / dense_macs)
    return record


def run_train(cfg: TrainConfig, out: str | Path) -> dict[str, Any]:
    """Train a dense model from scratch (``nas-headprune train``); writes a dense model folder."""
    from nas_headprune import data as data_mod
    from nas_headprune.evaluator import finetune as ft
    from nas_headprune.evaluator import metrics
    from nas_headprune.evaluator.measure import measure_macs
    from nas_headprune.models.dense import save_dense
    from nas_headprune.models.factory import create_model

    out = Path(out)
    data_cfg, train_cfg = cfg.data, cfg.train
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
