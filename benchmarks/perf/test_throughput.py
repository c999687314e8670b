"""Forward throughput of pruned models against their dense model, next to the MACs ratio.

Two models: the embedded Fashion-MNIST ViT (small: softmax, norms and Python overhead are a large
share of its time) and a ViT-Ti/16 at 224x224 with random weights, where the projections and MLPs
dominate. Each is pruned to several fractions of its dense MACs by the ``magnitude`` strategy (channel
norms, shared global allocator) and materialised. The dense model and its pruned versions of one
(model, device, batch) run back to back, so the ratios in the summary compare neighbours in time.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from nas_headprune.evaluator.materialize import materialize
from nas_headprune.evaluator.measure import measure_macs
from nas_headprune.evaluator.metrics import count_params
from nas_headprune.models.dense import embedded_dir, load_dense
from nas_headprune.models.factory import create_model
from nas_headprune.registry import make_strategy
from nas_headprune.space import build_space
from nas_headprune.strategy import SearchContext, validate_result

MODELS = ("vit_fmnist", "vit_tiny_224")
DEVICES = ("cpu", "cuda")
BATCHES = (1, 64)
BUDGETS = (0.7, 0.5, 0.3)
STRATEGY = "magnitude"


@dataclass
class Subject:
    model: nn.Module
    input_size: tuple[int, ...]
    macs: int


class Zoo:
    """Dense models and their pruned versions, built once per module and kept on the CPU."""

    def __init__(self) -> None:
        self._dense: dict[str, Subject] = {}
        self._pruned: dict[tuple[str, float], Subject] = {}
        self.descriptions: dict[str, str] = {}

    def dense(self, key: str) -> Subject:
        if key not in self._dense:
            if key == "vit_fmnist":
                model, record = load_dense(embedded_dir("embedded"))
                size = tuple(record["input_size"])
                origin = f"trained weights ({record['test']['top1']:.2f}% top-1)"
            elif key == "vit_tiny_224":
                torch.manual_seed(0)
                model = create_model("vit_tiny_patch16_224").eval()  # pretrained=False: random weights
                size = (3, 224, 224)
                origin = "random weights"
            else:  # pragma: no cover - MODELS lists the keys
                raise KeyError(key)
            macs = measure_macs(model, size)
            self._dense[key] = Subject(model, size, macs)
            name = getattr(model, "nas_headprune_base", {}).get("name", type(model).__name__)
            self.descriptions[key] = (
                f"timm `{name}` shape (embed {model.embed_dim}, depth {len(model.blocks)}, "
                f"{model.blocks[0].attn.num_heads} heads), input {'x'.join(map(str, size))}, "
                f"{count_params(model) / 1e6:.2f}M parameters, {macs / 1e6:,.1f}M MACs per image, {origin}"
            )
        return self._dense[key]

    def pruned(self, key: str, budget: float) -> Subject:
        if (key, budget) not in self._pruned:
            dense = self.dense(key)
            space = build_space(dense.model, dense.input_size)
            ctx = SearchContext(
                model=dense.model, space=space, budget=budget, dense_macs=dense.macs, calib=[], seed=0
            )
            result = make_strategy(STRATEGY).search(ctx)
            selection, _ = validate_result(STRATEGY, ctx, result)
            model = materialize(dense.model, space, selection).eval()
            self._pruned[key, budget] = Subject(
                model, dense.input_size, measure_macs(model, dense.input_size)
            )
        return self._pruned[key, budget]


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return Zoo()


def _cases() -> list:
    cases = []
    for model in MODELS:
        for dev in DEVICES:
            for batch in BATCHES:
                for budget in (None, *BUDGETS):
                    tag = "dense" if budget is None else f"budget{budget}"
                    cases.append(pytest.param(model, dev, batch, budget, id=f"{model}-{dev}-b{batch}-{tag}"))
    return cases


@pytest.mark.parametrize(("model_key", "device", "batch", "budget"), _cases(), indirect=["device"])
def test_forward(device: torch.device, perf, zoo: Zoo, model_key: str, batch: int, budget: float | None):
    dense = zoo.dense(model_key)
    subject = dense if budget is None else zoo.pruned(model_key, budget)
    if budget is not None:  # the pruned model really is the size the table says
        assert subject.macs <= budget * dense.macs
    model = subject.model if device.type == "cpu" else copy.deepcopy(subject.model).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *subject.input_size), generator=gen).to(device)  # (B, C, H, W)

    with torch.inference_mode():
        perf(
            lambda: model(x),
            section="throughput",
            group=f"throughput {model_key} {device.type} batch {batch}",
            device=device,
            model=model_key,
            model_desc=zoo.descriptions[model_key],
            batch=batch,
            budget=budget,
            strategy=STRATEGY,
            macs=subject.macs,
            dense_macs=dense.macs,
        )
