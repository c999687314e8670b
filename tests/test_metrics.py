from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nas_headprune.errors import UsageError
from nas_headprune.evaluator.metrics import count_params, evaluate, measure_throughput

# Five samples over 10 classes. Each row of logits ranks the classes by a fixed permutation with
# scores 9, 8, ..., 0; the label sits at the given rank (0 = the top prediction).
LABEL_RANKS = [0, 2, 7, 4, 5]


def _ranked_logits(num_classes: int, ranks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    rows, labels = [], []
    for rank in ranks:
        order = torch.randperm(num_classes, generator=generator)  # order[r] is the class at rank r
        row = torch.empty(num_classes)
        row[order] = torch.arange(num_classes - 1, -1, -1, dtype=torch.float32)
        rows.append(row)
        labels.append(int(order[rank]))
    return torch.stack(rows), torch.tensor(labels)


def _identity(num_classes: int) -> nn.Linear:
    layer = nn.Linear(num_classes, num_classes, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(num_classes))
    return layer


def test_evaluate_matches_hand_computed_accuracy_and_loss() -> None:
    logits, labels = _ranked_logits(10, LABEL_RANKS)
    model = _identity(10).train()
    loader = DataLoader(TensorDataset(logits, labels), batch_size=2)  # batches of 2, 2 and 1
    result = evaluate(model, loader)
    assert result["samples"] == 5
    assert result["top1"] == pytest.approx(100.0 * 1 / 5)  # only rank 0 is a top-1 hit
    assert result["top5"] == pytest.approx(100.0 * 3 / 5)  # ranks 0, 2 and 4 are in the top 5
    # every row holds the scores 0..9, so the loss of a label at rank r is logsumexp(0..9) - (9 - r)
    log_sum = math.log(sum(math.exp(k) for k in range(10)))
    expected_loss = sum(log_sum - (9 - r) for r in LABEL_RANKS) / len(LABEL_RANKS)
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert model.training  # the model is given back in train mode


def test_evaluate_without_top5_for_five_classes_and_max_batches() -> None:
    logits, labels = _ranked_logits(5, [0, 1, 0, 3])
    loader = DataLoader(TensorDataset(logits, labels), batch_size=2)
    result = evaluate(_identity(5).eval(), loader)
    assert "top5" not in result
    assert result["top1"] == pytest.approx(50.0)
    first_batch_only = evaluate(_identity(5), loader, max_batches=1)
    assert first_batch_only["samples"] == 2 and first_batch_only["top1"] == pytest.approx(50.0)
    with pytest.raises(UsageError, match="empty"):
        evaluate(_identity(5), DataLoader(TensorDataset(logits[:0], labels[:0]), batch_size=2))
    with pytest.raises(UsageError, match="dict"):
        evaluate(_identity(5), [{"image": logits, "label": labels}])


class _Recorder(nn.Module):
    """Records the storage of every input it is called with."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layer = nn.Linear(16, width)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.data_ptr())
        return self.layer(x.flatten(1))


def test_measure_throughput_times_every_model_on_one_input() -> None:
    models = {"dense": _Recorder(64).train(), "pruned": _Recorder(8).eval()}
    result = measure_throughput(models, (4, 4), batch_size=8, warmup=2, iters=5, threads=1)
    assert list(result) == ["dense", "pruned"]
    assert result["dense"]["speedup"] == 1.0
    for name, stats in result.items():
        assert set(stats) == {"images_per_s", "ms_per_batch", "speedup"}
        assert stats["ms_per_batch"] > 0
        assert stats["images_per_s"] == pytest.approx(8 / (stats["ms_per_batch"] / 1000))
        assert len(models[name].seen) == 2 + 5
    assert result["pruned"]["speedup"] == pytest.approx(
        result["dense"]["ms_per_batch"] / result["pruned"]["ms_per_batch"]
    )
    assert len(set(models["dense"].seen) | set(models["pruned"].seen)) == 1  # the same tensor for both
    assert models["dense"].training and not models["pruned"].training  # modes given back
    with pytest.raises(UsageError, match="iters"):
        measure_throughput(models, (4, 4), batch_size=8, iters=0)
    with pytest.raises(UsageError, match="empty"):
        measure_throughput({}, (4, 4), batch_size=8)


def test_count_params_counts_shared_parameters_once() -> None:
    shared = nn.Linear(3, 4)  # 12 weights + 4 biases
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2))  # + 8 + 2
    assert count_params(model) == 16 + 10
    model[3].weight.requires_grad_(False)
    assert count_params(model, trainable_only=True) == 16 + 2
