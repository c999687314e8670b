"""One rank of the distributed scoring test; launched by tests/test_distributed.py with torchrun.

Usage: ``python -m torch.distributed.run --nproc_per_node=2 tests/_ddp_score_worker.py OUT STRATEGY``.
Every rank builds the same tiny model and calibration batches, scores its share under torch.distributed
with the strategy and writes the scores to ``OUT/scores{rank}.safetensors``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))


def main(out: Path, strategy: str) -> None:
    from distributed_fixture import context
    from safetensors.torch import save_file

    from nas_headprune.evaluator.finetune import cleanup_distributed, init_distributed_from_env
    from nas_headprune.registry import make_strategy

    rank, world, _ = init_distributed_from_env()
    try:
        ctx = context(rank=rank, world_size=world)
        scores = make_strategy(strategy, {}).score(ctx)
        save_file({k: v.contiguous() for k, v in scores.items()}, str(out / f"scores{rank}.safetensors"))
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
