from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from distributed_fixture import forked_ranks
from pydantic import ValidationError
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nas_headprune.atomic import atomic_path, atomic_write_json, atomic_write_text
from nas_headprune.errors import CheckpointError, NonFiniteLossError, UsageError
from nas_headprune.evaluator.finetune import (
    CHECKPOINT_NAME,
    FinetuneConfig,
    _capture_rng_state,
    _restore_rng_state,
    finetune,
    lr_factor,
    param_groups,
)

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


# ---------------------------------------------------------------------------------------------------
# tiny models and data, shared with the subprocess of the resume test


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    return images, torch.tensor(digits.target)


def _train_set(n: int = 1500) -> TensorDataset:
    images, labels = _digits()
    return TensorDataset(images[:n], labels[:n])


def _eval_set() -> TensorDataset:
    images, labels = _digits()
    return TensorDataset(images[1500:], labels[1500:])


def _vit(seed: int = 0, drop_rate: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=8,
        patch_size=2,
        in_chans=1,
        embed_dim=32,
        depth=1,
        num_heads=2,
        num_classes=10,
        drop_rate=drop_rate,
    )


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10))


def _loader(dataset: TensorDataset, batch_size: int = 64) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator())


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []


RESUME_CFG = {"epochs": 3, "lr": 2e-3, "warmup_epochs": 0.5, "max_steps_per_epoch": 6, "log_every": 2}


def _resume_run(checkpoint_dir: Path | None, kill_after_epoch: int | None = None) -> tuple[nn.Module, object]:
    """The run of the resume test; with ``kill_after_epoch`` the process SIGKILLs itself after that epoch."""

    def killer(epoch: int, record: dict) -> None:
        if epoch == kill_after_epoch:
            os.kill(os.getpid(), signal.SIGKILL)

    model = _vit(seed=3, drop_rate=0.2)  # dropout: the resumed run must continue the torch random stream
    result = finetune(
        model,
        _loader(_train_set(600), batch_size=32),
        FinetuneConfig(**RESUME_CFG),
        seed=11,
        checkpoint_dir=checkpoint_dir,
        progress=False,
        on_epoch_end=killer if kill_after_epoch is not None else None,
    )
    return model, result


def _killed_run_main(checkpoint_dir: str, threads: int, kill_after_epoch: int) -> None:
    """Entry point of the subprocess of the resume test."""
    torch.set_num_threads(threads)
    _resume_run(Path(checkpoint_dir), kill_after_epoch=kill_after_epoch)
    raise SystemExit("the run was not killed")


# ---------------------------------------------------------------------------------------------------
# training works


def test_loss_goes_down_on_digits(tmp_path: Path) -> None:
    model = _vit()
    log = tmp_path / "metrics.jsonl"
    cfg = FinetuneConfig(epochs=6, lr=1e-2, min_lr=1e-5, log_every=10)
    result = finetune(
        model,
        _loader(_train_set()),
        cfg,
        seed=0,
        eval_loader=DataLoader(_eval_set(), batch_size=256),
        metrics_log=log,
    )
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 6 and result.epochs_run == 6
    assert result.steps == 6 * 24  # 1500 samples in batches of 64
    assert result.resumed_from_epoch is None
    assert losses[-1] < losses[0] - 0.2
    assert result.final_train_loss == losses[-1]
    assert result.history[-1]["eval"]["top1"] > 30.0  # chance is 10%
    assert result.history[-1]["eval"]["samples"] == 297
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == list(range(6))
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(10, 6 * 24 + 1, 10))
    assert model.training  # given back in the mode it came in


def test_lr_factor_warms_up_then_decays_to_min() -> None:
    total, warmup, min_ratio = 50, 5, 0.01
    factors = [lr_factor(s, total, warmup, min_ratio) for s in range(total)]
    assert factors[:warmup] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors[warmup] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[warmup:], factors[warmup + 1 :], strict=False))
    assert factors[(warmup + total - 1) // 2] == pytest.approx((1 + min_ratio) / 2)  # cosine midpoint
    assert factors[-1] == pytest.approx(min_ratio, abs=1e-12)
    assert lr_factor(0, 10, 0, 0.1) == 1.0  # no warm-up: start at the peak


def test_lr_schedule_seen_by_the_optimizer(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    cfg = FinetuneConfig(
        epochs=2, lr=1e-2, min_lr=1e-4, warmup_epochs=0.5, max_steps_per_epoch=4, log_every=1
    )
    finetune(_mlp(), _loader(_train_set(512)), cfg, seed=0, metrics_log=log, progress=False)
    lrs = [e["lr"] for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "step"]
    assert len(lrs) == 8
    assert lrs[:2] == pytest.approx([5e-3, 1e-2])  # two warm-up steps rise to the peak
    assert lrs[2] == pytest.approx(1e-2)  # the cosine starts at the peak
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False))
    assert lrs[-1] == pytest.approx(1e-4)


