"""Data parallelism of the search under torchrun: the gradient and statistics reductions."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from nas_headprune.strategy import (
    SearchContext,
)

log = logging.getLogger(__name__)


# ====================================================================== data parallelism


class Reducer(Protocol):
    """Sums or maxes tensors across the processes of a data-parallel search, in place; every process
    calls it with tensors of the same shapes in the same order."""

    def sum_(self, tensors: Sequence[Tensor]) -> None: ...

    def max_(self, tensors: Sequence[Tensor]) -> None: ...


class _DataParallel:
    """The collectives of a search under ``torchrun``: one flattened buffer per dtype and call, on
    the backend's device (the GPU for NCCL, the CPU for gloo). In one process nothing happens."""

    def __init__(self, ctx: SearchContext, device: torch.device) -> None:
        self.rank, self.world = ctx.rank, ctx.world_size
        self.active = ctx.distributed
        nccl = self.active and dist.get_backend() == "nccl"
        self.device = device if nccl else torch.device("cpu")
        self._flags: dict[tuple[bool, ...], Tensor] = {}
        #: set (on the device, without a host sync) when the ranks' backwards reached different parameters
        self.mismatch: Tensor | None = None

    def _flat(self, tensors: Sequence[Tensor], collective: Callable[[Tensor], Any]) -> None:
        by_dtype: dict[torch.dtype, list[Tensor]] = defaultdict(list)
        for t in tensors:
            by_dtype[t.dtype].append(t)
        for dtype in sorted(by_dtype, key=str):  # the same order on every rank
            group = by_dtype[dtype]
            flat = torch.cat([t.detach().reshape(-1).to(self.device) for t in group])  # (sum numel,)
            collective(flat)
            with torch.no_grad():
                for t, part in zip(group, flat.split([t.numel() for t in group]), strict=True):
                    t.copy_(part.view(t.shape))

    def broadcast_(self, tensors: Sequence[Tensor]) -> None:
        """Every rank gets rank 0's values."""
        if self.active and tensors:
            self._flat(tensors, lambda flat: dist.broadcast(flat, src=0))

    def sum_(self, tensors: Sequence[Tensor]) -> None:
        if self.active and tensors:
            self._flat(tensors, lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM))

    def max_(self, tensors: Sequence[Tensor]) -> None:
        if self.active and tensors:
            self._flat(tensors, lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.MAX))

    def average_grads_(self, params: Sequence[Tensor]) -> None:
        """Replace every gradient by its mean over the ranks: one all-reduce for all of them, no host
        sync. A parameter without a gradient here adds zeros; if some rank had one for it (its
        backward took another path), ``mismatch`` is set and the search stops at its next sync."""
        if not self.active:
            return
        present = tuple(p.grad is not None for p in params)
        flags = self._flags.get(present)
        if flags is None:  # built once per pattern: no host-to-device copy per step
            flags = self._flags[present] = torch.tensor(present, dtype=torch.float32, device=self.device)
        counts = flags.clone()  # after the mean: 1 where every rank had a gradient, 0 where none had
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]

        def mean(flat: Tensor) -> None:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(self.world)

        self._flat([*grads, counts], mean)
        partial = ((counts > 0) & (counts < 1)).any()
        self.mismatch = partial if self.mismatch is None else self.mismatch | partial


def _share(ctx: SearchContext, items: list[Any], comm: _DataParallel) -> tuple[list[Any], Reducer | None]:
    """This rank's share of ``items`` and the reducer that adds the shares up; every rank takes all
    of them (and nothing is reduced) in one process, or when there are fewer items than ranks."""
    if not comm.active or len(items) < comm.world:
        return items, None
    return ctx.shard(items), comm
