"""Fine-tune a (pruned) model: AdamW, warm-up plus cosine schedule, optional distillation, resumable.

One call of :func:`finetune` trains ``cfg.epochs`` epochs. The learning rate rises linearly over
``cfg.warmup_epochs`` and then follows a cosine down to ``cfg.min_lr`` at the last step. Biases, norm
weights, every other 1-D parameter and the names a timm model lists in ``no_weight_decay()`` get no
weight decay. With ``cfg.distill`` the loss mixes cross entropy with the KL divergence to a frozen
teacher's softened predictions. Mixed precision is used on CUDA only (bf16 where supported, else fp16
with a gradient scaler).

Resuming. With a ``checkpoint_dir``, ``last.pt`` is written atomically at the end of every epoch; it
holds the model, optimizer, scheduler and scaler states, the epoch and step counters, the history, the
random states of torch, CUDA, numpy and ``random`` (of every rank) and a fingerprint of the config,
seed, model shapes and steps per epoch. A later call with the same arguments continues from the next
epoch and, on the CPU, ends with bit-identical weights to a run that was never interrupted: the data
order of an epoch is a function of ``(seed, epoch)`` (``loader.sampler.set_epoch(epoch)`` where the
sampler has it, and the loader's generator reseeded with ``seed + epoch``) and every other random draw
continues from the saved states. The checkpoint holds only tensors and plain types, so it loads with
``torch.load(weights_only=True)``.

Distributed. Under ``torch.distributed`` the model is wrapped in ``DistributedDataParallel``; only
rank 0 writes checkpoints and logs, and every rank waits at a barrier after each checkpoint. Launch
with ``torchrun`` and call :func:`init_distributed_from_env` first.

This module holds the loop over epochs; the parts it calls live beside it and their public names are
importable from here too: :mod:`~nas_headprune.evaluator.optim` (parameter groups, schedule),
:mod:`~nas_headprune.evaluator.losses` (distillation), :mod:`~nas_headprune.evaluator.finetune_epoch`
(one epoch), :mod:`~nas_headprune.evaluator.finetune_checkpoint` (``last.pt`` and the random states)
and :mod:`~nas_headprune.evaluator.distributed` (the process group).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nas_headprune.config import FinetuneConfig
from nas_headprune.errors import CheckpointError, UsageError
from nas_headprune.evaluator.distributed import cleanup_distributed, init_distributed_from_env
from nas_headprune.evaluator.finetune_checkpoint import (
    CHECKPOINT_NAME,
    capture_rng_state,
    config_fingerprint,
    read_checkpoint,
    restore_rng_state,
    seed_everything,
    write_checkpoint,
)
from nas_headprune.evaluator.finetune_epoch import EpochSetup, train_epoch
from nas_headprune.evaluator.losses import distillation_loss, kl_to_teacher
from nas_headprune.evaluator.metrics import amp_dtype, evaluate, is_distributed, resolve_device
from nas_headprune.evaluator.optim import lr_factor, param_groups
from nas_headprune.jsonlog import JsonLines

__all__ = [
    "CHECKPOINT_NAME",
    "FinetuneConfig",
    "FinetuneResult",
    "cleanup_distributed",
    "config_fingerprint",
    "distillation_loss",
    "kl_to_teacher",
    "finetune",
    "init_distributed_from_env",
    "lr_factor",
    "param_groups",
]

logger = logging.getLogger(__name__)

# the names the random-state helpers had when they lived in this module
_capture_rng_state = capture_rng_state
_restore_rng_state = restore_rng_state


@dataclass
class FinetuneResult:
    """What :func:`finetune` did; the model itself is trained in place."""

    epochs_run: int  # epochs trained by this call (not counting those loaded from a checkpoint)
    steps: int  # optimizer steps in total, including those before a resume
    final_train_loss: float | None  # mean training loss of the last epoch; None when no epoch ever ran
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch, resumed ones included
    resumed_from_epoch: int | None = None  # epochs already done in the checkpoint resumed from


# ----------------------------------------------------------------------------------------------------
# logging and progress


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from nas_headprune.progress import stderr_progress

    return stderr_progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
        enabled=enabled,
        terminal_only=True,
    )


def _steps_per_epoch(loader: Iterable[Any], cap: int | None) -> int:
    try:
        length: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        length = None
    if length is None:
        if cap is None:
            raise UsageError(
                f"the train loader ({type(loader).__name__}) has no len(); set max_steps_per_epoch so that the "
                "learning-rate schedule knows the epoch length"
            )
        return cap
    steps = length if cap is None else min(length, cap)
    if steps < 1:
        raise UsageError("the train loader is empty: it yields no batches")
    return steps


# ----------------------------------------------------------------------------------------------------
# the loop


def finetune(
    model: nn.Module,
    train_loader: Iterable[Any],
    cfg: FinetuneConfig,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    teacher: nn.Module | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    metrics_log: str | os.PathLike[str] | None = None,
    eval_loader: Iterable[Any] | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> FinetuneResult:
    """Train ``model`` in place for ``cfg.epochs`` epochs on batches ``(inputs, targets)`` of ``train_loader``.

    ``teacher`` is required when ``cfg.distill``; it is moved to ``device``, put in eval mode and never
    updated. ``checkpoint_dir`` enables per-epoch checkpoints (``last.pt``) and, with ``resume``, picking
    up from one whose fingerprint matches (see the module docstring); a foreign or corrupt one raises
    :class:`~nas_headprune.errors.CheckpointError`. ``metrics_log`` is a JSON-lines file that gets a
    ``step`` event every ``cfg.log_every`` steps and an ``epoch`` event per epoch (with the
    :func:`~nas_headprune.evaluator.metrics.evaluate` result of ``eval_loader`` when given).
    ``on_epoch_end(epoch, record)`` is called on every rank after the epoch's checkpoint is written.
    """
    if cfg.distill and teacher is None:
        raise UsageError(
            "cfg.distill is true but no teacher was passed to finetune(); pass teacher=... or set distill=False"
        )
    if teacher is not None and not cfg.distill:
        logger.warning("a teacher was passed but cfg.distill is false; the teacher is not used")
    dev = resolve_device(device)
    distributed = is_distributed()
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1
    is_main = rank == 0

    base = model.module if isinstance(model, DistributedDataParallel) else model
    model.to(dev)
    was_training = base.training
    active_teacher = teacher if cfg.distill else None
    if active_teacher is not None:
        active_teacher.to(dev).eval()

    steps_per_epoch = _steps_per_epoch(train_loader, cfg.max_steps_per_epoch)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = min(total_steps, round(cfg.warmup_epochs * steps_per_epoch))
    min_ratio = cfg.min_lr / cfg.lr

    def schedule(step: int) -> float:
        return lr_factor(step, total_steps, warmup_steps, min_ratio)

    params = [p for p in base.parameters() if p.requires_grad]
    if not params:
        raise UsageError("the model has no trainable parameters (every parameter has requires_grad=False)")
    optimizer = torch.optim.AdamW(param_groups(base, cfg.weight_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    dtype = amp_dtype(dev) if cfg.amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    fingerprint = config_fingerprint(cfg, seed, base, steps_per_epoch)

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    start_epoch, step = 0, 0
    history: list[dict[str, Any]] = []
    resumed_from: int | None = None
    if ckpt_path is not None and resume and ckpt_path.exists():
        state = read_checkpoint(ckpt_path, fingerprint)
        try:
            base.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"fine-tune checkpoint {ckpt_path} does not fit this model or optimizer: {exc}"
            ) from exc
        rng_states = state["rng"]
        if len(rng_states) != world_size:
            logger.warning(
                "checkpoint %s was written by %d ranks, this run has %d; random states are reused round-robin",
                ckpt_path,
                len(rng_states),
                world_size,
            )
        try:
            if state["scaler"] and scaler.is_enabled():
                scaler.load_state_dict(state["scaler"])
            restore_rng_state(rng_states[rank % len(rng_states)])
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            raise CheckpointError(
                f"fine-tune checkpoint {ckpt_path} is damaged: its scaler or random states cannot be restored "
                f"({type(exc).__name__}: {exc}); delete it or pass resume=False to start over"
            ) from exc
        start_epoch, step, history = int(state["epoch"]), int(state["step"]), list(state["history"])
        resumed_from = start_epoch
        logger.info(
            "resuming from %s: %d of %d epochs done, step %d", ckpt_path, start_epoch, cfg.epochs, step
        )
    else:
        if ckpt_path is not None and ckpt_path.exists():
            logger.info("resume=False: %s will be overwritten at the end of the first epoch", ckpt_path)
        seed_everything(seed + rank)
    if ckpt_path is not None and is_main:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)

    train_model: nn.Module = model
    if distributed and not isinstance(model, DistributedDataParallel):
        device_ids = None
        if dev.type == "cuda":
            device_ids = [dev.index if dev.index is not None else torch.cuda.current_device()]
        train_model = DistributedDataParallel(model, device_ids=device_ids)

    log = JsonLines(metrics_log, enabled=is_main)
    setup = EpochSetup(
        train_model=train_model,
        teacher=active_teacher,
        loader=train_loader,
        cfg=cfg,
        seed=seed,
        steps_per_epoch=steps_per_epoch,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        params=params,
        dtype=dtype,
        dev=dev,
    )
    epochs_run = 0
    try:
        with _progress(progress and is_main) as bar:
            for epoch in range(start_epoch, cfg.epochs):
                record = train_epoch(setup, epoch=epoch, step=step, log=log, bar=bar)
                step = int(record["step"])
                if eval_loader is not None:
                    record["eval"] = evaluate(base, eval_loader, dev, amp=cfg.amp)
                history.append(record)
                log.write({"event": "epoch", **record})
                logger.info(
                    "epoch %d/%d: train loss %.4f%s",
                    epoch + 1,
                    cfg.epochs,
                    record["train_loss"],
                    f", eval top1 {record['eval']['top1']:.2f}%" if "eval" in record else "",
                )
                if ckpt_path is not None:
                    write_checkpoint(
                        ckpt_path,
                        is_main=is_main,
                        fingerprint=fingerprint,
                        epoch=epoch + 1,
                        step=step,
                        model=base,
                        optimizer=optimizer,
                        scheduler=scheduler,
                        scaler=scaler,
                        history=history,
                    )
                epochs_run += 1
                if on_epoch_end is not None:
                    on_epoch_end(epoch, record)
    finally:
        base.train(was_training)

    return FinetuneResult(
        epochs_run=epochs_run,
        steps=step,
        final_train_loss=float(history[-1]["train_loss"]) if history else None,
        history=history,
        resumed_from_epoch=resumed_from,
    )
