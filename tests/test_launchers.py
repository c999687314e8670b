"""``ablate --launcher submitit``: the tiny ablation as a job array on submitit's local executor."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_ablate import TINY_SET, write_spec

from nas_headprune import launchers
from nas_headprune.ablation.trials import Trial
from nas_headprune.cli import main
from nas_headprune.store import load_rows

needs_submitit = pytest.mark.skipif(
    importlib.util.find_spec("submitit") is None, reason="the submitit extra is not installed"
)
# submitit's local executor: each array task is a process on this machine, one torch thread each
LOCAL = {"cluster": "local", "gpus_per_trial": 0, "cpus_per_trial": 1, "timeout_min": 10}


def _ablate(spec: Path, out: Path, *extra: str) -> list[str]:
    return ["ablate", str(spec), "--out", str(out), "--launcher", "submitit", "--no-progress", *extra]


@pytest.mark.slow
@needs_submitit
def test_job_array_runs_every_trial_and_a_resubmission_skips_finished_ones(tmp_path, capsys, monkeypatch):
    spec = write_spec(tmp_path / "t.yaml", strategies=["magnitude", "random"], seeds=[0])
    launcher = tmp_path / "local.yaml"
    launcher.write_text(yaml.safe_dump(LOCAL))
    out = tmp_path / "ab"
    args = _ablate(spec, out, "--launcher-config", str(launcher))

    # --no-wait submits one array task per trial and returns with the job ids and the report command
    assert main([*args, "--no-wait"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert (first["submitted"], first["already_finished"]) == (2, 0)
    assert sorted(first["jobs"]) == ["magnitude-b0.5-base-s0", "random-b0.5-base-s0"]
    assert first["report_command"] == f"nas-headprune report {out}"

    # the same command again waits for those jobs instead of submitting them twice; Ctrl-C while it
    # waits leaves them running and says so
    def interrupted(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(launchers, "wait_for", interrupted)
        assert main(args) == 130
    captured = capsys.readouterr()
    assert "the jobs keep running" in captured.err and f"nas-headprune report {out}" in captured.err
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert (second["submitted"], second["running_from_earlier_submission"]) == (0, 2)
    assert second["jobs"] == first["jobs"]
    assert (second["finished_now"], second["failed"]) == (2, 0)
    assert sorted(p.name for p in out.glob("results*.sqlite")) == [
        "results.shard-0-of-2.sqlite",
        "results.shard-1-of-2.sqlite",
    ]
    rows, _ = load_rows(out)
    assert [(r["trial_id"], r["status"], r["attempts"]) for r in rows] == [
        ("magnitude-b0.5-base-s0", "done", 1),
        ("random-b0.5-base-s0", "done", 1),
    ]
    assert all(r["top1_after"] is not None and 0 < r["macs_ratio"] <= 0.5 + 1e-9 for r in rows)
    assert rows[0]["top1_after"] > 10  # magnitude keeps a working model (chance is 10%)
    md = (out / "report" / "report.md").read_text()
    assert "| magnitude | 0.5 |" in md and "| random | 0.5 |" in md

    # re-submitting skips the finished trials: nothing is submitted, the stores are untouched
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("results*.sqlite")}
    assert main(args) == 0
    third = json.loads(capsys.readouterr().out)
    assert (third["already_finished"], third["submitted"], third["jobs"]) == (2, 0, {})
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("results*.sqlite")} == stamps
    assert main(["report", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["done"] == 2

    # a finished trial whose settings changed is refused before anything is submitted
    changed = write_spec(
        tmp_path / "changed.yaml", strategies=["magnitude", "random"], seeds=[0], set={**TINY_SET, "seed": 3}
    )
    record = (out / "launcher.json").read_text()
    assert main(_ablate(changed, out, "--launcher-config", str(launcher))) == 2
    assert "ablation file changed" in capsys.readouterr().err
    assert (out / "launcher.json").read_text() == record


@needs_submitit
@pytest.mark.parametrize(
    "where, launcher, field",
    [
        ("spec", {**LOCAL, "partiton": "gpu"}, "launcher.partiton"),
        ("spec", {**LOCAL, "timeout_min": 0}, "launcher.timeout_min"),
        ("file", {**LOCAL, "mem_gb": float("inf")}, "launcher.mem_gb"),
        ("file", {**LOCAL, "sbatch": {"time": "10"}}, "launcher.timeout_min"),
        ("file", {"launcher": {**LOCAL, "cpus_per_trial": "many"}}, "launcher.cpus_per_trial"),
        ("spec", {"partition": "gpu"}, "sbatch is not on this machine"),  # cluster: slurm
    ],
)
def test_a_bad_launcher_setting_is_refused_before_anything_is_submitted(
    tmp_path, capsys, where, launcher, field
):
    if "sbatch" in field and shutil.which("sbatch"):
        pytest.skip("this machine has sbatch")
    if where == "spec":
        spec = tmp_path / "t.yaml"
        data = yaml.safe_load(write_spec(spec).read_text())
        spec.write_text(yaml.safe_dump({**data, "launcher": launcher}))
        args = _ablate(spec, tmp_path / "ab")
    else:
        spec = write_spec(tmp_path / "t.yaml")
        (tmp_path / "l.yaml").write_text(yaml.safe_dump(launcher))
        args = _ablate(spec, tmp_path / "ab", "--launcher-config", str(tmp_path / "l.yaml"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err
    assert not (tmp_path / "ab").exists()


class _FakeJob:
    """A finished-after-``polls`` job: ``done()`` answers False that many times."""

    def __init__(self, job_id: str, polls: int, status: str = "done") -> None:
        self.job_id, self.polls, self.status = job_id, polls, status

    def done(self) -> bool:
        self.polls -= 1
        return self.polls < 0

    def result(self) -> dict[str, str]:
        return {"status": self.status, "error": "boom"}


def test_waiting_polls_soon_then_backs_off_to_the_interval(tmp_path, monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(launchers.time, "sleep", slept.append)
    jobs = []
    for i, (polls, status) in enumerate([(1, "done"), (6, "failed")]):
        trial = Trial(f"t{i}", "magnitude", 0.5, 0, "base", (), "default")
        job = _FakeJob(str(i), polls, status)
        jobs.append(launchers.TrackedJob(trial, job))
    sub = launchers.Submission(tmp_path, "local", tmp_path, total=2, skipped=0, jobs=jobs)
    outcome = launchers.wait_for(sub, progress=False, poll_s=2.0, first_poll_s=0.25)
    assert (outcome.done, outcome.failed) == (1, 1)
    assert outcome.failures == [("t1", "boom")]
    assert slept == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]  # one sleep per poll that left a job running


def test_missing_submitit_is_a_usage_error_that_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    spec = write_spec(tmp_path / "t.yaml")
    assert main(_ablate(spec, tmp_path / "ab")) == 2
    assert "pip install 'nas-headprune[submitit]'" in capsys.readouterr().err
    assert not (tmp_path / "ab").exists()


@needs_submitit
def test_local_launcher_options_are_refused_with_submitit_only_flags(tmp_path, capsys):
    spec = write_spec(tmp_path / "t.yaml")
    assert main(["ablate", str(spec), "--out", str(tmp_path / "ab"), "--no-wait"]) == 2
    assert "--launcher submitit" in capsys.readouterr().err
    assert main([*_ablate(spec, tmp_path / "ab"), "--shard", "0/2"]) == 2
    assert "--shard and --workers are for --launcher local" in capsys.readouterr().err
    assert not (tmp_path / "ab").exists()


def test_the_cli_and_the_launcher_module_do_not_import_submitit():
    code = (
        "import sys, json, nas_headprune.cli, nas_headprune.launchers\n"
        "print(json.dumps([m for m in sys.modules if m.split('.')[0] == 'submitit']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


@needs_submitit
def test_slurm_settings_reach_the_sbatch_script_and_live_jobs_are_not_resubmitted(
    tmp_path, capsys, monkeypatch
):
    import submitit

    # stand-ins for SLURM's commands: sbatch answers with the next job id, sacct with the state in FAKE/state
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "srun": "exit 0",
        "sbatch": 'n=$(cat "$FAKE/n" 2>/dev/null || echo 41); n=$((n + 1)); echo $n > "$FAKE/n"\n'
        'echo "Submitted batch job $n"',
        "sacct": 'echo "JobID|State|NodeList"; for i in 0 1; do echo "$(cat "$FAKE/n")_$i|$(cat "$FAKE/state")|"; done',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE", str(tmp_path))
    spec = write_spec(tmp_path / "t.yaml", strategies=["magnitude", "random"], seeds=[0])
    slurm = {
        "partition": "gpu",
        "cpus_per_trial": 8,
        "timeout_min": 30,
        "mem_gb": 32,
        "array_parallelism": 1,
        "sbatch": {"account": "proj", "exclusive": True},
        "setup": ["module load cuda"],
    }
    (tmp_path / "slurm.yaml").write_text(yaml.safe_dump({"launcher": slurm}))
    out = tmp_path / "ab"
    args = [*_ablate(spec, out, "--launcher-config", str(tmp_path / "slurm.yaml")), "--no-wait"]

    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["jobs"] == {"magnitude-b0.5-base-s0": "42_0", "random-b0.5-base-s0": "42_1"}
    script = (out / "submitit" / "42_submission.sh").read_text()
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --array=0-1%1",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --time=30",
        "#SBATCH --mem=32GB",
        "#SBATCH --account=proj",
        "#SBATCH --exclusive",
        "module load cuda",
    ):
        assert line in script.splitlines(), line
    rows, _ = load_rows(out)  # registered before submission: report lists tasks that never start
    assert [(r["trial_id"], r["status"]) for r in rows] == [
        ("magnitude-b0.5-base-s0", "pending"),
        ("random-b0.5-base-s0", "pending"),
    ]

    # queued or running jobs are not submitted again; ended ones (without a result) are
    for state, submitted, jobs in [
        ("RUNNING", 0, {"magnitude-b0.5-base-s0": "42_0", "random-b0.5-base-s0": "42_1"}),
        ("CANCELLED by 0", 2, {"magnitude-b0.5-base-s0": "43_0", "random-b0.5-base-s0": "43_1"}),
    ]:
        (tmp_path / "state").write_text(state)
        submitit.SlurmJob.watcher.clear()  # sacct's answers are cached per process
        assert main(args) == 0
        summary = json.loads(capsys.readouterr().out)
        assert (summary["submitted"], summary["running_from_earlier_submission"]) == (
            submitted,
            2 - submitted,
        )
        assert summary["jobs"] == jobs
