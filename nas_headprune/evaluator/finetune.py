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
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nas_headprune.atomic import atomic_path
from nas_headprune.config import FinetuneConfig
from nas_headprune.errors import CheckpointError, NonFiniteLossError, UsageError
from nas_headprune.evaluator.metrics import amp_dtype, evaluate, is_distributed, resolve_device, split_batch
from nas_headprune.runfolder import JsonLines

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

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = "nas-headprune/finetune-checkpoint"
CHECKPOINT_VERSION = 1
_CHECKPOINT_KEYS = frozenset(
    {
        "format",
        "format_version",
        "fingerprint",
        "epoch",
        "step",
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "rng",
        "history",
    }
)
# fields that change nothing about the trained weights and so stay out of the fingerprint
_UNFINGERPRINTED = frozenset({"log_every"})


@dataclass
class FinetuneResult:
    """What :func:`finetune` did; the model itself is trained in place."""

    epochs_run: int  # epochs trained by this call (not counting those loaded from a checkpoint)
    steps: int  # optimizer steps in total, including those before a resume
    final_train_loss: float | None  # mean training loss of the last epoch; None when no epoch ever ran
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch, resumed ones included
    resumed_from_epoch: int | None = None  # epochs already done in the checkpoint resumed from


# ----------------------------------------------------------------------------------------------------
# building blocks


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for 0-based optimizer step ``step``.

    Linear warm-up ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then a cosine
    from 1 at step ``warmup_steps`` to ``min_ratio`` at step ``total_steps - 1``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps - 1
    progress = min(1.0, (step - warmup_steps) / decay_steps) if decay_steps > 0 else 0.0
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: trainable matrices decay; 1-D parameters and ``model.no_weight_decay()`` names do not."""
    skip: set[str] = set()
    hook = getattr(model, "no_weight_decay", None)
    if callable(hook):
        skip = set(hook())
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def kl_to_teacher(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``KL(teacher_T || student_T)`` over logits ``(B, C)`` softened by ``temperature``, batch mean."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)  # (B, C)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)  # (B, C)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``(1 - alpha) * CE(student, targets) + alpha * T^2 * KL(teacher_T || student_T)``, logits (B, C)."""
    ce = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    kl = kl_to_teacher(student_logits, teacher_logits, temperature)
    return (1.0 - alpha) * ce + alpha * (temperature * temperature) * kl


