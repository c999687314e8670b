"""The tiny search context shared by the distributed tests and their torchrun workers."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from nas_headprune.evaluator.measure import measure_macs
from nas_headprune.models.factory import create_model
from nas_headprune.space import build_space
from nas_headprune.strategy import SearchContext

SIZE = (1, 8, 8)


def context(rank: int = 0, world_size: int = 1) -> SearchContext:
    """A tiny ViT and four calibration batches, the same in every process."""
    torch.manual_seed(0)
    model = create_model(
        "vit_tiny_patch16_224",
        img_size=8,
        patch_size=2,
        in_chans=1,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2,
        num_classes=10,
    ).eval()
    gen = torch.Generator().manual_seed(1)
    calib = [
        (torch.randn(16, *SIZE, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(4)
    ]
    return SearchContext(
        model=model,
        space=build_space(model, SIZE),
        budget=0.5,
        dense_macs=measure_macs(model, SIZE),
        calib=calib,
        seed=0,
        rank=rank,
        world_size=world_size,
    )


def kill_torchrun(agent: subprocess.Popen) -> None:
    """SIGKILL a torchrun launch: the agent's process group and each worker's, since torchrun
    starts every worker in a session of its own (killing the agent alone leaves them running)."""
    workers = [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _parent(entry) == agent.pid
    ]
    os.killpg(agent.pid, signal.SIGKILL)
    for pid in workers:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)


def _parent(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
