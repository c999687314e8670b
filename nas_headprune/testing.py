"""Conformance kit for strategy plugins.

Run it from your plugin's own tests::

    from nas_headprune.testing import run_conformance

    def test_my_strategy_conforms():
        run_conformance(MyStrategy)              # or a registered name, or an instance

Each check raises ``AssertionError`` with a message saying what the strategy got wrong:

* the result is a valid, head-balanced selection of the space, within the MACs budget;
* the same seed gives the same selection;
* the input model is untouched (weights and module types);
* the strategy's ``Config`` round-trips through JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from nas_headprune.strategy import SearchContext, Strategy, validate_result


def tiny_context(seed: int = 0, budget: float = 0.6, model: str = "vit") -> SearchContext:
    """A fast context: a tiny randomly initialised timm ViT or Swin and random calibration data."""
    from nas_headprune.evaluator.measure import measure_macs
    from nas_headprune.models.factory import create_model
    from nas_headprune.space import build_space

    torch.manual_seed(1234)
    if model == "vit":
        net = create_model(
            "vit_tiny_patch16_224",
            img_size=16,
            patch_size=4,
            in_chans=1,
            embed_dim=32,
            depth=2,
            num_heads=4,
            mlp_ratio=2,
            num_classes=5,
        )
        size = (1, 16, 16)
    elif model == "swin":
        net = create_model(
            "swin_tiny_patch4_window7_224",
            img_size=28,
            patch_size=2,
            in_chans=1,
            embed_dim=16,
            depths=(1, 1),
            num_heads=(2, 4),
            window_size=7,
            num_classes=5,
        )
        size = (1, 28, 28)
    else:
        raise ValueError(f"model must be 'vit' or 'swin', got {model!r}")
    net.eval()
    space = build_space(net, size)
    gen = torch.Generator().manual_seed(99)
    calib = [
        (torch.randn(8, *size, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(2)
    ]
    return SearchContext(
        model=net, space=space, budget=budget, dense_macs=measure_macs(net, size), calib=calib, seed=seed
    )


def _instantiate(strategy: type[Strategy] | Strategy | str, config: Any) -> Callable[[], Strategy]:
    from nas_headprune.registry import make_strategy

    if isinstance(strategy, str):
        return lambda: make_strategy(strategy, config)
    if isinstance(strategy, Strategy):
        return lambda: type(strategy)(strategy.config)
    return lambda: strategy(config)


def check_valid_and_within_budget(make: Callable[[], Strategy], ctx: SearchContext) -> None:
    name = type(make()).__name__
    result = make().search(ctx)
    try:
        selection, cost = validate_result(name, ctx, result)
    except Exception as exc:
        raise AssertionError(str(exc)) from exc
    for label, idx in selection.items():
        if idx.dim() == 2:
            assert idx.shape[0] == ctx.space.dims[label].heads, f"{name}: {label} lost heads"
    assert float(cost.macs) <= ctx.target_macs, f"{name}: {float(cost.macs)} MACs over {ctx.target_macs}"


def check_seed_repeatable(make: Callable[[], Strategy], ctx: SearchContext) -> None:
    name = type(make()).__name__
    a = ctx.space.selection(dict(make().search(ctx).selection.items()))
    b = ctx.space.selection(dict(make().search(ctx).selection.items()))
    assert a == b, f"{name}: the same seed gave two different selections"


def check_input_untouched(make: Callable[[], Strategy], ctx: SearchContext) -> None:
    name = type(make()).__name__
    before = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
    types = [type(m) for m in ctx.model.modules()]
    training = ctx.model.training
    make().search(ctx)
    assert [type(m) for m in ctx.model.modules()] == types, f"{name} replaced modules of the input model"
    after = ctx.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"{name} modified the input model's {changed[:3]}"
    assert ctx.model.training == training, f"{name} changed the input model's train/eval mode"
    hooks = [m for m in ctx.model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooks, f"{name} left hooks on the input model"


def check_config_roundtrip(make: Callable[[], Strategy]) -> None:
    strategy = make()
    cfg = strategy.config
    again = type(cfg).model_validate_json(cfg.model_dump_json())
    assert again == cfg, f"{type(strategy).__name__}.Config does not round-trip through JSON"
    assert type(cfg).model_config.get("extra") == "forbid", (
        f"{type(strategy).__name__}.Config must forbid extra fields"
    )


def run_conformance(
    strategy: type[Strategy] | Strategy | str,
    config: Any = None,
    *,
    budgets: tuple[float, ...] = (0.5, 0.8),
    models: tuple[str, ...] = ("vit", "swin"),
    seed: int = 0,
) -> None:
    """Run every check; ``strategy`` is a class, an instance or a registered name."""
    make = _instantiate(strategy, config)
    check_config_roundtrip(make)
    for model in models:
        for budget in budgets:
            ctx = tiny_context(seed=seed, budget=budget, model=model)
            check_valid_and_within_budget(make, ctx)
        ctx = tiny_context(seed=seed, budget=budgets[0], model=model)
        check_seed_repeatable(make, ctx)
        check_input_untouched(make, ctx)