def config_fingerprint(cfg: FinetuneConfig, seed: int, model: nn.Module, steps_per_epoch: int) -> str:
    """A short hash of everything a checkpoint must agree on to be resumed: config, seed, shapes, steps."""
    shapes = [[name, list(t.shape), str(t.dtype)] for name, t in model.state_dict().items()]
    record = {
        "format_version": CHECKPOINT_VERSION,
        "config": cfg.model_dump(exclude=set(_UNFINGERPRINTED)),
        "seed": seed,
        "steps_per_epoch": steps_per_epoch,
        "state": shapes,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# distributed helpers


def init_distributed_from_env() -> tuple[int, int, torch.device]:
    """Join the process group ``torchrun`` describes in the environment; return ``(rank, world_size, device)``.

    With ``WORLD_SIZE`` unset or 1 nothing is initialised and ``(0, 1, cuda-or-cpu)`` comes back.
    Otherwise the backend is NCCL on CUDA (each process on ``cuda:LOCAL_RANK``) and gloo on the CPU.
    """
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        world_size = int(raw)
    except ValueError as exc:
        raise UsageError(f"environment variable WORLD_SIZE={raw!r} is not an integer") from exc
    cuda = torch.cuda.is_available()
    if world_size <= 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise UsageError(f"WORLD_SIZE={world_size} but {name} is not set; launch with torchrun")
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    logger.info(
        "joined process group: rank %d of %d, backend %s", dist.get_rank(), dist.get_world_size(), backend
    )
    return dist.get_rank(), dist.get_world_size(), device


def cleanup_distributed() -> None:
    """Leave the process group if one was initialised; safe to call otherwise."""
    if is_distributed():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# random states and checkpoints


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _capture_rng_state() -> dict[str, Any]:
    """Every global random state as tensors and plain types (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, py_state, gauss_next = random.getstate()
    cuda: list[torch.Tensor] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = list(torch.cuda.get_rng_state_all())
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": list(py_state), "gauss_next": gauss_next},
    }


def _restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
        else:
            logger.warning(
                "checkpoint holds CUDA random states of %d devices, this machine has %d; CUDA states not restored",
                len(state["cuda"]),
                torch.cuda.device_count(),
            )
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))


def _read_checkpoint(path: Path, fingerprint: str) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a damaged file; all mean the same here
        raise CheckpointError(
            f"fine-tune checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {exc}); "
            "delete it or pass resume=False to start over"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a nas-headprune fine-tune checkpoint (format tag missing or wrong)"
        )
    missing = sorted(_CHECKPOINT_KEYS - state.keys())
    if missing:
        raise CheckpointError(f"fine-tune checkpoint {path} is incomplete: it lacks {', '.join(missing)}")
    # what each entry must be; a file that passes the format tag but not this was edited or damaged
    kinds: dict[str, tuple[type, ...]] = {
        "format_version": (int,),
        "fingerprint": (str,),
        "epoch": (int,),
        "step": (int,),
        "model": (dict,),
        "optimizer": (dict,),
        "scheduler": (dict,),
        "scaler": (dict,),
        "rng": (list,),
        "history": (list,),
    }
    for key, kind in kinds.items():
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(
                f"fine-tune checkpoint {path} is damaged: {key!r} has type {type(value).__name__}, "
                f"expected {' or '.join(k.__name__ for k in kind)}; delete it or pass resume=False to start over"
            )
    if not state["rng"] or not all(isinstance(r, dict) for r in state["rng"]):
        raise CheckpointError(
            f"fine-tune checkpoint {path} is damaged: 'rng' must be a non-empty list of random states; "
            "delete it or pass resume=False to start over"
        )
    if state["format_version"] != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"fine-tune checkpoint {path} has format version {state['format_version']}, "
            f"this version of nas-headprune reads {CHECKPOINT_VERSION}"
        )
    if state["fingerprint"] != fingerprint:
        raise CheckpointError(
            f"fine-tune checkpoint {path} has fingerprint {state['fingerprint']} but this run's is {fingerprint}: "
            "it was written with another config, seed, model or steps per epoch; delete it, use another "
            "checkpoint_dir or pass resume=False"
        )
    return state


def _gather_rng_states() -> list[dict[str, Any]]:
    local = _capture_rng_state()
    if not is_distributed():
        return [local]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, local)
    return states


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


def _set_epoch(loader: Any, epoch: int, seed: int) -> None:
    """Make the epoch's data order a function of ``(seed, epoch)`` alone."""
    sampler = getattr(loader, "sampler", None)
    set_epoch = getattr(sampler, "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)  # DistributedSampler and friends
    for generator in (getattr(loader, "generator", None), getattr(sampler, "generator", None)):
        if isinstance(generator, torch.Generator):
            generator.manual_seed(seed + epoch)


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
        state = _read_checkpoint(ckpt_path, fingerprint)
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
            _restore_rng_state(rng_states[rank % len(rng_states)])
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
        _seed_everything(seed + rank)
    if ckpt_path is not None and is_main:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)

    train_model: nn.Module = model
    if distributed and not isinstance(model, DistributedDataParallel):
        device_ids = None
        if dev.type == "cuda":
            device_ids = [dev.index if dev.index is not None else torch.cuda.current_device()]
        train_model = DistributedDataParallel(model, device_ids=device_ids)

    log = JsonLines(metrics_log, enabled=is_main)
    epochs_run = 0
    try:
        with _progress(progress and is_main) as bar:
            for epoch in range(start_epoch, cfg.epochs):
                record = _train_epoch(
                    train_model=train_model,
                    teacher=active_teacher,
                    loader=train_loader,
                    cfg=cfg,
                    seed=seed,
                    epoch=epoch,
                    step=step,
                    steps_per_epoch=steps_per_epoch,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    scaler=scaler,
                    params=params,
                    dtype=dtype,
                    dev=dev,
                    log=log,
                    bar=bar,
                )
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
                    _write_checkpoint(
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


def _train_epoch(
    *,
    train_model: nn.Module,
    teacher: nn.Module | None,
    loader: Iterable[Any],
    cfg: FinetuneConfig,
    seed: int,
    epoch: int,
    step: int,
    steps_per_epoch: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    params: list[nn.Parameter],
    dtype: torch.dtype | None,
    dev: torch.device,
    log: JsonLines,
    bar: Any,
) -> dict[str, Any]:
    """One epoch; returns its record ``{epoch, step, train_loss, lr, seconds}``."""
    _set_epoch(loader, epoch, seed)
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


def _write_checkpoint(
    path: Path,
    *,
    is_main: bool,
    fingerprint: str,
    epoch: int,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    history: list[dict[str, Any]],
) -> None:
    rng = _gather_rng_states()  # a collective: every rank takes part
    if is_main:
        state = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "fingerprint": fingerprint,
            "epoch": epoch,
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng,
            "history": history,
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        logger.debug("wrote checkpoint %s (epoch %d, step %d)", path, epoch, step)
    if is_distributed():
        dist.barrier()
