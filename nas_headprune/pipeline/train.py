"""``nas-headprune train``: train a dense model from scratch and write a dense model folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from nas_headprune.config import TrainConfig
from nas_headprune.pipeline.loading import resolve_device, versions


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
    kwargs = {
        "num_classes": bundle.num_classes,
        "in_chans": bundle.in_chans,
        **cfg.model.kwargs,
    }
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
