"""One fine-tune epoch: its data order, mixup, the optimizer steps and the watch for a non-finite loss."""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nas_headprune.config import FinetuneConfig
from nas_headprune.errors import NonFiniteLossError, UsageError
from nas_headprune.evaluator.losses import distillation_loss
from nas_headprune.evaluator.metrics import is_distributed, split_batch
from nas_headprune.jsonlog import JsonLines

__all__ = ["EpochSetup", "train_epoch"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochSetup:
    """What every epoch of one fine-tune trains with."""

    train_model: nn.Module  # the model the steps call (wrapped in DistributedDataParallel under DDP)
    teacher: nn.Module | None  # the frozen teacher when distilling
    loader: Iterable[Any]
    cfg: FinetuneConfig
    seed: int
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    params: list[nn.Parameter]  # the trainable parameters, for gradient clipping
    dtype: torch.dtype | None  # the autocast dtype; None: full precision
    dev: torch.device


class _NonFiniteWatch:
    """The first optimizer step of an epoch whose training loss is NaN or infinite.

    :meth:`update` runs every step without a host sync (a few scalar device ops, no ``.item()``);
    :meth:`raise_error` reads the result where the loop syncs anyway: at a log event and at the end
    of the epoch, before the epoch's checkpoint is written.
    """

    def __init__(self, dev: torch.device) -> None:
        self.step = torch.full((), -1, dtype=torch.int64, device=dev)
        self.value = torch.zeros((), dtype=torch.float64, device=dev)

    def update(self, loss: torch.Tensor, step: int) -> None:
        first = ~torch.isfinite(loss) & (self.step < 0)
        self.step = torch.where(first, step, self.step)
        self.value = torch.where(first, loss, self.value)

    def raise_error(self, epoch: int, cfg: FinetuneConfig) -> None:
        step = int(self.step)
        where = f"at step {step}" if step >= 0 else "on another rank"
        value = f"{float(self.value)} " if step >= 0 else "non-finite "
        raise NonFiniteLossError(
            f"training loss is {value}{where} (epoch {epoch + 1} of {cfg.epochs}); the run stops without "
            f"saving a checkpoint of this epoch. Lower the learning rate: finetune.lr (train.lr for "
            f"`nas-headprune train`) is {cfg.lr:g}; or check the model and data for NaN or inf values"
        )


def train_epoch(setup: EpochSetup, *, epoch: int, step: int, log: JsonLines, bar: Any) -> dict[str, Any]:
    """One epoch; returns its record ``{epoch, step, train_loss, lr, seconds}``."""
    train_model, teacher, loader, cfg = setup.train_model, setup.teacher, setup.loader, setup.cfg
    optimizer, scheduler, scaler = setup.optimizer, setup.scheduler, setup.scaler
    steps_per_epoch, params, dtype, dev = setup.steps_per_epoch, setup.params, setup.dtype, setup.dev
    _set_epoch(loader, epoch, setup.seed)
    train_model.train()
    task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch, loss="-")
    started = time.perf_counter()
    epoch_sum = torch.zeros((), dtype=torch.float64, device=dev)
    window_sum = torch.zeros((), dtype=torch.float64, device=dev)
    window_n = 0
    done = 0
    watch = _NonFiniteWatch(dev)
    lr = optimizer.param_groups[0]["lr"]
    mix = _mixup(cfg, train_model)
    for batch in itertools.islice(loader, steps_per_epoch):
        inputs, targets = split_batch(batch)
        inputs = inputs.to(dev, non_blocking=True)
        targets = targets.to(dev, non_blocking=True)
        smoothing = cfg.label_smoothing
        if mix is not None and inputs.shape[0] % 2 == 0:  # timm's Mixup pairs the batch with its reverse
            inputs, targets = mix(inputs, targets)  # targets: (B, C) mixed, smoothed probabilities
            smoothing = 0.0
        lr = optimizer.param_groups[0]["lr"]
        with torch.autocast(device_type=dev.type, dtype=dtype, enabled=dtype is not None):
            logits = train_model(inputs)  # (B, C)
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(inputs)  # (B, C)
        if teacher_logits is not None:
            loss = distillation_loss(
                logits.float(),
                teacher_logits.float(),
                targets,
                cfg.distill_alpha,
                cfg.distill_temperature,
                smoothing,
            )
        else:
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step += 1
        done += 1
        detached = loss.detach().double()
        watch.update(detached, step)
        epoch_sum += detached
        window_sum += detached
        window_n += 1
        if step % cfg.log_every == 0:
            mean = window_sum.item() / window_n
            # under DDP the ranks stop together at the end of the epoch, after the all-reduce below:
            # a rank that raised here alone would leave the others waiting in their next backward
            if not math.isfinite(mean) and not is_distributed():
                watch.raise_error(epoch, cfg)
            log.write({"event": "step", "epoch": epoch, "step": step, "loss": mean, "lr": lr})
            logger.debug("step %d: loss %.4f, lr %.3g", step, mean, lr)
            bar.update(task, loss=f"{mean:.4f}")
            window_sum.zero_()
            window_n = 0
        bar.advance(task)
    if done < steps_per_epoch:
        logger.warning(
            "the train loader gave %d batches in epoch %d, expected %d", done, epoch, steps_per_epoch
        )
    totals = torch.stack([epoch_sum, torch.tensor(float(done), dtype=torch.float64, device=dev)])
    if is_distributed():
        dist.all_reduce(totals)
    loss_sum, batches = totals.tolist()
    bar.remove_task(task)
    if not math.isfinite(loss_sum):  # any rank's NaN or inf makes the all-reduced sum non-finite
        watch.raise_error(epoch, cfg)
    return {
        "epoch": epoch,
        "step": step,
        "train_loss": loss_sum / batches if batches else float("nan"),
        "lr": lr,
        "seconds": time.perf_counter() - started,
    }


def _set_epoch(loader: Any, epoch: int, seed: int) -> None:
    """Make the epoch's data order a function of ``(seed, epoch)`` alone."""
    sampler = getattr(loader, "sampler", None)
    set_epoch = getattr(sampler, "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)  # DistributedSampler and friends
    for generator in (getattr(loader, "generator", None), getattr(sampler, "generator", None)):
        if isinstance(generator, torch.Generator):
            generator.manual_seed(seed + epoch)


def _mixup(cfg: FinetuneConfig, model: nn.Module) -> Any:
    """timm's Mixup/CutMix for this fine-tune, or None when both are off. It draws from numpy's global
    random state, which the checkpoints capture, so a resumed run mixes the same way."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    head = model.module if isinstance(model, DistributedDataParallel) else model
    num_classes = getattr(head, "num_classes", None)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise UsageError(
            "finetune.mixup / finetune.cutmix need a classifier that states its num_classes "
            f"(got {num_classes!r} on {type(head).__name__})"
        )
    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )
