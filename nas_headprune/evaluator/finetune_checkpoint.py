"""The fine-tune's checkpoint: what ``last.pt`` holds, its fingerprint, the random states, its checks.

The file is written atomically at the end of every epoch by rank 0 and holds the model, optimizer,
scheduler and scaler states, the epoch and step counters, the history, the random states of torch,
CUDA, numpy and ``random`` of every rank, and a fingerprint of the config, seed, model shapes and
steps per epoch. It holds only tensors and plain types, so it loads with
``torch.load(weights_only=True)``; a file that does not load, lacks an entry, has an entry of the
wrong type or another fingerprint raises :class:`~nas_headprune.errors.CheckpointError`.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from nas_headprune.checkpoint import fingerprint as record_fingerprint
from nas_headprune.checkpoint import load_checkpoint, save_checkpoint
from nas_headprune.config import FinetuneConfig
from nas_headprune.errors import CheckpointError
from nas_headprune.evaluator.metrics import is_distributed

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "CHECKPOINT_VERSION",
    "capture_rng_state",
    "config_fingerprint",
    "gather_rng_states",
    "read_checkpoint",
    "restore_rng_state",
    "seed_everything",
    "write_checkpoint",
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
    return record_fingerprint(record)[:16]


# ----------------------------------------------------------------------------------------------------
# random states


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
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


def restore_rng_state(state: dict[str, Any]) -> None:
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


def gather_rng_states() -> list[dict[str, Any]]:
    local = capture_rng_state()
    if not is_distributed():
        return [local]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, local)
    return states


# ----------------------------------------------------------------------------------------------------
# the file


def read_checkpoint(path: Path, fingerprint: str) -> dict[str, Any]:
    state = load_checkpoint(
        path,
        "cpu",
        unreadable="fine-tune checkpoint {path} is corrupt or unreadable ({error}); "
        "delete it or pass resume=False to start over",
    )
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


def write_checkpoint(
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
    rng = gather_rng_states()  # a collective: every rank takes part
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
        save_checkpoint(state, path)
        logger.debug("wrote checkpoint %s (epoch %d, step %d)", path, epoch, step)
    if is_distributed():
        dist.barrier()
