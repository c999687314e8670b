"""The trials of an ablation: the expansion of a spec into :class:`Trial` s (with ``equal_steps``
applied), the shards of an array job, and the check of every trial's config before anything runs."""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from nas_headprune.ablation.spec import AblationSpec, Variant
from nas_headprune.errors import ConfigError, UsageError

BASE_VARIANT = "base"


@dataclass(frozen=True)
class Trial:
    """One search run of an ablation: its axes and the overrides that make its config."""

    trial_id: str
    strategy: str
    budget: float
    seed: int
    variant: str
    overrides: tuple[str, ...]
    base: str
    index: int = 0
    axes: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overrides"] = list(self.overrides)
        return d


def _fmt_value(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return "".join(c if c.isalnum() or c in "._+-" else "_" for c in text)


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"


def expand(spec: AblationSpec) -> list[Trial]:
    """All trials in a stable order: strategy, budget, variant, then seed (innermost)."""
    grid_keys = list(spec.grid)
    grid_combos = list(itertools.product(*(spec.grid[k] for k in grid_keys))) if grid_keys else [()]
    variants = spec.variants or [Variant(name=BASE_VARIANT)]
    trials: list[Trial] = []
    for strategy in spec.strategies:
        for budget in spec.budgets:
            for variant in variants:
                for combo in grid_combos:
                    grid_part = dict(zip(grid_keys, combo, strict=True))
                    name_parts = [] if variant.name == BASE_VARIANT and grid_part else [variant.name]
                    name_parts += [f"{k}={_fmt_value(v)}" for k, v in grid_part.items()]
                    vname = ",".join(name_parts)
                    for seed in spec.seeds:
                        overrides = [_override(k, v) for k, v in spec.set.items()]
                        overrides += [
                            _override(f"strategy_options.{k}", v)
                            for k, v in spec.strategy_options.get(strategy, {}).items()
                        ]
                        overrides += [_override(k, v) for k, v in variant.set.items()]
                        overrides += [_override(k, v) for k, v in grid_part.items()]
                        overrides += [
                            _override("strategy", strategy),
                            _override("budget", budget),
                            _override("seed", seed),
                            "progress=false",
                        ]
                        safe_strategy = strategy.replace(":", "_").replace("/", "_")
                        tid = f"{safe_strategy}-b{budget:g}-{_fmt_value(vname)}-s{seed}"
                        trials.append(
                            Trial(
                                trial_id=tid,
                                strategy=strategy,
                                budget=float(budget),
                                seed=int(seed),
                                variant=vname,
                                overrides=tuple(overrides),
                                base=spec.base,
                                index=len(trials),
                                axes=grid_part,
                            )
                        )
    if spec.equal_steps is not None:
        trials = [_with_equal_steps(t, spec.equal_steps, spec.epoch_steps) for t in trials]
    ids = [t.trial_id for t in trials]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ConfigError(f"ablation {spec.name!r} expands to repeated trials: {', '.join(dup[:5])}")
    return trials


def _with_equal_steps(trial: Trial, total: int, epoch_steps: int | None = None) -> Trial:
    """``trial`` with a fine-tune of ``total`` minus the steps its search trains the weights: one
    epoch of that many steps, or the fewest equal epochs of at most ``epoch_steps`` each."""
    from nas_headprune.config import load_config
    from nas_headprune.registry import make_strategy

    try:
        cfg = load_config(trial.base, list(trial.overrides))
        planned = make_strategy(cfg.strategy, cfg.strategy_options).planned_weight_steps()
    except UsageError as exc:
        raise type(exc)(f"trial {trial.trial_id}: {exc}") from exc
    rest = total - planned
    if rest < 0:
        raise ConfigError(
            f"trial {trial.trial_id}: equal_steps={total} is less than the {planned} steps its search "
            "trains the weights; raise equal_steps or shorten the search"
        )
    epochs = 1
    if epoch_steps is not None and rest > 0:  # the fewest equal epochs that each fit in one
        epochs = next(k for k in range(1, rest + 1) if rest % k == 0 and rest // k <= epoch_steps)
    finetune = (
        ["finetune.epochs=0"]
        if rest == 0
        else [f"finetune.epochs={epochs}", f"finetune.max_steps_per_epoch={rest // epochs}"]
    )
    return dataclasses.replace(trial, overrides=(*trial.overrides[:-1], *finetune, trial.overrides[-1]))


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` with 0 <= i < n (0-based, like most array-job indices)."""
    if text is None:
        return None
    i_s, sep, n_s = text.partition("/")
    try:
        i, n = int(i_s), int(n_s)
    except ValueError:
        i, n = -1, 0
    if not sep or n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard expects i/n with 0 <= i < n (for example 0/4), got {text!r}")
    return i, n


def shard_trials(trials: list[Trial], shard: tuple[int, int] | None) -> list[Trial]:
    if shard is None:
        return trials
    i, n = shard
    return [t for t in trials if t.index % n == i]


def validate_trials(trials: list[Trial]) -> None:
    """Build every trial's config and look up its strategy before running anything."""
    from nas_headprune.config import load_config
    from nas_headprune.registry import make_strategy

    seen: set[tuple[str, tuple[str, ...]]] = set()
    for t in trials:
        key = (t.strategy, tuple(o for o in t.overrides if o.startswith("strategy_options.")))
        try:
            cfg = load_config(t.base, list(t.overrides))
            if key not in seen:
                make_strategy(cfg.strategy, cfg.strategy_options)
                seen.add(key)
        except UsageError as exc:
            raise type(exc)(f"trial {t.trial_id}: {exc}") from exc
