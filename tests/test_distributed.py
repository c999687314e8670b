"""`search` under torchrun (2 processes, gloo on CPU): one architecture on every rank, sums equal to
the single-process ones, resume after a kill.

The kill-and-resume test resumes with a real ``torchrun`` launch; every other launch forks its two
ranks from the test process with torchrun's environment (``distributed_fixture.ForkedRanks``), which
skips the interpreter start-up and imports every torchrun launch costs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_fixture import ForkedRanks, Rank, context, forked_ranks, free_port
from safetensors.torch import load_file
from test_cli import TINY

from nas_headprune.cli import main
from nas_headprune.registry import make_strategy

TESTS_DIR = Path(__file__).parent
REPO_ROOT = TESTS_DIR.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed"),
]


def _torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *args,
    ]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _search(out: Path, strategy: str, *extra: str) -> list[str]:
    args = ["-m", "nas_headprune.cli", "search", "--strategy", strategy, "--out", str(out), "--no-progress"]
    for item in [*TINY, *extra]:
        args += ["--set", item]
    return args


def _run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO_ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _forked_search(args: list[str]) -> list[Rank]:
    """``nas-headprune`` with ``args`` (after ``-m nas_headprune.cli``) on two forked ranks; both succeed."""
    ranks = forked_ranks(lambda: main(args[2:]))
    for rank in ranks:
        assert rank.returncode == 0, (rank.stdout + rank.stderr)[-4000:]
    return ranks


OPTIONS = {
    "magnitude": (),
    "random": (),
    "taylor": (),
    # 2 calibration batches: one for ranking and reweight, one held out (split over the 2 ranks)
    "evolution": ("strategy_options={trials: 4, population_size: 2, sample_size: 1}",),
    "nni_random": ("strategy_options.trials=4",),
}


def _same_selection_as_one_process(tmp_path: Path, ddp: Path, strategy: str) -> None:
    """The single-process run over the same calibration batches chooses the same channels."""
    assert main(_search(tmp_path / "single", strategy, *OPTIONS[strategy])[2:]) == 0
    single = json.loads((tmp_path / "single" / "search.json").read_text())
    assert json.loads((ddp / "search.json").read_text())["selection"] == single["selection"]


# taylor's run under torchrun is checked the same way by test_killed_torchrun_search_resumes
@pytest.mark.parametrize("strategy", [s for s in OPTIONS if s != "taylor"])
def test_search_command_under_torchrun_gives_one_architecture(tmp_path, strategy) -> None:
    if strategy in ("evolution", "nni_random"):
        pytest.importorskip("nni")
    ranks = _forked_search(_search(tmp_path / "ddp", strategy, *OPTIONS[strategy]))
    # rank 0 alone prints the summary
    assert ranks[0].stdout.count('"strategy"') == 1 and '"strategy"' not in ranks[1].stdout
    result = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert result["device"] == "cpu" and result["pruned"]["macs_ratio"] <= 0.5
    # every rank checked its selection against the others before materialising (the runner's guard)
    _same_selection_as_one_process(tmp_path, tmp_path / "ddp", strategy)


def test_taylor_scores_are_summed_over_ranks(tmp_path) -> None:
    def score() -> None:
        import _ddp_score_worker  # in the rank alone: importing it sets torch's threads to 1

        _ddp_score_worker.main(tmp_path, "taylor")

    for rank in forked_ranks(score):
        assert rank.returncode == 0, rank.stderr[-4000:]
    ranks = [load_file(str(tmp_path / f"scores{r}.safetensors")) for r in range(2)]
    single = make_strategy("taylor", {}).score(context())
    assert ranks[0].keys() == single.keys()
    for label, expected in single.items():
        torch.testing.assert_close(ranks[0][label], ranks[1][label], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][label].double(), expected.double(), rtol=1e-5, atol=1e-9)


_NOT_RANK_AWARE = '''
import torch
from nas_headprune.strategy import ScoringStrategy


class RankNoise(ScoringStrategy):
    """Scores from a generator seeded by the rank: each rank picks other channels."""

    def score(self, ctx):
        import torch.distributed as dist

        gen = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
        return {k: torch.rand(d.heads * d.max_width, generator=gen).reshape(
            (d.max_width,) if ctx.space.layer_of(k).kind == "mlp" else (d.heads, d.max_width))
            for k, d in ctx.space.dims.items()}
'''


def test_a_strategy_that_differs_across_ranks_is_named(tmp_path) -> None:
    (tmp_path / "rank_noise.py").write_text(_NOT_RANK_AWARE)

    def search() -> int:
        sys.path.insert(0, str(tmp_path))
        return main(_search(tmp_path / "run", "rank_noise:RankNoise")[2:])

    ranks = forked_ranks(search)
    for rank in ranks:
        assert rank.returncode != 0
        # each rank ends with the CLI's one-line message, not a traceback of ours
        assert (
            "error: strategy 'rank_noise:RankNoise' chose different channels on different ranks"
            in rank.stderr
        )
        assert "raise StrategyError" not in rank.stderr


def test_killed_torchrun_search_resumes(tmp_path) -> None:
    out = tmp_path / "run"
    long = ("finetune={epochs: 12, max_steps_per_epoch: 3}",)
    # killed on two forked ranks, resumed by a real torchrun launch
    first = ForkedRanks(lambda: main(_search(out, "taylor", *long)[2:]))
    try:
        deadline = time.monotonic() + 240
        while not (out / "finetune" / "last.pt").exists():  # killed mid fine-tune
            assert first.running() and time.monotonic() < deadline, "the run ended before it was killed"
            time.sleep(0.05)
    finally:
        first.kill()
    search_bytes = (out / "search.json").read_bytes()
    proc = _run(_torchrun(*_search(out, "taylor", *long)))
    assert (out / "search.json").read_bytes() == search_bytes
    # the whole command under torchrun: rank 0 alone prints the summary, one architecture on both ranks
    assert proc.stdout.count('"strategy"') == 1
    result = json.loads((out / "result.json").read_text())
    assert result["device"] == "cpu" and result["pruned"]["macs_ratio"] <= 0.5
    _same_selection_as_one_process(tmp_path, out, "taylor")
    assert result["finetune"]["resumed_from_epoch"] >= 1
    assert result["finetune"]["steps"] == 12 * 3
