"""Joining and leaving the ``torch.distributed`` process group that ``torchrun`` describes."""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from nas_headprune.errors import UsageError
from nas_headprune.evaluator.metrics import is_distributed

__all__ = ["cleanup_distributed", "init_distributed_from_env"]

logger = logging.getLogger(__name__)


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
