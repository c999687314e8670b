"""The similarity_indicator search on two ranks (2 processes, gloo on CPU): data-parallel training,
calibration statistics equal to the single-process ones, resume after a kill and across world sizes.

Every launch forks its two ranks from the test process with torchrun's environment
(``distributed_fixture.ForkedRanks``): the worker (statistics, resume from and to one process, and the
uninterrupted ``search`` command), then a ``search`` killed once its checkpoint exists and its rerun.
The real ``torchrun`` launcher is tested by ``test_distributed.test_killed_torchrun_search_resumes``.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import _ddp_similarity_worker
import pytest
import torch
from _ddp_similarity_worker import RESUME_CONFIG, STATS_CONFIG, STOP, flatten_context
from distributed_fixture import ForkedRanks, context, forked_ranks
from safetensors.torch import load_file
from test_distributed import _search

from nas_headprune.cli import main
from nas_headprune.registry import make_strategy
from nas_headprune.strategies.similarity_indicator import CHECKPOINT_NAME, SimilarityIndicator
from nas_headprune.strategy import validate_result

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("distributed_similarity"),  # its module fixtures are built once
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed"),
]

STEPS = 40
#: a search long enough that the kill lands inside it, with a checkpoint every 5 steps
OPTIONS = (f"strategy_options={{steps: {STEPS}, checkpoint_every: 5}}",)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Interrupt(Exception):
    pass


class _StopAfter(SimilarityIndicator):
    def search(self, ctx):
        return super().search(replace(ctx, on_step=self._stop))

    @staticmethod
    def _stop(step, masks) -> None:
        if step >= STOP:
            raise _Interrupt(step)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The worker's output folder; ``one_to_two`` starts from a single-process checkpoint."""
    out = tmp_path_factory.mktemp("ddp")
    ctx = context()
    ctx.work_dir = out / "one_to_two"
    with pytest.raises(_Interrupt):
        _StopAfter(RESUME_CONFIG).search(ctx)
    search = _search(out / "reference", "similarity_indicator", *OPTIONS)[2:]  # the CLI's arguments
    for rank in forked_ranks(lambda: _ddp_similarity_worker.main(out, search)):
        assert rank.returncode == 0, (rank.stdout + rank.stderr)[-4000:]
    return out


def _checkpoint(folder: Path) -> dict:
    return torch.load(folder / CHECKPOINT_NAME, weights_only=True)


def test_calibration_statistics_equal_the_single_process_ones(worker: Path, tmp_path: Path) -> None:
    ctx = flatten_context()
    ctx.work_dir = tmp_path
    result = make_strategy("similarity_indicator", STATS_CONFIG).search(ctx)
    assert result.info["init_layers"]  # the FLatten-Swin's linear-attention stage
    single, ddp = _checkpoint(tmp_path), _checkpoint(worker / "stats")
    # each rank read 2 of the 4 calibration batches; Gram matrices and attention differences summed
    for entry in ("similarity", "indicators"):
        assert ddp[entry].keys() == single[entry].keys()
        for label, expected in single[entry].items():
            torch.testing.assert_close(ddp[entry][label], expected, rtol=0, atol=1e-5, msg=label)
    assert any(not torch.equal(v, torch.ones_like(v)) for v in ddp["indicators"].values())
    assert ddp["init_layers"] == result.info["init_layers"]


def test_a_single_process_checkpoint_resumes_on_two_ranks(worker: Path) -> None:
    ranks = [json.loads((worker / "one_to_two" / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # selection, info, scales and weights: the same on both ranks
    info = ranks[0]["info"]
    assert info["resumed_from_step"] == STOP - STOP % 3 and info["resumed_from_world_size"] == 1
    assert info["world_size"] == 2 and info["steps"] == RESUME_CONFIG["steps"]
    assert ranks[0]["weights"] is not None and ranks[0]["scales"] is not None
    validate_result("similarity_indicator", context(), _as_result(ranks[0]))


def test_a_two_rank_checkpoint_resumes_in_one_process(worker: Path) -> None:
    saved = _checkpoint(worker / "two_to_one")
    assert saved["step"] == STOP - STOP % 3 and saved["batches"]["world_size"] == 2
    ctx = context()
    ctx.work_dir = worker / "two_to_one"
    result = make_strategy("similarity_indicator", RESUME_CONFIG).search(ctx)
    assert result.info["resumed_from_step"] == saved["step"]
    assert result.info["resumed_from_world_size"] == 2 and "world_size" not in result.info
    validate_result("similarity_indicator", ctx, result)


def test_killed_search_resumes_to_the_uninterrupted_selection(worker: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    checkpoint = out / "search_state" / CHECKPOINT_NAME
    search = _search(out, "similarity_indicator", *OPTIONS)[2:]  # the CLI's arguments
    first = ForkedRanks(lambda: main(search))
    try:
        deadline = time.monotonic() + 240
        while not checkpoint.exists():  # killed during the search
            assert first.running() and time.monotonic() < deadline, "the run ended before it was killed"
            time.sleep(0.02)
    finally:
        first.kill()
    assert not (out / "search.json").exists(), "the search finished before the kill"
    killed_at = _checkpoint(out / "search_state")["step"]

    # the whole command on two ranks: exit 0, rank 0 alone prints the summary and writes the run
    ranks = forked_ranks(lambda: main(search))
    assert [r.returncode for r in ranks] == [0, 0], (ranks[0].stderr + ranks[1].stderr)[-4000:]
    assert ranks[0].stdout.count('"strategy"') == 1 and '"strategy"' not in ranks[1].stdout
    result = json.loads((out / "result.json").read_text())
    assert result["device"] == "cpu" and result["pruned"]["macs_ratio"] <= 0.5

    resumed = json.loads((out / "search.json").read_text())
    reference = json.loads((worker / "reference" / "search.json").read_text())
    assert resumed["info"]["resumed_from_step"] == killed_at and 5 <= killed_at < STEPS
    assert reference["info"]["resumed_from_step"] is None and reference["info"]["world_size"] == 2
    # the resumed run replays the ranks' data shards and random state: it ends where the
    # uninterrupted one ends, bit for bit
    assert resumed["selection"] == reference["selection"]
    skip = {"resumed_from_step"}
    assert {k: v for k, v in resumed["info"].items() if k not in skip} == {
        k: v for k, v in reference["info"].items() if k not in skip
    }
    for name in ("search_scales", "search_weights"):
        a = load_file(str(out / f"{name}.safetensors"))
        b = load_file(str(worker / "reference" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def _as_result(summary: dict):
    from nas_headprune.strategy import SearchResult

    return SearchResult(summary["selection"], info=summary["info"])
