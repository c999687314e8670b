"""One rank of the data-parallel similarity_indicator tests; launched by
tests/test_distributed_similarity.py with torchrun.

Usage: ``python -m torch.distributed.run --nproc_per_node=2 tests/_ddp_similarity_worker.py OUT``.
Every rank builds the same models and calibration batches, then:

1. ``OUT/stats``: a search of 0 steps on a FLatten-Swin (linear attention in its first stage) with
   the attention-difference initialisation; its checkpoint holds the similarity weights and the
   initial indicators computed from each rank's share of the calibration batches.
2. ``OUT/one_to_two``: resumes the search whose single-process checkpoint the test put there and
   writes what it returned on each rank to ``OUT/one_to_two/rank{r}.json``.
3. ``OUT/two_to_one``: a search interrupted after step ``STOP`` on both ranks, so that rank 0's
   checkpoint of step ``STOP - STOP % 3`` is left for the test to resume in one process.
4. With more arguments: ``nas-headprune search ARGS...`` in the same process group (the CLI joins
   it and leaves it at the end), the uninterrupted run the test compares a resumed one with.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

#: the searches on the tiny ViT of distributed_fixture (no train loader: each rank cycles its own
#: calibration batches)
RESUME_CONFIG = {"steps": 10, "checkpoint_every": 3, "lr_indicator": 0.08, "lr_scales": 0.02}
STOP = 7
#: the 0-step search on the FLatten-Swin (min-max scaling: no rank ties between near-equal D)
STATS_CONFIG = {
    "steps": 0,
    "init": "attention_difference",
    "init_scale": "minmax",
    "init_query_tokens": 64,
}


def flatten_context(rank: int = 0, world_size: int = 1):
    """The embedded FLatten-Swin architecture (random weights) and 4 calibration batches of 2
    images, the same in every process."""
    from nas_headprune.evaluator.measure import measure_macs
    from nas_headprune.models.factory import create_model
    from nas_headprune.space import build_space
    from nas_headprune.strategy import SearchContext

    torch.manual_seed(0)
    model = create_model("flatten_swin_mnist").eval()
    size = (1, 28, 28)
    gen = torch.Generator().manual_seed(1)
    calib = [
        (torch.randn(2, *size, generator=gen), torch.randint(0, 10, (2,), generator=gen)) for _ in range(4)
    ]
    return SearchContext(
        model=model,
        space=build_space(model, size),
        budget=0.7,
        dense_macs=measure_macs(model, size),
        calib=calib,
        seed=0,
        rank=rank,
        world_size=world_size,
    )


def summary(result) -> dict:
    """What a search returned, as JSON: the selection, the info and digests of scales and weights."""
    import hashlib

    def digest(tensors) -> str | None:
        if tensors is None:
            return None
        h = hashlib.sha256()
        for name in sorted(tensors):
            h.update(name.encode())
            h.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    selection = result.selection
    return {
        "selection": selection.to_lists() if hasattr(selection, "to_lists") else selection,
        "info": result.info,
        "scales": digest(result.scales),
        "weights": digest(result.weights),
    }


class _Stop(Exception):
    pass


def main(out: Path, search_args: list[str]) -> int:
    from distributed_fixture import context

    from nas_headprune.cli import main as cli_main
    from nas_headprune.evaluator.finetune import cleanup_distributed, init_distributed_from_env
    from nas_headprune.registry import make_strategy
    from nas_headprune.strategies.similarity_indicator import SimilarityIndicator

    class StopAfter(SimilarityIndicator):
        def search(self, ctx):
            return super().search(replace(ctx, on_step=self._stop))

        @staticmethod
        def _stop(step, masks) -> None:
            if step >= STOP:
                raise _Stop(step)

    rank, world, _ = init_distributed_from_env()
    try:
        ctx = flatten_context(rank, world)
        ctx.work_dir = out / "stats"
        make_strategy("similarity_indicator", STATS_CONFIG).search(ctx)

        ctx = context(rank, world)
        ctx.work_dir = out / "one_to_two"
        result = make_strategy("similarity_indicator", RESUME_CONFIG).search(ctx)
        (out / "one_to_two" / f"rank{rank}.json").write_text(json.dumps(summary(result)))

        ctx = context(rank, world)
        ctx.work_dir = out / "two_to_one"
        try:
            StopAfter(RESUME_CONFIG).search(ctx)
        except _Stop:
            pass

        return cli_main(search_args) if search_args else 0
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