def test_no_weight_decay_on_1d_params_and_timm_exclusions() -> None:
    model = _vit()
    groups = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed.isdisjoint(plain)
    assert decayed | plain == set(names.values())
    assert {"pos_embed", "cls_token", "blocks.0.attn.qkv.bias", "blocks.0.norm1.weight", "head.bias"} <= plain
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "head.weight"} <= decayed
    assert all(p.ndim >= 2 for g in groups if g["weight_decay"] > 0 for p in g["params"])


class _ZeroGradient(nn.Module):
    """A linear layer whose output is multiplied by 0: the loss is constant and every gradient is 0."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)) * 0.0


def test_weight_decay_shrinks_matrices_but_not_biases() -> None:
    torch.manual_seed(0)
    model = _ZeroGradient()
    before = _clone_state(model)
    cfg = FinetuneConfig(epochs=1, lr=0.1, weight_decay=0.5, warmup_epochs=0, max_steps_per_epoch=3)
    finetune(model, _loader(_train_set(256)), cfg, seed=0, progress=False)
    assert torch.equal(model.linear.bias, before["linear.bias"])
    ratio = model.linear.weight / before["linear.weight"]
    # AdamW with zero gradients only decays: w *= (1 - lr_t * wd) for each step's lr_t
    lrs = [0.1 * lr_factor(s, 3, 0, 1e-6 / 0.1) for s in range(3)]
    expected = float(np.prod([1 - lr * 0.5 for lr in lrs]))
    assert torch.allclose(ratio, torch.full_like(ratio, expected), rtol=1e-5)
    assert expected < 0.95


def test_distillation_changes_the_result_and_alpha_zero_does_not(tmp_path: Path) -> None:
    teacher = _mlp(seed=42)
    teacher_before = _clone_state(teacher)
    base = {"epochs": 1, "lr": 5e-3, "max_steps_per_epoch": 6}

    def run(cfg: FinetuneConfig, teach: nn.Module | None) -> dict[str, torch.Tensor]:
        student = _mlp(seed=1)
        finetune(student, _loader(_train_set(512)), cfg, seed=5, teacher=teach, progress=False)
        return _clone_state(student)

    plain = run(FinetuneConfig(**base), None)
    alpha_zero = run(FinetuneConfig(**base, distill=True, distill_alpha=0.0), teacher)
    distilled = run(FinetuneConfig(**base, distill=True, distill_alpha=0.7, distill_temperature=2.0), teacher)
    _assert_states_equal(plain, alpha_zero)  # alpha 0 is pure cross entropy, bit for bit
    assert not torch.equal(plain["4.weight"], distilled["4.weight"])
    _assert_states_equal(teacher_before, _clone_state(teacher))  # the teacher is frozen
    with pytest.raises(UsageError, match="teacher"):
        finetune(_mlp(), _loader(_train_set(64)), FinetuneConfig(distill=True), seed=0, progress=False)


def test_mixup_changes_training_deterministically_and_needs_num_classes(tmp_path: Path) -> None:
    base = dict(epochs=1, lr=1e-3, warmup_epochs=0, max_steps_per_epoch=4)

    def run(cfg: FinetuneConfig) -> dict[str, torch.Tensor]:
        model = _vit()
        finetune(model, _loader(_train_set(256)), cfg, seed=0, progress=False)
        return {k: v.clone() for k, v in model.state_dict().items()}

    plain = run(FinetuneConfig(**base))
    mixed = run(FinetuneConfig(**base, mixup=0.8, cutmix=1.0, label_smoothing=0.1))
    again = run(FinetuneConfig(**base, mixup=0.8, cutmix=1.0, label_smoothing=0.1))
    assert any(not torch.equal(plain[k], mixed[k]) for k in plain)
    assert all(torch.equal(mixed[k], again[k]) for k in mixed)  # seeded: the same mixing every run
    with pytest.raises(UsageError, match="num_classes"):
        finetune(_mlp(), _loader(_train_set(64)), FinetuneConfig(**base, mixup=0.8), seed=0, progress=False)


def test_config_rejects_unknown_and_inconsistent_fields() -> None:
    with pytest.raises(ValidationError, match="warmup_step"):
        FinetuneConfig(warmup_step=3)
    with pytest.raises(ValidationError, match="min_lr"):
        FinetuneConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValidationError, match="epochs"):
        FinetuneConfig(epochs=-1)


# ---------------------------------------------------------------------------------------------------
# checkpoints and resuming


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")  # here and in the forked child, so the three runs compute alike
def test_resume_after_sigkill_is_bit_identical(tmp_path: Path) -> None:
    reference_model, reference = _resume_run(None)

    checkpoint_dir = tmp_path / "ckpt"
    # a forked child runs the fine-tune until it SIGKILLs itself after the first epoch
    ended = forked_ranks(lambda: _killed_run_main(str(checkpoint_dir), 1, 0), world_size=1)[0]
    assert ended.returncode == -signal.SIGKILL, ended.stderr[-2000:]
    assert (checkpoint_dir / CHECKPOINT_NAME).is_file()
    assert [p.name for p in checkpoint_dir.iterdir()] == [CHECKPOINT_NAME]  # no temporary file left

    resumed_model, resumed = _resume_run(checkpoint_dir)
    assert resumed.resumed_from_epoch == 1
    assert resumed.epochs_run == 2
    assert resumed.steps == reference.steps == 18
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in reference.history]
    _assert_states_equal(_clone_state(reference_model), _clone_state(resumed_model))

    # a finished run resumes to a no-op that gives back the finished weights
    again_model, again = _resume_run(checkpoint_dir)
    assert again.epochs_run == 0 and again.resumed_from_epoch == 3 and again.steps == 18
    _assert_states_equal(_clone_state(reference_model), _clone_state(again_model))


def test_checkpoint_loads_with_weights_only_and_holds_the_optimizer_groups(tmp_path: Path) -> None:
    cfg = FinetuneConfig(epochs=1, weight_decay=0.1, max_steps_per_epoch=2)
    finetune(_mlp(), _loader(_train_set(256)), cfg, seed=0, checkpoint_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 2
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [0.1, 0.0]
    assert [len(g["params"]) for g in state["optimizer"]["param_groups"]] == [2, 2]  # 2 matrices, 2 biases
    assert len(state["rng"]) == 1 and set(state["rng"][0]) == {"torch", "cuda", "numpy", "python"}


def test_fingerprint_mismatch_raises_and_resume_false_starts_over(tmp_path: Path) -> None:
    cfg = FinetuneConfig(epochs=1, max_steps_per_epoch=2)
    finetune(_mlp(), _loader(_train_set(256)), cfg, seed=0, checkpoint_dir=tmp_path, progress=False)
    path = tmp_path / CHECKPOINT_NAME
    other = cfg.model_copy(update={"lr": 1e-3})
    with pytest.raises(CheckpointError, match="fingerprint") as info:
        finetune(_mlp(), _loader(_train_set(256)), other, seed=0, checkpoint_dir=tmp_path, progress=False)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="fingerprint"):  # another seed is another run too
        finetune(_mlp(), _loader(_train_set(256)), cfg, seed=1, checkpoint_dir=tmp_path, progress=False)
    # log_every does not change the weights, so it does not change the fingerprint
    same = cfg.model_copy(update={"log_every": 7})
    result = finetune(_mlp(), _loader(_train_set(256)), same, seed=0, checkpoint_dir=tmp_path, progress=False)
    assert result.resumed_from_epoch == 1 and result.epochs_run == 0
    result = finetune(
        _mlp(), _loader(_train_set(256)), other, seed=0, checkpoint_dir=tmp_path, resume=False, progress=False
    )
    assert result.resumed_from_epoch is None and result.epochs_run == 1


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated", "foreign", "not-a-dict"])
def test_corrupt_checkpoint_raises_naming_the_file(tmp_path: Path, damage: str) -> None:
    cfg = FinetuneConfig(epochs=1, max_steps_per_epoch=2)
    path = tmp_path / CHECKPOINT_NAME
    if damage == "garbage":
        path.write_bytes(b"this is not a checkpoint")
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "not-a-dict":
        torch.save([torch.zeros(3)], path)
    elif damage == "truncated":
        finetune(_mlp(), _loader(_train_set(256)), cfg, seed=0, checkpoint_dir=tmp_path, progress=False)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        torch.save({"model": _mlp().state_dict()}, path)
    with pytest.raises(CheckpointError) as info:
        finetune(_mlp(), _loader(_train_set(256)), cfg, seed=0, checkpoint_dir=tmp_path, progress=False)
    assert str(path) in str(info.value)


# a checkpoint with the right format tag and fingerprint whose entries were edited or damaged
DAMAGED_ENTRIES = {
    "epoch-not-an-int": ({"epoch": "one"}, "'epoch' has type str, expected int"),
    "step-missing-value": ({"step": None}, "'step' has type NoneType, expected int"),
    "history-not-a-list": ({"history": 5}, "'history' has type int, expected list"),
    "model-not-a-dict": ({"model": torch.zeros(3)}, "'model' has type Tensor, expected dict"),
    "model-wrong-shape": ({"model": {"1.weight": torch.zeros(3, 3)}}, "does not fit this model"),
    "rng-empty": ({"rng": []}, "'rng' must be a non-empty list"),
    "rng-damaged": ({"rng": [{"torch": "state"}]}, "random states cannot be restored"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGED_ENTRIES))
def test_damaged_checkpoint_entries_raise_naming_the_file(tmp_path: Path, kind: str) -> None:
    cfg = FinetuneConfig(epochs=2, max_steps_per_epoch=2)
    path = tmp_path / CHECKPOINT_NAME
    finetune(_mlp(), _loader(_train_set(256)), cfg, seed=0, checkpoint_dir=tmp_path, progress=False)
    changes, message = DAMAGED_ENTRIES[kind]
    state = torch.load(path, weights_only=True)
    state["epoch"] = 1  # one epoch left, so the run resumes
    state.update(changes)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))) as info:
        finetune(_mlp(), _loader(_train_set(256)), cfg, seed=0, checkpoint_dir=tmp_path, progress=False)
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------------
# a diverging run stops with NonFiniteLossError and saves nothing of the bad epoch


@pytest.mark.parametrize("log_every", [1, 50])
def test_diverging_loss_stops_the_run_without_a_checkpoint(tmp_path: Path, log_every: int) -> None:
    # lr=1e30: the first AdamW step moves every weight by about 1e30, the next logits overflow
    cfg = FinetuneConfig(epochs=1, lr=1e30, min_lr=0.0, max_steps_per_epoch=4, log_every=log_every)
    log = tmp_path / "metrics.jsonl"
    with pytest.raises(
        NonFiniteLossError, match=r"training loss is (nan|inf|-inf) at step 2 \(epoch 1 of 1\)"
    ) as info:
        finetune(
            _mlp(),
            _loader(_train_set(256)),
            cfg,
            seed=0,
            checkpoint_dir=tmp_path,
            metrics_log=log,
            progress=False,
        )
    assert "finetune.lr" in str(info.value) and "1e+30" in str(info.value)
    assert not (tmp_path / CHECKPOINT_NAME).exists()
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()] if log.exists() else []
    assert "epoch" not in events


def test_nan_in_a_later_epoch_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    cfg = FinetuneConfig(epochs=3, max_steps_per_epoch=2)
    model = _mlp()

    def poison(epoch: int, record: dict) -> None:
        if epoch == 0:
            with torch.no_grad():
                model[1].weight[0, 0] = float("nan")  # every later forward gives NaN logits

    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at step 3 \(epoch 2 of 3\)"):
        finetune(
            model,
            _loader(_train_set(256)),
            cfg,
            seed=0,
            checkpoint_dir=tmp_path,
            progress=False,
            on_epoch_end=poison,
        )
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 2  # the checkpoint of the last finite epoch
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_rng_states_survive_a_weights_only_round_trip(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    np.random.standard_normal()  # leaves a cached gaussian in the legacy state
    torch.manual_seed(3)
    path = tmp_path / "rng.pt"
    torch.save(_capture_rng_state(), path)

    def draw() -> tuple[float, float, float, float]:
        return (
            random.random(),
            float(np.random.rand()),
            float(np.random.standard_normal()),
            torch.rand(()).item(),
        )

    first = draw()
    _restore_rng_state(torch.load(path, weights_only=True))
    assert draw() == first


# ---------------------------------------------------------------------------------------------------
# atomic writes (the checkpoint path depends on them)


def test_atomic_writes_replace_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    atomic_write_json(target, {"b": 1, "a": [1, 2]})
    assert target.read_text() == '{\n  "b": 1,\n  "a": [\n    1,\n    2\n  ]\n}\n'
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half-written")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


# ---------------------------------------------------------------------------------------------------
# DistributedDataParallel


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_ddp_two_ranks_end_with_identical_weights(tmp_path: Path) -> None:
    def rank() -> None:
        import _ddp_worker  # in the rank alone: importing it sets torch's threads to 1

        _ddp_worker.main(tmp_path)

    for ended in forked_ranks(rank):  # torchrun's environment, two ranks forked from this process
        assert ended.returncode == 0, (ended.stdout + ended.stderr)[-4000:]

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert reports[0]["initial_hash"] != reports[1]["initial_hash"]  # each rank started from its own weights
    assert reports[0]["final_hash"] == reports[1]["final_hash"]
    assert reports[0]["steps"] == reports[1]["steps"] == 4
    assert reports[0]["final_train_loss"] == reports[1]["final_train_loss"]  # reduced across ranks
    assert reports[0]["eval"] == reports[1]["eval"]
    assert reports[0]["eval"]["samples"] == 200  # 100 per rank, summed

    # rank 0 alone wrote the checkpoint and the log
    state = torch.load(tmp_path / "ckpt" / CHECKPOINT_NAME, weights_only=True)
    digest = hashlib.sha256()
    for name, tensor in sorted(state["model"].items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    assert digest.hexdigest() == reports[0]["final_hash"]
    assert len(state["rng"]) == 2  # the random states of both ranks
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["step", "step", "epoch"]
