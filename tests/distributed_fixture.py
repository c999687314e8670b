"""The tiny search context shared by the distributed tests and their torchrun workers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Rank:
    """How one forked rank ended: its exit status and what it wrote to stdout and stderr."""

    returncode: int
    stdout: str
    stderr: str


def forked_ranks(work: Callable[[], int | None], world_size: int = 2, timeout: float = 300) -> list[Rank]:
    """Run ``work()`` on ``world_size`` ranks forked from this process (:class:`ForkedRanks`) and wait
    for them; how each ended, in rank order."""
    return ForkedRanks(work, world_size).wait(timeout)


class ForkedRanks:
    """``work()`` in ``world_size`` processes forked from this one, each with the environment torchrun
    gives its workers (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``), so they join one gloo process group as torchrun's workers do.

    The children inherit the imported torch, timm and project, so a launch costs the work alone, not
    the seconds every fresh interpreter spends importing them; the launcher itself is tested with the
    real ``torchrun`` by ``test_distributed.test_killed_torchrun_search_resumes`` (its resuming launch). Each child runs on
    1 torch thread, with its stdout and stderr (Python's and the file descriptors) in files of its
    own; its exit status is what ``work()`` returns (a ``SystemExit``'s code; 1 and the traceback on
    stderr for an exception).
    """

    def __init__(self, work: Callable[[], int | None], world_size: int = 2) -> None:
        env = {
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }
        self.folder = Path(tempfile.mkdtemp(prefix="forked-ranks-"))
        sys.stdout.flush()
        sys.stderr.flush()
        self.pids: list[int] = []
        for rank in range(world_size):
            pid = os.fork()
            if pid == 0:  # the child: never returns into the test runner
                self._child(work, rank, env)
            self.pids.append(pid)
        self.codes: dict[int, int] = {}

    def _child(self, work: Callable[[], int | None], rank: int, env: dict[str, str]) -> None:
        code = 1
        try:
            out = open(self.folder / f"{rank}.out", "w")  # noqa: SIM115 - kept open until os._exit
            err = open(self.folder / f"{rank}.err", "w")  # noqa: SIM115
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout, sys.stderr = out, err
            os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
            torch.set_num_threads(1)
            try:
                result = work()
                code = 0 if result is None else int(result)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)

    def running(self) -> bool:
        """Whether any rank is still running (collects those that ended)."""
        for pid in self.pids:
            if pid not in self.codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    self.codes[pid] = os.waitstatus_to_exitcode(status)
        return len(self.codes) < len(self.pids)

    def kill(self) -> None:
        """SIGKILL every rank still running, and reap it."""
        for pid in self.pids:
            if pid not in self.codes:
                os.kill(pid, signal.SIGKILL)
                self.codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    def wait(self, timeout: float = 300) -> list[Rank]:
        """How each rank ended, in rank order; the ranks are killed if they outlive ``timeout``."""
        deadline = time.monotonic() + timeout
        try:
            while self.running():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"forked ranks still running after {timeout} s")
                time.sleep(0.02)
        finally:
            self.kill()
        ranks = [
            Rank(
                self.codes[pid],
                (self.folder / f"{r}.out").read_text(),
                (self.folder / f"{r}.err").read_text(),
            )
            for r, pid in enumerate(self.pids)
        ]
        shutil.rmtree(self.folder, ignore_errors=True)
        return ranks
