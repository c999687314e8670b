from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from nas_headprune import data as data_mod
from nas_headprune.cli import main

TINY = [
    "model.name=vit_tiny_patch16_224",
    "model.kwargs={img_size: 8, patch_size: 2, in_chans: 1, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2, num_classes: 10}",
    "data={name: digits, batch_size: 64, calib_batches: 2, calib_batch_size: 32}",
    "finetune={epochs: 1, max_steps_per_epoch: 3}",
    "throughput_batch=8",
    "throughput_rounds=2",
]


def _search_args(tmp_path, *extra: str, strategy: str = "magnitude") -> list[str]:
    args = ["search", "--strategy", strategy, "--out", str(tmp_path / "run"), "--no-progress"]
    for item in TINY + list(extra):
        args += ["--set", item]
    return args


def test_search_end_to_end_and_resume(tmp_path, capsys) -> None:
    assert main(_search_args(tmp_path, "budget=0.6")) == 0
    summary = json.loads(capsys.readouterr().out)
    run = tmp_path / "run"
    names = {p.name for p in run.iterdir()}
    assert {"config.resolved.yaml", "result.json", "model", "metrics.jsonl", "search.json"} <= names
    result = json.loads((run / "result.json").read_text())
    assert result["strategy"] == "magnitude"
    assert result["pruned"]["macs"] <= 0.6 * result["dense"]["macs"]
    assert result["pruned"]["macs"] == result["pruned"]["analytic_macs"]
    assert result["pruned"]["flops"] == 2 * result["pruned"]["macs"]
    for key in ("top1", "top5", "loss"):
        assert key in result["pruned"]["after_finetune"]
    assert set(result["throughput"]) == {"dense", "pruned"}
    assert {"torch", "timm", "nas_headprune"} <= set(result["versions"])
    assert summary["strategy"] == "magnitude"
    config = yaml.safe_load((run / "config.resolved.yaml").read_text())
    assert config["budget"] == 0.6 and config["strategy_options"]["norm"] == "l1"
    events = [json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "done"
    # the same command again finds the finished run and changes nothing
    before = (run / "result.json").read_bytes()
    assert main(_search_args(tmp_path, "budget=0.6")) == 0
    assert (run / "result.json").read_bytes() == before
    # evaluate the saved model
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["top1"] == pytest.approx(result["pruned"]["after_finetune"]["top1"])
    assert report["macs"] == result["pruned"]["macs"]


def _error(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


def test_unknown_strategy_exits_2(tmp_path, capsys) -> None:
    assert main(_search_args(tmp_path, strategy="magnitud")) == 2
    err = _error(capsys)
    assert "unknown name 'magnitud'" in err and "magnitude" in err and "random" in err


def test_unknown_key_exits_2(tmp_path, capsys) -> None:
    assert main(_search_args(tmp_path, "budgett=0.3")) == 2
    err = _error(capsys)
    assert "budgett: unknown key" in err and "budget" in err
    assert main(_search_args(tmp_path, "finetune.epoch=2")) == 2
    assert "finetune.epoch: unknown key" in _error(capsys)
    assert main(_search_args(tmp_path, "strategy_options.nrom=l2")) == 2
    assert "strategy_options.nrom: unknown key" in _error(capsys)


@pytest.mark.parametrize("budget", ["0", "1.5", "-0.2"])
def test_budget_outside_range_exits_2(tmp_path, capsys, budget: str) -> None:
    assert main(_search_args(tmp_path, f"budget={budget}")) == 2
    err = _error(capsys)
    assert "budget:" in err and budget in err


def test_missing_data_exits_2(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(data_mod, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.delenv("NAS_HEADPRUNE_DATA", raising=False)
    args = _search_args(tmp_path, "data={name: fashion_mnist, download: false}")
    assert main(args) == 2
    err = _error(capsys)
    assert "dataset-fashion-mnist" in err and "NAS_HEADPRUNE_DATA" in err


def test_bad_config_file_exits_2(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("budget: [unclosed")
    assert main(["search", "--config", str(bad)]) == 2
    assert "not valid YAML" in _error(capsys)
    assert main(["search", "--config", "no_such_preset"]) == 2
    assert "neither a config file nor a preset" in _error(capsys)
    assert main(["search", "--config", "train_vit_fmnist"]) == 2
    assert "is a training config" in (err := _error(capsys)) and "nas-headprune train --config" in err
    assert main(["train", "--config", "default", "--out", str(tmp_path / "t")]) == 2
    assert "is a search config" in (err := _error(capsys)) and "nas-headprune search --config" in err
    assert not (tmp_path / "t").exists()
    assert main(["ablate", "no_such_preset"]) == 2
    err = _error(capsys)
    assert "neither an ablation file nor a preset" in err and "fmnist_baselines" in err


def test_strategies_and_config_commands(capsys) -> None:
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    for name in ("magnitude", "random", "taylor"):
        assert any(line.startswith(name + " ") for line in out.splitlines())
    assert "nas-headprune" in out
    assert main(["config", "--strategy", "magnitude"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg == {
        "allocation": "global",
        "width_step": None,
        "min_width": 1,
        "tie_qk_v": True,
        "norm": "l1",
    }
    assert main(["config", "--strategy", "magnitude", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False


def test_console_script_usage_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nas_headprune.cli", "search", "--set", "nokey"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "--set expects dotted.key=value, got 'nokey'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("verbose", "debug"), [(0, False), (1, False), (2, True)])
def test_project_messages_show_at_info_and_debug_with_vv(verbose: int, debug: bool) -> None:
    import logging

    from nas_headprune.cli import _setup_logging

    logger = logging.getLogger("nas_headprune.runner")
    before = logging.getLogger("nas_headprune").level
    try:
        _setup_logging(verbose)
        assert logger.isEnabledFor(logging.INFO)
        assert logger.isEnabledFor(logging.DEBUG) is debug
    finally:
        logging.getLogger("nas_headprune").setLevel(before)
