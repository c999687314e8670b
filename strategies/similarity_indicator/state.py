"""Checkpoints and resume: the batch stream, the history, the saved state and its checks."""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nas_headprune.checkpoint import load_checkpoint
from nas_headprune.errors import (
    CheckpointError,
    StrategyError,
    UsageError,
)
from nas_headprune.space import (
    HeadSpace,
)
from nas_headprune.strategy import (
    SearchContext,
)

from .config import _SIMILARITY_SKIPPED, CHECKPOINT_NAME

log = logging.getLogger(__name__)


def _model_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _Batches:
    """The training batches: ``ctx.train_loader`` epoch after epoch, or ``ctx.calib`` cycled.

    The loader's generator (if it has one) is recorded when the search starts, set back to that state
    on resume, and handed back to the caller as it was found: the search leaves no trace in it. A
    sampler with ``set_epoch`` (``DistributedSampler``) gets each epoch's number, and its epoch is
    handed back too. Without a loader, rank ``r`` of ``W`` takes calibration batch ``i * W + r`` at
    its ``i``-th step, so the ranks train on different batches.
    """

    def __init__(self, ctx: SearchContext) -> None:
        self.loader = ctx.train_loader
        self.calib = ctx.calib
        self.rank, self.world = ctx.rank, ctx.world_size
        gen = getattr(self.loader, "generator", None)
        self.generator: torch.Generator | None = gen if isinstance(gen, torch.Generator) else None
        self.caller_state = self.generator.get_state() if self.generator is not None else None
        self.start_state = self.caller_state
        sampler = getattr(self.loader, "sampler", None)
        set_epoch = getattr(sampler, "set_epoch", None)
        self.set_epoch: Callable[[int], None] | None = set_epoch if callable(set_epoch) else None
        self.caller_epoch = getattr(sampler, "epoch", None)
        self.epoch = 0
        self.index = 0
        self._it: Iterator | None = None
        if self.loader is None and not self.calib:
            raise UsageError("similarity_indicator needs ctx.train_loader or calibration batches")

    def _per_epoch(self) -> int | None:
        try:
            return len(self.loader) if self.loader is not None else None  # type: ignore[arg-type]
        except TypeError:  # an iterable without a length
            return None

    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "start": self.start_state,
            "world_size": self.world,
            "per_epoch": self._per_epoch(),
        }

    def _iter(self) -> Iterator:
        if self.set_epoch is not None:
            self.set_epoch(self.epoch)
        return iter(self.loader)  # type: ignore[arg-type]

    def restore(self, state: Mapping[str, Any]) -> None:
        """Replay the batches consumed so far (re-read, not trained on) to reach the same position.

        A position saved by another number of processes is carried over by the samples all ranks
        had consumed: ``(epoch * per_epoch + index) * saved_world`` batches in all, shared by the
        ranks of this run."""
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world:
            self._convert(saved_world, state.get("per_epoch"))
        if self.loader is None:
            return
        if self.generator is not None and state.get("start") is not None:
            self.start_state = state["start"]
            self.generator.set_state(self.start_state)
        target, self.epoch = self.epoch, 0
        while self.epoch < target:
            for _ in self._iter():
                pass
            self.epoch += 1
        self._it = self._iter()
        for i in range(self.index):
            try:
                next(self._it)
            except StopIteration:  # shorter than the saved position (another world size): next epoch
                log.debug(
                    "the loader ran out after %d of %d batches; resuming at the next epoch", i, self.index
                )
                self.epoch, self.index = self.epoch + 1, 0
                self._it = self._iter()
                break

    def _convert(self, saved_world: int, saved_per_epoch: Any) -> None:
        per_epoch = self._per_epoch()
        if self.loader is None:
            self.index = self.index * saved_world // self.world
        elif isinstance(saved_per_epoch, int) and per_epoch:
            consumed = (self.epoch * saved_per_epoch + self.index) * saved_world // self.world
            self.epoch, self.index = divmod(consumed, per_epoch)
        log.info(
            "the search checkpoint was written by %d process(es), this run has %d: it continues after "
            "the same number of samples (epoch %d, batch %d), with other batches than an uninterrupted run",
            saved_world,
            self.world,
            self.epoch,
            self.index,
        )

    def next(self) -> Any:
        if self.loader is None:
            batch = self.calib[(self.index * self.world + self.rank) % len(self.calib)]
            self.index += 1
            return batch
        if self._it is None:
            self._it = self._iter()
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch += 1
            self.index = 0
            self._it = self._iter()
            try:
                batch = next(self._it)
            except StopIteration:
                raise UsageError("ctx.train_loader yields no batches") from None
        self.index += 1
        return batch

    def close(self) -> None:
        self._it = None
        if self.generator is not None and self.caller_state is not None:
            self.generator.set_state(self.caller_state)
        if self.set_epoch is not None and isinstance(self.caller_epoch, int):
            self.set_epoch(self.caller_epoch)


