"""``nas-headprune ablate`` / ``report``: spec validation, expansion, shards, the store, resume."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
import yaml
from distributed_fixture import ForkedRanks

from nas_headprune.ablate import AblationSpec, expand, load_spec, parse_shard, run_ablation, shard_trials
from nas_headprune.cli import main
from nas_headprune.config import preset_names
from nas_headprune.errors import ConfigError, UsageError
from nas_headprune.report import write_report
from nas_headprune.store import ResultsStore, StoreError, load_rows

# every trial: the embedded ViT on a few hundred images, no fine-tune, so a trial takes a second or two
TINY_SET = {
    "data.train_subset": 256,
    "data.test_subset": 128,
    "data.batch_size": 64,
    "data.calib_batches": 1,
    "data.calib_batch_size": 32,
    "finetune.epochs": 0,
    "throughput_batch": 2,
    "throughput_rounds": 2,
}


def tiny_spec(**fields) -> AblationSpec:
    data = {"name": "tiny", "strategies": ["magnitude"], "budgets": [0.5], "seeds": [0, 1], "set": TINY_SET}
    data.update(fields)
    return AblationSpec.model_validate(data)


def write_spec(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(tiny_spec(**fields).model_dump(mode="json", exclude={"quick"})))
    return path


# ------------------------------------------------------------------------------ spec and grid


def test_grid_expands_strategies_budgets_variants_grid_and_seeds():
    spec = tiny_spec(
        strategies=["magnitude", "random"],
        budgets=[0.4, 0.7],
        seeds=[0, 1, 2],
        variants=[{"name": "a", "set": {"reweight.mode": "none"}}, {"name": "b"}],
        grid={"data.calib_batches": [1, 2]},
        strategy_options={"magnitude": {"norm": "l2"}},
    )
    trials = expand(spec)
    assert len(trials) == 2 * 2 * 2 * 2 * 3
    assert len({t.trial_id for t in trials}) == len(trials)
    first = trials[0]
    assert first.trial_id == "magnitude-b0.4-a_data.calib_batches_1-s0"
    assert 'reweight.mode="none"' in first.overrides and "data.calib_batches=1" in first.overrides
    assert 'strategy_options.norm="l2"' in first.overrides
    assert not any("norm" in o for t in trials if t.strategy == "random" for o in t.overrides)
    # the last override wins in apply_override, so the axes come after the shared settings
    assert first.overrides[-4:] == ('strategy="magnitude"', "budget=0.4", "seed=0", "progress=false")


def test_shards_partition_the_trials():
    trials = expand(tiny_spec(strategies=["magnitude", "random", "taylor"], seeds=[0, 1, 2]))
    parts = [shard_trials(trials, (i, 4)) for i in range(4)]
    ids = [t.trial_id for part in parts for t in part]
    assert sorted(ids) == sorted(t.trial_id for t in trials)
    assert all(parts)


@pytest.mark.parametrize("text", ["4/4", "-1/2", "1", "a/b", "0/0"])
def test_bad_shard_is_a_usage_error(text):
    with pytest.raises(UsageError, match="--shard expects i/n"):
        parse_shard(text)


def test_spec_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstrategies: [magnitude]\nbudgts: [0.5]\n")
    with pytest.raises(ConfigError, match="budgts"):
        load_spec(str(bad))
    bad.write_text("name: x\nstrategies: [magnitude]\nbudgets: [1.5]\n")
    with pytest.raises(ConfigError, match="1.5"):
        load_spec(str(bad))
    bad.write_text("name: x\nstrategies: [magnitude]\nvariants: [{name: a}, {name: a}]\n")
    with pytest.raises(ConfigError, match="repeated: a"):
        load_spec(str(bad))
    with pytest.raises(ConfigError, match="no 'quick' section"):
        load_spec(str(write_spec(tmp_path / "noquick.yaml")), quick=True)
    with pytest.raises(ConfigError, match="presets: .*fmnist_baselines"):
        load_spec("no_such_preset")


def test_unknown_strategy_fails_before_any_trial_runs(tmp_path):
    spec = tiny_spec(strategies=["magnitude", "nope"])
    with pytest.raises(UsageError, match="nope") as err:
        run_ablation(spec, tmp_path / "ab", progress=False)
    assert "trial nope-b0.5-base-s0" in str(err.value)
    assert not (tmp_path / "ab" / "runs").exists()


@pytest.mark.parametrize(
    "where, key, value",
    [
        ("grid", "finetune.lrr", [1e-3]),
        ("grid", "reweight.mode", ["lstsq", "bogus"]),
        ("grid", "data.batch_size", [64, 0]),
        ("grid", "finetune.lr", [1e-3, float("nan")]),
    ],
)
def test_every_section_of_every_trial_is_validated_before_any_trial_runs(tmp_path, where, key, value):
    spec = tiny_spec(strategies=["magnitude", "random"], **{where: {key: value}})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        run_ablation(spec, tmp_path / "ab", progress=False)
    assert "trial " in str(err.value)
    assert not (tmp_path / "ab" / "runs").exists()


@pytest.mark.parametrize("preset", preset_names("ablations"))
def test_presets_validate_and_have_a_quick_version(preset):
    from nas_headprune.ablate import validate_trials

    full, quick = load_spec(preset), load_spec(preset, quick=True)
    assert len(expand(quick)) < len(expand(full))
    validate_trials(expand(full))
    validate_trials(expand(quick))


# ------------------------------------------------------------------------------------- store


def _sqlite(path: Path, *statements: str) -> None:
    con = sqlite3.connect(path)
    for statement in statements:
        con.execute(statement)
    con.commit()
    con.close()


def test_corrupt_and_foreign_stores_give_clear_errors(tmp_path, capsys):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "results.sqlite").write_bytes(b"this is not a database at all" * 40)
    with pytest.raises(StoreError, match="not a nas-headprune results store"):
        load_rows(corrupt)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    _sqlite(foreign / "results.sqlite", "CREATE TABLE users (name TEXT)")
    with pytest.raises(StoreError, match="not a nas-headprune results store.*users"):
        load_rows(foreign)

    other_app = tmp_path / "other"
    other_app.mkdir()
    _sqlite(
        other_app / "results.sqlite",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)",
        "CREATE TABLE trials (trial_id TEXT)",
        "INSERT INTO meta VALUES ('app', 'something-else')",
    )
    with pytest.raises(StoreError, match="another application.*something-else"):
        ResultsStore.open(other_app / "results.sqlite")

    # the CLI prints one line and exits 1, no traceback; an ablation into that folder refuses too
    assert main(["report", str(corrupt)]) == 1
    err = capsys.readouterr().err
    assert "not a nas-headprune results store" in err and "Traceback" not in err
    assert main(["ablate", str(write_spec(tmp_path / "t.yaml")), "--out", str(foreign), "--no-progress"]) == 1
    assert "users" in capsys.readouterr().err


def test_report_of_a_folder_without_store_is_a_usage_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no results store" in capsys.readouterr().err


# ------------------------------------------------------------------------- runs and resume


def test_failed_trial_is_recorded_reported_and_retried(tmp_path):
    spec = tiny_spec(
        seeds=[0],
        # a trial that validates but fails when it runs: its data folder does not exist
        variants=[{"name": "ok"}, {"name": "broken", "set": {"data.root": "/nonexistent/fashion"}}],
    )
    out = tmp_path / "ab"
    outcome = run_ablation(spec, out, progress=False)
    assert (outcome.done, outcome.failed) == (1, 1)
    rows, _ = load_rows(out)
    by_variant = {r["variant"]: r for r in rows}
    assert by_variant["ok"]["status"] == "done" and by_variant["ok"]["top1_after"] > 10
    assert (
        by_variant["broken"]["status"] == "failed" and "/nonexistent/fashion" in by_variant["broken"]["error"]
    )
    written = write_report(out)
    md = Path(written["files"][0]).read_text()
    assert "Trials that did not finish" in md and "/nonexistent/fashion" in md
    csv_lines = Path(written["files"][1]).read_text().splitlines()
    assert len(csv_lines) == 3 and any(",failed," in line for line in csv_lines)
    assert all(Path(f).stat().st_size > 0 for f in written["files"])

    again = run_ablation(spec, out, progress=False)
    assert (again.skipped, again.done, again.failed) == (1, 0, 1)
    rows, _ = load_rows(out)
    assert {r["variant"]: r["attempts"] for r in rows} == {"ok": 1, "broken": 2}


def test_changed_settings_of_a_finished_trial_are_refused(tmp_path):
    out = tmp_path / "ab"
    run_ablation(tiny_spec(seeds=[0]), out, progress=False)
    changed = tiny_spec(seeds=[0], set={**TINY_SET, "data.test_subset": 64})
    with pytest.raises(UsageError, match="ablation file changed"):
        run_ablation(changed, out, progress=False)


def test_shards_write_separate_stores_that_report_merges(tmp_path, capsys):
    spec_file = write_spec(tmp_path / "t.yaml", strategies=["magnitude", "random"], seeds=[0])
    out = tmp_path / "ab"
    for i in range(2):
        assert main(["ablate", str(spec_file), "--out", str(out), "--shard", f"{i}/2", "--no-progress"]) == 0
    assert sorted(p.name for p in out.glob("*.sqlite")) == [
        "results.shard-0-of-2.sqlite",
        "results.shard-1-of-2.sqlite",
    ]
    capsys.readouterr()
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["trials"], summary["done"]) == (2, 2)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| magnitude | 0.5 |" in md and "| random | 0.5 |" in md


@pytest.mark.slow
def test_parallel_workers_finish_every_trial(tmp_path):
    spec = tiny_spec(strategies=["magnitude", "random"], seeds=[0])
    outcome = run_ablation(spec, tmp_path / "ab", workers=2, progress=False)
    assert (outcome.done, outcome.failed) == (2, 0)
    rows, _ = load_rows(tmp_path / "ab")
    assert all((tmp_path / "ab" / "runs" / r["trial_id"] / "result.json").is_file() for r in rows)


@pytest.mark.slow
def test_killed_ablation_resumes_with_the_missing_trials_only(tmp_path, capsys):
    spec_file = write_spec(tmp_path / "t.yaml", strategies=["magnitude"], seeds=[0, 1, 2])
    out = tmp_path / "ab"
    args = ["ablate", str(spec_file), "--out", str(out), "--no-progress"]
    first = ForkedRanks(lambda: main(args), world_size=1)  # the command in a process forked from this one
    store = out / "results.sqlite"

    def done_rows() -> dict[str, tuple[float, int]]:
        if not store.is_file():
            return {}
        try:
            with sqlite3.connect(store) as con:
                q = "SELECT trial_id, finished, attempts FROM trials WHERE status = 'done'"
                return {r[0]: (r[1], r[2]) for r in con.execute(q)}
        except sqlite3.OperationalError:  # the table is not there yet
            return {}

    deadline = time.time() + 300
    while not done_rows() and first.running() and time.time() < deadline:
        time.sleep(0.05)
    first.kill()
    stderr = first.wait()[0].stderr
    before = done_rows()
    assert before, f"no trial finished before the kill: {stderr[-2000:]}"
    assert len(before) < 3, "every trial finished before the kill; the test did not interrupt anything"
    mtimes = {tid: (out / "runs" / tid / "result.json").stat().st_mtime_ns for tid in before}

    capsys.readouterr()
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["already_finished"] == len(before)
    assert summary["finished_now"] == 3 - len(before)
    after = done_rows()
    assert len(after) == 3
    for tid, (finished, attempts) in before.items():
        assert after[tid] == (finished, attempts)  # untouched: neither re-run nor re-recorded
        assert (out / "runs" / tid / "result.json").stat().st_mtime_ns == mtimes[tid]
    assert (out / "report" / "report.md").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["fmnist_baselines", "flatten_baselines", "components"])
def test_quick_presets_run_end_to_end(preset, tmp_path, capsys):
    out = tmp_path / preset
    assert main(["ablate", preset, "--quick", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["failed"] == 0 and summary["finished_now"] == len(expand(load_spec(preset, quick=True)))
    rows, _ = load_rows(out)
    assert all(r["status"] == "done" and 0 < r["macs_ratio"] <= r["budget"] + 1e-9 for r in rows)
    assert (out / "report" / "accuracy_vs_macs.png").stat().st_size > 1000
    if preset == "components":
        assert (out / "report" / "ablation.png").stat().st_size > 1000


def test_trials_dropped_from_the_file_leave_the_store_unless_finished(tmp_path):
    store = ResultsStore.open(tmp_path / "x.sqlite", create=True)
    store.register(expand(tiny_spec(seeds=[0, 1, 2])))
    store.record("magnitude-b0.5-base-s2", {"status": "done", "started": 0.0, "finished": 1.0})
    store.register(expand(tiny_spec(seeds=[0])), all_ids=["magnitude-b0.5-base-s0"])
    assert [r["trial_id"] for r in store.rows()] == ["magnitude-b0.5-base-s0", "magnitude-b0.5-base-s2"]
    store.close()


def test_a_variant_added_in_the_middle_is_reported_in_file_order(tmp_path):
    def spec(names: list[str]) -> AblationSpec:
        return tiny_spec(seeds=[0], variants=[{"name": n, "set": {"seed": 0}} for n in names])

    store = ResultsStore.open(tmp_path / "x.sqlite", create=True)
    store.register(expand(spec(["a", "c"])))
    for tid in ("magnitude-b0.5-a-s0", "magnitude-b0.5-c-s0"):
        store.record(tid, {"status": "done", "started": 0.0, "finished": 1.0})
    store.register(expand(spec(["a", "b", "c"])))
    assert [r["variant"] for r in store.rows()] == ["a", "b", "c"]
    store.close()


def test_equal_steps_gives_the_fine_tune_what_the_search_does_not_train() -> None:
    spec = tiny_spec(
        strategies=["magnitude", "similarity_indicator"],
        seeds=[0],
        equal_steps=30,
        strategy_options={"similarity_indicator": {"steps": 12}},
    )
    by_strategy = {t.strategy: t.overrides for t in expand(spec)}
    assert "finetune.max_steps_per_epoch=30" in by_strategy["magnitude"]
    assert "finetune.max_steps_per_epoch=18" in by_strategy["similarity_indicator"]  # 12 search steps train
    assert "finetune.epochs=1" in by_strategy["magnitude"]
    without_weights = tiny_spec(
        strategies=["similarity_indicator"],
        seeds=[0],
        equal_steps=30,
        strategy_options={"similarity_indicator": {"steps": 12, "train_weights": False}},
    )
    assert "finetune.max_steps_per_epoch=30" in expand(without_weights)[0].overrides
    too_few = tiny_spec(strategies=["similarity_indicator"], seeds=[0], equal_steps=5)
    with pytest.raises(ConfigError, match="equal_steps=5 is less than the 600 steps"):
        expand(too_few)


def test_equal_steps_split_into_equal_epochs_that_fit_one_epoch() -> None:
    spec = tiny_spec(strategies=["magnitude"], seeds=[0], equal_steps=700, epoch_steps=430)
    overrides = expand(spec)[0].overrides
    assert "finetune.epochs=2" in overrides and "finetune.max_steps_per_epoch=350" in overrides
    prime = tiny_spec(strategies=["magnitude"], seeds=[0], equal_steps=7, epoch_steps=3)
    overrides = expand(prime)[0].overrides  # 7 steps in epochs of at most 3: seven epochs of one
    assert "finetune.epochs=7" in overrides and "finetune.max_steps_per_epoch=1" in overrides


@pytest.mark.slow
def test_a_trial_that_trains_other_than_equal_steps_fails(tmp_path) -> None:
    # 256 training images in batches of 64: an epoch has 4 steps, so one epoch cannot give 10
    spec = tiny_spec(strategies=["magnitude"], seeds=[0], equal_steps=10)
    outcome = run_ablation(spec, tmp_path / "ab", progress=False)
    assert outcome.failed == 1 and outcome.done == 0
    assert "trained 4 steps, not equal_steps=10" in outcome.failures[0][1]
    fixed = tiny_spec(strategies=["magnitude"], seeds=[0], equal_steps=10, epoch_steps=4)
    outcome = run_ablation(fixed, tmp_path / "ab2", progress=False)  # five epochs of 2 steps
    assert outcome.done == 1 and outcome.failed == 0
    rows, _ = load_rows(tmp_path / "ab2")
    assert [r["steps_total"] for r in rows] == [10]


def test_summary_and_report_carry_validation_and_steps(tmp_path) -> None:
    spec = tiny_spec(
        seeds=[0],
        set={**TINY_SET, "data.val_split": 64, "finetune.epochs": 1, "finetune.max_steps_per_epoch": 2},
    )
    out = tmp_path / "ab"
    run_ablation(spec, out, progress=False)
    rows, _ = load_rows(out)
    assert rows[0]["steps_finetune"] == 2 and rows[0]["steps_total"] == 2 and rows[0]["steps_search"] == 0
    assert rows[0]["top1_val_after"] is not None and rows[0]["top1_val_dense"] is not None
    md = Path(write_report(out)["files"][0]).read_text()
    assert "validation top-1 after fine-tune" in md and "training steps" in md


def test_a_schema_1_store_gains_the_new_columns_and_keeps_its_rows(tmp_path) -> None:
    from nas_headprune.store import _TRIAL_COLUMNS, SCHEMA, SUMMARY_COLUMNS

    old_columns = [c for c in _TRIAL_COLUMNS if c.split()[0] not in SUMMARY_COLUMNS[-6:]]
    path = tmp_path / "results.sqlite"
    _sqlite(
        path,
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        f"CREATE TABLE trials ({', '.join(old_columns)})",
        "INSERT INTO meta VALUES ('app', 'nas-headprune-ablation'), ('schema', '1')",
        "INSERT INTO trials (trial_id, idx, strategy, budget, seed, variant, axes, base, overrides, status,"
        " top1_after) VALUES ('t0', 0, 'magnitude', 0.5, 0, 'base', '{}', 'default', '[]', 'done', 85.5)",
    )
    with ResultsStore.open(path) as store:
        cols = {r[1] for r in store.conn.execute("PRAGMA table_info(trials)")}
        assert set(SUMMARY_COLUMNS) <= cols
        assert [tuple(r) for r in store.conn.execute("SELECT top1_after, steps_total FROM trials")] == [
            (85.5, None)
        ]
        assert dict(store.conn.execute("SELECT key, value FROM meta").fetchall())["schema"] == str(SCHEMA)
