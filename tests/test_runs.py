"""Trustworthy runs: fingerprinted stages, the run-folder lock, non-finite values, clean errors."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import _search_args

from nas_headprune.cli import main
from nas_headprune.runfolder import RunFolder, differing_keys, fingerprint, finite_json


def _err(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished tiny run, copied by the tests that change it."""
    root = tmp_path_factory.mktemp("finished")
    assert main(_search_args(root, "budget=0.6")) == 0
    return root / "run"


def _copy(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def _bytes(run: Path, *names: str) -> dict[str, bytes]:
    return {n: (run / n).read_bytes() for n in names}


# stage -> (override that changes only that stage, the dotted key the error names)
CHANGES = {
    "search": ("budget=0.7", "budget: 0.6 -> 0.7"),
    "reweight": ("reweight.mode=none", "reweight.mode: 'lstsq' -> 'none'"),
    "finetune": ("finetune={epochs: 1, max_steps_per_epoch: 2}", "finetune.max_steps_per_epoch: 3 -> 2"),
    "evaluate": ("throughput_batch=4", "throughput_batch: 8 -> 4"),
}
EARLIER = {
    "search": (),
    "reweight": ("search.json",),
    "finetune": ("search.json", "reweight.json", "reweighted/model.safetensors"),
    "evaluate": ("search.json", "reweight.json", "finetune.json", "model/model.safetensors"),
}


@pytest.mark.parametrize("stage", list(CHANGES))
def test_resume_with_another_config_is_refused_per_stage(finished, tmp_path, capsys, stage) -> None:
    run = _copy(finished, tmp_path)
    (run / "result.json").unlink()  # the case that used to mix two configs
    override, key = CHANGES[stage]
    assert main(_search_args(tmp_path, "budget=0.6", override)) == 2
    err = _err(capsys)
    assert f"stage {stage!r} was run with other settings" in err and key in err and "--restart" in err
    assert not (run / "result.json").exists()


@pytest.mark.parametrize("stage", list(CHANGES))
def test_restart_redoes_the_changed_stage_and_keeps_the_earlier_ones(finished, tmp_path, stage) -> None:
    run = _copy(finished, tmp_path)
    kept = _bytes(run, *EARLIER[stage])
    override, _ = CHANGES[stage]
    assert main([*_search_args(tmp_path, "budget=0.6", override), "--restart"]) == 0
    assert _bytes(run, *EARLIER[stage]) == kept
    result = json.loads((run / "result.json").read_text())
    stages = json.loads((run / "stages.json").read_text())["stages"]
    assert all(stages[s]["status"] == "done" for s in CHANGES)
    assert result["fingerprints"] == {s: stages[s]["fingerprint"] for s in CHANGES}
    if stage == "search":
        assert result["budget"] == 0.7 and result["pruned"]["macs_ratio"] <= 0.7
        assert result["pruned"]["macs_ratio"] > 0.6  # the new budget's architecture, not the old one
    if stage == "reweight":
        assert result["reweight"]["mode"] == "none"
    if stage == "finetune":
        assert result["finetune"]["steps"] == 2
    if stage == "evaluate":
        assert result["config"]["throughput_batch"] == 4


def test_throughput_rounds_are_an_evaluate_setting(finished, tmp_path, capsys) -> None:
    run = _copy(finished, tmp_path)
    (run / "result.json").unlink()
    assert main(_search_args(tmp_path, "budget=0.6", "throughput_rounds=3")) == 2
    err = _err(capsys)
    assert "stage 'evaluate' was run with other settings" in err and "throughput_rounds: 2 -> 3" in err


def test_removed_output_redoes_only_that_stage(finished, tmp_path) -> None:
    run = _copy(finished, tmp_path)
    kept = _bytes(run, "search.json", "reweight.json", "finetune.json", "model/model.safetensors")
    old = json.loads((run / "result.json").read_text())
    (run / "result.json").unlink()
    assert main(_search_args(tmp_path, "budget=0.6")) == 0
    assert _bytes(run, *kept) == kept
    new = json.loads((run / "result.json").read_text())
    assert new["architecture"] == old["architecture"]
    assert new["pruned"]["after_finetune"] == old["pruned"]["after_finetune"]


def test_folder_without_manifest_is_refused(finished, tmp_path, capsys) -> None:
    run = _copy(finished, tmp_path)
    (run / "stages.json").unlink()
    assert main(_search_args(tmp_path, "budget=0.6")) == 2
    assert "no stage manifest" in _err(capsys)
    assert main([*_search_args(tmp_path, "budget=0.6"), "--restart"]) == 0
    assert json.loads((run / "stages.json").read_text())["stages"]["evaluate"]["status"] == "done"


@pytest.mark.parametrize(
    "name, content, exit_code, message",
    [
        ("stages.json", b"{not json", 1, "stage manifest"),
        ("stages.json", b"[1, 2]", 1, "not a nas-headprune stage manifest"),
        ("search.json", b"\x00\xff garbage", 1, "search record"),
        ("search.json", b'{"selection": 3}', 1, "search.json is damaged or was edited"),
        ("reweight.json", b"", 1, "reweight record"),
        ("finetune.json", b"[]", 1, "finetune.json is damaged"),
        ("result.json", b"{", 1, "result record"),
    ],
)
def test_damaged_run_files_end_in_one_message(finished, tmp_path, capsys, name, content, exit_code, message):
    run = _copy(finished, tmp_path)
    if name not in ("stages.json", "result.json"):
        (run / "result.json").unlink()  # a finished run is answered from result.json alone
    (run / name).write_bytes(content)
    assert main(_search_args(tmp_path, "budget=0.6")) == exit_code
    err = _err(capsys)
    assert message in err and name in err


def test_edited_reweighted_model_is_detected(finished, tmp_path, capsys) -> None:
    run = _copy(finished, tmp_path)
    (run / "result.json").unlink()
    record = json.loads((run / "reweighted" / "pruned.json").read_text())
    label = sorted(record["architecture"])[0]
    record["architecture"][label] -= 1
    (run / "reweighted" / "pruned.json").write_text(json.dumps(record))
    (run / "stages.json").write_text(
        json.dumps(
            {
                **json.loads((run / "stages.json").read_text()),
                "stages": {
                    k: v
                    for k, v in json.loads((run / "stages.json").read_text())["stages"].items()
                    if k in ("search", "reweight")
                },
            }
        )
    )
    assert main(_search_args(tmp_path, "budget=0.6")) == 1
    assert "reweighted" in _err(capsys)


# ------------------------------------------------------------------------------------- lock

_HOLDER = """
import sys, time
from nas_headprune.runfolder import RunFolder
folder = RunFolder(sys.argv[1]).open()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_process_on_the_folder_is_refused_and_a_killed_one_leaves_no_lock(tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert main(_search_args(tmp_path, "budget=0.6")) == 2
        err = _err(capsys)
        assert "is in use by process" in err and str(holder.pid) in err
        assert not (run / "stages.json").exists()  # the refused run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunFolder(run):  # the kernel released the dead process's lock
        pass
    assert main(_search_args(tmp_path, "budget=0.6")) == 0


def test_lock_is_exclusive_within_a_process_too(tmp_path) -> None:
    from nas_headprune.errors import RunFolderError

    with RunFolder(tmp_path / "run"):
        with pytest.raises(RunFolderError, match="in use"):
            RunFolder(tmp_path / "run").open()
    with RunFolder(tmp_path / "run"):
        pass


# ------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize(
    "override, field",
    [
        ("finetune.lr=.inf", "finetune.lr"),
        ("finetune.lr=.nan", "finetune.lr"),
        ("budget=.nan", "budget"),
        ("reweight.ridge=-.inf", "reweight.ridge"),
        ("finetune.distill_temperature=.inf", "finetune.distill_temperature"),
        ("strategy_options.min_width=.nan", "strategy_options.min_width"),
    ],
)
def test_non_finite_values_are_refused(tmp_path, capsys, override, field) -> None:
    assert main(_search_args(tmp_path, override)) == 2
    assert field in _err(capsys)
    assert not (tmp_path / "run").exists()


def test_similarity_options_refuse_non_finite_values(tmp_path, capsys) -> None:
    args = _search_args(tmp_path, "strategy_options.lr=.inf", strategy="similarity_indicator")
    assert main(args) == 2
    assert "strategy_options.lr" in _err(capsys)


def test_finite_json_replaces_and_names_every_non_finite_value() -> None:
    clean, bad = finite_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf"), "e": 2}})
    assert clean == {"a": None, "b": [1.0, None], "c": {"d": None, "e": 2}}
    assert bad == ["a", "b[1]", "c.d"]
    json.dumps(clean, allow_nan=False)  # valid JSON


def test_fingerprint_and_differing_keys() -> None:
    a = {"x": 1, "y": {"z": [1, 2]}}
    assert fingerprint(a) == fingerprint({"y": {"z": [1, 2]}, "x": 1})
    assert fingerprint(a) != fingerprint({"x": 1, "y": {"z": [2, 1]}})
    assert differing_keys(a, {"x": 2, "y": {"z": [1, 2]}, "w": None}) == ["w: '<unset>' -> None", "x: 1 -> 2"]


# --------------------------------------------------------------------- user mistakes, exit codes


def test_existing_file_as_out_exits_2(tmp_path, capsys) -> None:
    (tmp_path / "run").write_text("not a folder")
    assert main(_search_args(tmp_path)) == 2
    assert "is an existing file" in _err(capsys)


def test_out_below_a_file_exits_2(tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    args = _search_args(tmp_path)
    args[args.index("--out") + 1] = str(tmp_path / "file" / "run")
    assert main(args) == 2
    assert "Not a directory" in _err(capsys)


def test_full_disk_exits_1_with_the_reason(tmp_path, capsys, monkeypatch) -> None:
    import nas_headprune.atomic as atomic

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "x"))

    monkeypatch.setattr(atomic, "_create_temp_file", full)
    assert main(_search_args(tmp_path)) == 1
    assert "No space left on device" in _err(capsys)


def test_binary_config_file_exits_2(tmp_path, capsys) -> None:
    bad = tmp_path / "model.yaml"
    bad.write_bytes(bytes(range(256)) * 4)
    assert main(["search", "--config", str(bad)]) == 2
    assert "not a text" in _err(capsys)


def test_huge_seed_exits_2(tmp_path, capsys) -> None:
    assert main(_search_args(tmp_path, f"seed={2**70}")) == 2
    assert "seed" in _err(capsys)


def test_model_that_does_not_fit_the_data_exits_2(tmp_path, capsys) -> None:
    assert main(_search_args(tmp_path, "model.kwargs.in_chans=3")) == 2
    err = _err(capsys)
    assert "cannot take the images" in err and "in_chans" in err
    assert main(_search_args(tmp_path, "model.kwargs.num_classes=5")) == 2
    assert "has 5 outputs but" in _err(capsys)


def test_evaluate_rejects_what_it_does_not_use(finished, capsys) -> None:
    assert main(["evaluate", str(finished), "--set", "foo=1"]) == 2
    assert "foo: unknown key" in _err(capsys)
    assert main(["evaluate", str(finished), "--set", "finetune.lr=1"]) == 2
    assert "finetune: unknown key" in _err(capsys)
    assert main(["evaluate", str(finished), "--set", "data.test_subset=.nan"]) == 2
    assert "data.test_subset" in _err(capsys)


def test_evaluate_names_a_folder_that_is_not_there(tmp_path, capsys) -> None:
    assert main(["evaluate", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'} is not a directory" in _err(capsys)
    (tmp_path / "empty").mkdir()  # a folder without a model: a damaged or wrong folder, a runtime error
    assert main(["evaluate", str(tmp_path / "empty")]) == 1
    assert "is not a saved pruned model: pruned.json is missing" in _err(capsys)


def test_config_error_does_not_import_torch(tmp_path) -> None:
    code = (
        "import sys\nfrom nas_headprune.cli import main\n"
        f"rc = main(['search', '--set', 'finetune.lr=.inf', '--out', {str(tmp_path / 'r')!r}])\n"
        "print(rc, 'torch' in sys.modules)"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.split() == ["2", "False"], proc.stderr
    assert time.perf_counter() - t0 >= 0  # the time itself is printed by benchmarks/bench_config_error.py


def test_quick_without_a_quick_section_exits_2(tmp_path, capsys) -> None:
    assert main(["search", "--quick", "--out", str(tmp_path / "run")]) == 2
    assert "has no 'quick' section" in _err(capsys)


def test_results_carry_validation_metrics_and_training_steps(finished, tmp_path) -> None:
    plain = json.loads((finished / "result.json").read_text())
    assert plain["pruned"]["val_top1"] is None and plain["dense"]["val"] is None
    assert plain["training_steps"] == {"search": 0, "finetune": 3, "total": 3}
    assert main(_search_args(tmp_path, "budget=0.6", "data.val_split=0.1")) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    for section in ("val_before_finetune", "val_after_finetune"):
        assert result["pruned"][section]["samples"] == 144  # 10% of digits' 1,437 training images
    assert result["pruned"]["val_top1"] == result["pruned"]["val_after_finetune"]["top1"]
    assert result["dense"]["val"]["samples"] == 144 and result["dense"]["val_top1"] is not None
    assert result["pruned"]["after_finetune"]["samples"] == plain["pruned"]["after_finetune"]["samples"]
    # the validation split changes the training data: another search, not a resumed one
    assert result["fingerprints"]["search"] != plain["fingerprints"]["search"]