@dataclass
class _History:
    loss: list[float] = field(default_factory=list)
    task: list[float] = field(default_factory=list)
    ratio: list[float] = field(default_factory=list)
    first_within: int | None = None

    def state(self) -> dict[str, Any]:
        return {"loss": self.loss, "task": self.task, "ratio": self.ratio, "first_within": self.first_within}

    @classmethod
    def from_state(cls, s: Mapping[str, Any]) -> _History:
        return cls(list(s["loss"]), list(s["task"]), list(s["ratio"]), s["first_within"])

    def extend(self, first_step: int, loss: list[float], task: list[float], ratio: list[float]) -> None:
        self.loss += loss
        self.task += task
        self.ratio += ratio
        if self.first_within is None:
            self.first_within = next((first_step + i for i, r in enumerate(ratio) if r <= 1.0), None)

    def summary(self, window: int = 10) -> dict[str, Any]:
        if not self.loss:
            return {}

        def mean(xs: list[float]) -> float:
            return float(sum(xs) / len(xs))

        stride = max(1, math.ceil(len(self.ratio) / 20))
        return {
            "loss_first": mean(self.loss[:window]),
            "loss_last": mean(self.loss[-window:]),
            "loss_min": float(min(self.loss)),
            "task_loss_first": mean(self.task[:window]),
            "task_loss_last": mean(self.task[-window:]),
            "macs_ratio_to_target_trace": [round(r, 4) for r in self.ratio[::stride]],
        }


@dataclass
class _Pending:
    """The per-step values not yet read back to the host: 0-d tensors, read at the logging cadence
    and before every checkpoint (one sync for all of them)."""

    loss: list[Tensor] = field(default_factory=list)
    task: list[Tensor] = field(default_factory=list)
    ratio: list[Tensor] = field(default_factory=list)

    def add(self, loss: Tensor, task: Tensor, ratio: Tensor) -> None:
        self.loss.append(loss.detach())
        self.task.append(task.detach())
        self.ratio.append(ratio.detach())

    def take(self) -> Tensor:
        """``(3, n)`` float64: loss, task loss and MACs / target of the pending steps (exact: every
        value is a float32 widened), and forget them."""
        values = torch.stack([torch.stack(col).double() for col in (self.loss, self.task, self.ratio)])
        self.loss, self.task, self.ratio = [], [], []
        return values


def load_searched_weights(model: nn.Module, work_dir: str | Path) -> nn.Module:
    """A copy of ``model`` holding the weights a finished search trained (its final checkpoint in
    ``work_dir``); materialise this copy, not the dense model, to keep what the search learned."""
    path = Path(work_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no similarity_indicator checkpoint here")
    device = next(model.parameters()).device
    state = _read_state(path, device)
    if "model" not in state:
        raise CheckpointError(f"{path}: the search checkpoint holds no trained weights ('model' is missing)")
    trained = copy.deepcopy(model)
    try:
        trained.load_state_dict(state["model"])
    except (RuntimeError, TypeError, KeyError) as exc:
        raise CheckpointError(
            f"{path}: the trained weights do not fit the model ({type(exc).__name__}: {exc})"
        ) from exc
    return trained


def _check_state(state: Mapping[str, Any], space: HeadSpace, path: Path | None) -> None:
    """Raise :class:`CheckpointError` when an entry of a search checkpoint whose fingerprint matches
    has the wrong type, or an indicator / similarity tensor is missing or of the wrong shape."""
    problem = _state_problem(state, space)
    if problem is not None:
        raise CheckpointError(f"{path}: the search checkpoint is damaged: {problem}; delete it to start over")


def _state_problem(state: Mapping[str, Any], space: HeadSpace) -> str | None:
    kinds: dict[str, type] = {
        "step": int,
        "rng": Tensor,
        "indicators": dict,
        "gammas": dict,
        "similarity": dict,
        "model": dict,
        "optimizer": dict,
        "batches": dict,
        "history": dict,
        "init_layers": list,
        "init_skipped": list,
    }
    for key, kind in kinds.items():
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{key!r} has type {type(value).__name__}, expected {kind.__name__}"
    skipped = state.get(_SIMILARITY_SKIPPED)
    if skipped is not None and not isinstance(skipped, list):
        return f"{_SIMILARITY_SKIPPED!r} has type {type(skipped).__name__}, expected list"
    for entry in ("indicators", "similarity"):
        for label in space.dims:
            value = state[entry].get(label)
            if not isinstance(value, Tensor):
                return f"{entry} of {label!r} is missing"
            if tuple(value.shape) != space.shape(label):
                return f"{entry} of {label!r} has shape {tuple(value.shape)}, expected {space.shape(label)}"
    return None


def _same_state_on_every_rank(
    scores: Mapping[str, Tensor], scales: Mapping[str, Tensor] | None, weights: Mapping[str, Tensor] | None
) -> None:
    """Raise :class:`StrategyError` unless every rank ends with the same scores, scales and weights
    (a SHA-256 of their bytes, gathered from every rank)."""
    h = hashlib.sha256()
    for group in (scores, scales or {}, weights or {}):
        for name in sorted(group):
            h.update(name.encode())
            h.update(group[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, h.hexdigest())
    if len(set(digests)) > 1:
        raise StrategyError(
            "similarity_indicator: the ranks ended the search with different indicators, scales or "
            f"weights ({', '.join(f'rank {r}: {d[:12]}' for r, d in enumerate(digests))}); the "
            "data-parallel replicas drifted apart"
        )


def _read_state(path: Path, device: torch.device) -> dict[str, Any]:
    """The search checkpoint at ``path`` as a dict; a file torch cannot load, or that holds no
    dict, is a :class:`CheckpointError` saying how to start over."""
    state = load_checkpoint(
        path,
        device,
        unreadable="{path}: cannot read the search checkpoint ({error}); delete it to start over",
    )
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: not a similarity_indicator search checkpoint (it holds a {type(state).__name__}, "
            "not a dict); delete it to start over"
        )
    return state
