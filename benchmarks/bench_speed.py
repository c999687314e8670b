"""Are pruned models as fast as their MACs promise? Throughput of pruned models against dense.

    python benchmarks/bench_speed.py [--seeds 0 1 2] [--report docs/results/speed.md]

In one run, at 50% of the dense MACs unless a variant says otherwise, with torch on 1 thread:

- **Models.** The embedded Fashion-MNIST ViT (trained) and ``deit_tiny_patch16_224`` at 224x224
  (random weights), pruned by this project's ``magnitude`` and ``taylor`` strategies in these
  variants (``VARIANTS``): ``default`` (the strategy's defaults: magnitude ties q/k and v widths in
  steps of 8, taylor chooses them freely), ``free widths`` (``strategy_options.tie_qk_v=false``,
  ``width_step=1``), ``tie_qk_v + step 8`` (``tie_qk_v=true``, ``width_step=8``),
  ``tie_qk_v + step 8 + heads`` (and ``space.prune_heads=true``: layers may drop whole heads), and
  two latency budgets instead of the MACs budget: ``latency b64 0.5`` (``budget_kind=latency``, half
  the dense latency at batch 64) and ``latency b1 0.85`` (85% of it at batch 1). A variant equal to
  a strategy's defaults is not run twice (``variants_of``). ``math path (free widths)`` is the free
  architecture with its unequal-width layers forced onto the math path, which is what ran before the
  padded path existed. ``latency b1 0.5`` is run too; a variant whose budget is below its space's
  smallest architecture is reported as refused instead of a row (what the search says, with both
  fractions). Next to
  them Torch-Pruning 1.6.1's global head-dim pruning with L2 and with Taylor importance at the same
  MACs (bisection on its pruning ratio; benchmark-only extra ``bench``, see
  ``benchmarks/_torch_pruning_glue.py``).
- **Speed.** Throughput ratios pruned / dense at batch 1 and 64, every model of one table timed
  interleaved (``nas_headprune.evaluator.metrics.measure_throughput``: rotated order per round,
  medians), next to the ideal ratio dense MACs / pruned MACs (both counted by ``measure_macs``).
  ``executed MACs`` adds the zeros the padded attention path multiplies.
- **Accuracy** (embedded ViT only). Ours: the normal pipeline, ``run_search`` with the ``default``
  config at budget 0.5 (search, least-squares reweight, 150-step distilled fine-tune), one run folder
  per strategy, variant and seed under ``--root`` (finished runs are reused). Torch-Pruning's: the
  same fine-tune config and teacher through the project's ``finetune`` and ``evaluate`` (no
  reweight step: that step needs this project's selection), kept under ``--root`` as well. Top-1 on the 10k test set, mean and
  standard deviation over the seeds. These runs and fine-tunes go to ``--workers`` processes with
  1 thread each; the timing runs afterwards, alone. The timed models are those of the first seed.

- **Latency budgets.** A table under the main table lists, for the latency-budget rows, the budget,
  the fraction of the dense latency the search's latency table predicted, and the fraction measured
  in this run's timing. The embedded ViT's tables were measured by its pipeline runs (kept in their
  run folders, ``latency_table.json``); deit_tiny's are measured here, once per batch size.

deit_tiny has random weights, so its rows are about speed only; its Taylor scores (both projects')
come from two batches of 16 random images with random labels.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _torch_pruning_glue import prune_at_ratio, prune_to_macs  # noqa: E402

from nas_headprune.allocate import BudgetError  # noqa: E402
from nas_headprune.config import load_config  # noqa: E402
from nas_headprune.evaluator.latency import latency_table  # noqa: E402
from nas_headprune.evaluator.materialize import materialize  # noqa: E402
from nas_headprune.evaluator.measure import measure_macs  # noqa: E402
from nas_headprune.evaluator.metrics import attention_paths, measure_throughput  # noqa: E402
from nas_headprune.io import load_pruned  # noqa: E402
from nas_headprune.models.factory import create_model  # noqa: E402
from nas_headprune.registry import make_strategy  # noqa: E402
from nas_headprune.space import build_space  # noqa: E402
from nas_headprune.strategy import SearchContext, resolve_width_step, validate_result  # noqa: E402

BUDGET = 0.5
STRATEGIES = ("magnitude", "taylor")
#: our variants: name -> config overrides on top of ``budget=0.5`` (the default config otherwise)
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "free widths": ["strategy_options.tie_qk_v=false", "strategy_options.width_step=1"],
    "tie_qk_v + step 8": ["strategy_options.tie_qk_v=true", "strategy_options.width_step=8"],
    "tie_qk_v + step 8 + heads": [
        "strategy_options.tie_qk_v=true",
        "strategy_options.width_step=8",
        "space.prune_heads=true",
    ],
    "latency b64 0.5": ["budget_kind=latency", "latency.batch_size=64", "latency.threads=1"],
    "latency b1 0.85": ["budget_kind=latency", "budget=0.85", "latency.batch_size=1", "latency.threads=1"],
}
#: variants expected to be refused (the budget is below the smallest architecture): their message
#: is reported instead of a row
REFUSED_VARIANTS: dict[str, list[str]] = {
    "latency b1 0.5": ["budget_kind=latency", "budget=0.5", "latency.batch_size=1", "latency.threads=1"],
}
#: the latency table settings of the deit_tiny rows (fewer grid points and rounds: 224x224 is slow)
DEIT_LATENCY = {"points": 4, "rounds": 7, "warmup": 2}
MATH = "math path"
#: the variant whose architecture the ``math path`` row times: free widths are the unequal ones
MATH_OF = "free widths"


def _resolved(strategy: str, options: dict[str, Any]) -> dict[str, Any]:
    """The strategy's options on the CPU with a default ``width_step`` spelled out (both models'
    dimensions are at least two steps wide, where a default step and the same step set explicitly
    give the same widths)."""
    cfg = make_strategy(strategy, options).config
    out = cfg.model_dump()
    if "width_step" in out:
        out["width_step"] = resolve_width_step(cfg.width_step, "cpu", cfg.cpu_width_step)
    return out


def variants_of(strategy: str) -> list[str]:
    """The variants run for ``strategy``: every one of ``VARIANTS`` except those that only set
    strategy options equal to the strategy's defaults (magnitude's ``tie_qk_v + step 8``,
    taylor's ``free widths``), which would repeat the ``default`` row."""
    default = _resolved(strategy, {})
    out = []
    for name, overrides in VARIANTS.items():
        cfg = load_config("default", [f"strategy={strategy}", *overrides])
        only_options = all(o.startswith("strategy_options.") for o in overrides)
        if name != "default" and only_options and _resolved(strategy, cfg.strategy_options) == default:
            continue
        out.append(name)
    return out


def math_source(strategy: str) -> str:
    """The variant whose architecture the strategy's ``math path`` row forces onto the math path."""
    return MATH_OF if MATH_OF in variants_of(strategy) else "default"


TP_IMPORTANCES = {
    "l2": "Torch-Pruning L2 head-dim, global",
    "taylor": "Torch-Pruning Taylor head-dim, global",
}


@dataclass
class Row:
    """One pruned model of a table: how it was made, its model for timing, its accuracy per seed."""

    label: str
    options: str
    model: nn.Module
    accuracy: dict[int, dict[str, float]] = field(default_factory=dict)  # seed -> before / after
    #: under a latency budget: its batch size, budget and the table's predicted fraction of dense
    latency: dict[str, float] | None = None


def _force_math(model: nn.Module) -> nn.Module:
    """A copy whose unequal-width attention layers run the math path (the path before this change)."""
    out = copy.deepcopy(model)
    for module in out.modules():
        paths = getattr(module, "attn_paths", None)
        if isinstance(paths, dict) and module.head_dim_qk != module.head_dim_v:
            module.attn_paths = {**paths, "cpu": "math"}
    return out


def executed_macs(model: nn.Module, input_size: tuple[int, ...], macs: int) -> int:
    """``macs`` plus the multiplications with padding zeros that the CPU attention paths run."""
    extra = 0
    tokens: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if callable(getattr(module, "attention_path", None)) and hasattr(module, "head_dim_qk"):
            hooks.append(
                module.register_forward_pre_hook(
                    lambda m, args, name=name: tokens.__setitem__(name, args[0].shape[1])
                )
            )
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    finally:
        for h in hooks:
            h.remove()
    for name, path in attention_paths(model, "cpu").items():
        module = model.get_submodule(name)
        if path == "sdpa_padded":
            n = tokens[name]
            extra += module.num_heads * n * n * abs(module.head_dim_qk - module.head_dim_v)
    return macs + extra


# --------------------------------------------------------------------------- embedded ViT
def _data(seed: int) -> tuple[Any, Any, Any, Any, tuple[int, ...]]:
    """The default config's loaders and calibration batches for ``seed``, as ``run_search`` makes them."""
    from nas_headprune import data as data_mod
    from nas_headprune.runner import load_base_model, resolve_data

    cfg = load_config("default", [f"seed={seed}"])
    _, record = load_base_model(cfg)
    data_cfg = resolve_data(cfg, record)
    torch.manual_seed(seed)
    bundle = data_mod.load_datasets(data_cfg, seed=seed)
    train_loader, test_loader = data_mod.make_loaders(bundle, data_cfg, seed=seed)
    calib = data_mod.calibration_batches(bundle, data_cfg, seed=seed)
    return cfg, train_loader, test_loader, calib, data_mod.input_size(bundle)


def _folder(root: Path, strategy: str, variant: str, seed: int) -> Path:
    return root / f"{strategy}-{variant.replace(' + ', '-').replace(' ', '')}-s{seed}"


def _init_worker() -> None:
    torch.set_num_threads(1)


def pipeline_job(strategy: str, variant: str, seed: int, root: str) -> dict[str, Any]:
    """One ``run_search`` (default config, budget 0.5) into its run folder; its top-1 and time."""
    from nas_headprune.runner import run_search

    overrides = [
        f"strategy={strategy}",
        f"budget={BUDGET}",
        f"seed={seed}",
        "progress=false",
        *(VARIANTS[variant] if variant in VARIANTS else REFUSED_VARIANTS[variant]),
    ]
    t0 = time.perf_counter()
    try:
        result = run_search(load_config("default", overrides), _folder(Path(root), strategy, variant, seed))
    except BudgetError as exc:  # the budget is below what the variant's space can reach
        return {"refused": str(exc), "seconds": time.perf_counter() - t0}
    latency = result.get("latency")
    return {
        "before": result["pruned"]["before_finetune"]["top1"],
        "after": result["pruned"]["after_finetune"]["top1"],
        "dense": result["dense"]["top1"],
        "seconds": time.perf_counter() - t0,
        "latency": {k: latency[k] for k in ("batch_size", "budget", "predicted_fraction")}
        if latency
        else None,
    }


def torch_pruning_job(importance: str, seed: int, keep_weights: bool, root: str) -> dict[str, Any]:
    """Torch-Pruning at the budget, then the default config's fine-tune and evaluation; kept under
    ``root`` (``tp-<importance>-s<seed>``) and reused like our run folders."""
    import json

    from safetensors.torch import load_file, save_file

    from nas_headprune.atomic import atomic_path, atomic_write_json
    from nas_headprune.evaluator.finetune import finetune
    from nas_headprune.evaluator.metrics import evaluate
    from nas_headprune.runner import load_base_model

    folder = Path(root) / f"tp-{importance}-s{seed}"
    if (folder / "result.json").is_file():
        done = json.loads((folder / "result.json").read_text())
        done["weights"] = load_file(str(folder / "model.safetensors")) if keep_weights else None
        done["reused"] = True
        return done
    t0 = time.perf_counter()
    dense, _ = load_base_model(load_config("default", []))
    dense.eval()
    cfg, train_loader, test_loader, calib, size = _data(seed)
    target = BUDGET * measure_macs(dense, size)
    pruned, ratio = prune_to_macs(dense, size, target, importance, calib, steps=12)
    before = evaluate(pruned, test_loader)["top1"]
    finetune(
        pruned,
        train_loader,
        cfg.finetune,
        seed=seed,
        device="cpu",
        teacher=dense if cfg.finetune.distill else None,
        progress=False,
    )
    after = evaluate(pruned, test_loader)["top1"]
    state = {k: v.detach().clone().contiguous() for k, v in pruned.state_dict().items()}
    record = {"before": before, "after": after, "ratio": ratio, "seconds": time.perf_counter() - t0}
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    atomic_write_json(folder / "result.json", record)
    return {**record, "weights": state if keep_weights else None, "reused": False}


def embedded_rows(
    seeds: list[int], root: Path, log: Any, reused: list[str], workers: int, refused: list[str]
) -> tuple[nn.Module, tuple[int, ...], list[Row], float | None]:
    """Our pipeline runs and Torch-Pruning's fine-tunes (in ``workers`` processes), then the rows."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from nas_headprune.runner import load_base_model

    jobs: dict[tuple[str, str, int], Any] = {}
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        for importance in TP_IMPORTANCES:  # the longest jobs first
            for seed in seeds:
                jobs["tp", importance, seed] = pool.submit(
                    torch_pruning_job, importance, seed, seed == seeds[0], str(root)
                )
        for strategy in STRATEGIES:  # each refused variant once, on the first seed
            for variant in REFUSED_VARIANTS:
                jobs[strategy, variant, seeds[0]] = pool.submit(
                    pipeline_job, strategy, variant, seeds[0], str(root)
                )
        for strategy in STRATEGIES:
            for variant in variants_of(strategy):
                for seed in seeds:
                    if (_folder(root, strategy, variant, seed) / "result.json").is_file():
                        reused.append(_folder(root, strategy, variant, seed).name)
                    jobs[strategy, variant, seed] = pool.submit(
                        pipeline_job, strategy, variant, seed, str(root)
                    )
        results = {}
        for key, job in jobs.items():
            results[key] = job.result()
            if key[0] == "tp" and results[key].get("reused"):
                reused.append(f"tp-{key[1]}-s{key[2]}")
            if "refused" in results[key] and key[2] == seeds[0]:
                refused.append(f"{key[0]} {key[1]}: {results[key]['refused']}")
            log(f"  {' '.join(map(str, key))}: {results[key]['seconds']:.0f} s")

    dense, _ = load_base_model(load_config("default", []))
    dense.eval()
    out: list[Row] = []
    for strategy in STRATEGIES:
        for variant in variants_of(strategy):
            if any("refused" in results[strategy, variant, seed] for seed in seeds):
                continue  # listed under "Refused"
            model = load_pruned(_folder(root, strategy, variant, seeds[0]) / "model").eval()
            acc = {seed: results[strategy, variant, seed] for seed in seeds}
            if variant == math_source(strategy):
                out.append(Row(strategy, f"{MATH} ({variant})", _force_math(model), acc))
            out.append(Row(strategy, variant, model, acc, results[strategy, variant, seeds[0]]["latency"]))
    _, _, _, calib, size = _data(seeds[0])
    for importance, label in TP_IMPORTANCES.items():
        first = results["tp", importance, seeds[0]]
        # the seed-0 fine-tuned model: the same pruning rebuilds its structure, then its weights
        model = prune_at_ratio(dense, size, first["ratio"], importance, calib)
        model.load_state_dict(first["weights"])
        acc = {seed: results["tp", importance, seed] for seed in seeds}
        out.append(Row(label, f"pruning_ratio {first['ratio']:.3f}", model.eval(), acc))
    dense_top1 = results[STRATEGIES[0], "default", seeds[0]]["dense"]
    return dense, size, out, dense_top1


# --------------------------------------------------------------------------- deit_tiny at 224
def deit_rows(log: Any, cache: Path, refused: list[str]) -> tuple[nn.Module, tuple[int, ...], list[Row]]:
    """deit_tiny pruned by each strategy and variant; latency tables measured once per batch size
    in this run (``cache``, emptied first, is shared by the strategies)."""
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    torch.manual_seed(0)
    dense = create_model("deit_tiny_patch16_224").eval()  # random weights
    size = (3, 224, 224)
    gen = torch.Generator().manual_seed(0)
    calib = [
        (torch.randn(16, *size, generator=gen), torch.randint(0, 1000, (16,), generator=gen))
        for _ in range(2)
    ]
    dense_macs = measure_macs(dense, size)
    base_space = build_space(dense, size)
    out: list[Row] = []
    for strategy in STRATEGIES:
        for variant in variants_of(strategy):
            overrides = VARIANTS[variant]
            t0 = time.perf_counter()
            # the variant's overrides read as a run config reads them (typed and validated)
            cfg = load_config("default", [f"budget={BUDGET}", *overrides])
            space = base_space.with_heads() if cfg.space.prune_heads else base_space
            ctx = SearchContext(
                model=dense,
                space=space,
                budget=cfg.budget,
                dense_macs=dense_macs,
                calib=calib,
                seed=0,
                budget_kind=cfg.budget_kind,
            )
            latency = None
            if cfg.budget_kind == "latency":
                ctx.latency, _ = latency_table(
                    dense,
                    space,
                    batch_size=cfg.latency.batch_size,
                    device="cpu",
                    threads=1,
                    cache_dir=cache,
                    **DEIT_LATENCY,
                )
            strategy_obj = make_strategy(strategy, cfg.strategy_options)
            try:
                selection, _ = validate_result(strategy, ctx, strategy_obj.search(ctx))
            except BudgetError as exc:  # the budget is below what the variant's space can reach
                refused.append(f"{strategy} {variant}: {exc}")
                continue
            if ctx.latency is not None:
                predicted = ctx.latency.predict(space, selection.architecture()) / ctx.latency.dense_ms
                latency = {
                    "batch_size": cfg.latency.batch_size,
                    "budget": cfg.budget,
                    "predicted_fraction": predicted,
                }
            model = materialize(dense, space, selection).eval()
            if variant == math_source(strategy):
                out.append(Row(strategy, f"{MATH} ({variant})", _force_math(model)))
            out.append(Row(strategy, variant, model, latency=latency))
            log(f"  deit {strategy} {variant}: {time.perf_counter() - t0:.0f} s")
    for importance, label in TP_IMPORTANCES.items():
        t0 = time.perf_counter()
        pruned, ratio = prune_to_macs(dense, size, BUDGET * dense_macs, importance, calib, steps=12)
        out.append(Row(label, f"pruning_ratio {ratio:.3f}", pruned.eval()))
        log(f"  deit Torch-Pruning {importance}: {time.perf_counter() - t0:.0f} s")
    return dense, size, out


# --------------------------------------------------------------------------- report
def _acc(row: Row, key: str) -> str:
    values = [a[key] for a in row.accuracy.values()]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(
    name: str,
    dense: nn.Module,
    size: tuple[int, ...],
    rows: list[Row],
    iters: dict[int, int],
    with_accuracy: bool,
    dense_accuracy: float | None,
) -> list[str]:
    dense_macs = measure_macs(dense, size)
    models = {"dense": dense, **{f"{i}": r.model for i, r in enumerate(rows)}}
    speed = {}
    for batch, n in iters.items():
        speed[batch] = measure_throughput(models, size, batch_size=batch, warmup=2, iters=n, threads=1)
    lines = [
        f"### {name}",
        "",
        f"Dense: {dense_macs:,} MACs per image; {speed[1]['dense']['images_per_s']:.0f} images/s at "
        f"batch 1 and {speed[64]['dense']['images_per_s']:.0f} at batch 64"
        + (f"; top-1 {dense_accuracy:.2f}%" if dense_accuracy is not None else "")
        + ". Medians of "
        + " and ".join(f"{n} interleaved rounds at batch {b}" for b, n in iters.items())
        + ".",
        "",
    ]
    head = "| pruned by | variant | MACs | executed MACs | ideal | speed-up b1 | speed-up b64 | b64 / ideal | attention paths (CPU) |"
    if with_accuracy:
        head += " top-1 before fine-tune | top-1 after fine-tune |"
    lines += [head, "|" + " --- |" * (head.count("|") - 1)]
    for i, row in enumerate(rows):
        macs = measure_macs(row.model, size)
        executed = executed_macs(row.model, size, macs)
        ideal = dense_macs / macs
        s1, s64 = speed[1][str(i)]["speedup"], speed[64][str(i)]["speedup"]
        paths = speed[64][str(i)].get("attention_paths", {})
        cells = [
            row.label,
            row.options,
            f"{macs / dense_macs:.3f}",
            f"{executed / dense_macs:.3f}",
            f"{ideal:.2f}x",
            f"{s1:.2f}x",
            f"{s64:.2f}x",
            f"{s64 / ideal:.2f}",
            ", ".join(f"{k} {v}" for k, v in paths.items()) or "-",
        ]
        if with_accuracy:
            cells += [_acc(row, "before"), _acc(row, "after")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines + latency_lines(rows, speed)


def latency_lines(rows: list[Row], speed: dict[int, dict[str, dict[str, Any]]]) -> list[str]:
    """The latency-budget rows: budget, the table's prediction and this run's measurement."""
    picked = [(i, r) for i, r in enumerate(rows) if r.latency]
    if not picked:
        return []
    lines = [
        "Latency budgets (pruned / dense latency at the budget's batch size; predicted by the latency "
        "table the search used, measured in the timing above):",
        "",
        "| pruned by | variant | batch | budget | predicted | measured | measured / budget |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, row in picked:
        assert row.latency is not None
        batch = int(row.latency["batch_size"])
        measured = 1.0 / speed[batch][str(i)]["speedup"]
        lines.append(
            f"| {row.label} | {row.options} | {batch} | {row.latency['budget']:.2f} | "
            f"{row.latency['predicted_fraction']:.3f} | {measured:.3f} | {measured / row.latency['budget']:.2f} |"
        )
    return lines + [""]


def architectures(rows: list[Row]) -> list[str]:
    """Per row, the widths it kept: head widths (q/k / v) and MLP units per block."""
    lines = [
        "| pruned by | variant | per block: heads x d_qk/d_v, MLP units (embedding width) |",
        "| --- | --- | --- |",
    ]
    for row in rows:
        if row.options.startswith(MATH):
            continue
        parts = []
        for block in getattr(row.model, "blocks", []):
            attn, mlp = block.attn, block.mlp
            heads = f"{attn.num_heads}x" if hasattr(attn, "head_dim_qk") else ""
            parts.append(f"{heads}{attn.head_dim_qk}/{attn.head_dim_v}, {mlp.fc1.out_features}")
        embed = row.model.blocks[0].norm1.normalized_shape[0]
        lines.append(f"| {row.label} | {row.options} | {'; '.join(parts)} ({embed}) |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="fine-tune seeds (embedded ViT)")
    p.add_argument("--root", default="runs/bench_speed", help="run folders of our pipeline runs")
    p.add_argument("--report", default=None, help="also write the Markdown to this file")
    p.add_argument("--skip-deit", action="store_true", help="only the embedded ViT")
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="processes for the pipeline runs and fine-tunes, 1 thread each (timing always runs alone)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    load_before = os.getloadavg()

    def log(msg: str) -> None:
        print(f"[{(time.perf_counter() - t_start) / 60:5.1f} min] {msg}", flush=True)

    log("embedded ViT: pipeline runs and Torch-Pruning fine-tunes")
    reused: list[str] = []
    refused: list[str] = []
    dense, size, rows, dense_top1 = embedded_rows(
        args.seeds, Path(args.root), log, reused, args.workers, refused
    )
    log("embedded ViT: timing")
    text = table(
        "Embedded Fashion-MNIST ViT (trained), 50% MACs",
        dense,
        size,
        rows,
        {1: 300, 64: 150},
        True,
        dense_top1,
    )
    text += architectures(rows)
    if refused:
        text += ["Refused (the search's own message, from the pipeline run):", ""]
        text += [f"- {line}" for line in refused] + [""]
    if not args.skip_deit:
        log("deit_tiny: pruning")
        d_refused: list[str] = []
        d_dense, d_size, d_rows = deit_rows(log, Path(args.root) / "deit_latency_tables", d_refused)
        log("deit_tiny: timing")
        text += table(
            "deit_tiny_patch16_224 at 224x224 (random weights), 50% MACs",
            d_dense,
            d_size,
            d_rows,
            {1: 30, 64: 7},
            False,
            None,
        )
        text += architectures(d_rows)
        if d_refused:
            text += ["Refused (the search's own message):", ""]
            text += [f"- {line}" for line in d_refused] + [""]
    minutes = (time.perf_counter() - t_start) / 60
    load_after = os.getloadavg()
    cmd = "python benchmarks/bench_speed.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    from importlib.metadata import version

    header = [
        "# Speed of pruned models against their MACs, with Torch-Pruning side by side",
        "",
        f"Command: `{cmd.strip()}` ({minutes:.1f} minutes"
        + (
            f"; {len(reused)} of our pipeline runs were finished run folders of an earlier run of "
            "this command under `--root`, reused as `run_search` does"
            if reused
            else ""
        )
        + ").",
        "",
        f"torch {torch.__version__}, Torch-Pruning {version('torch-pruning')}, {platform.machine()}, "
        f"{os.cpu_count()} cores shared with other work; torch "
        f"on 1 thread. Load average (1, 5, 15 min) {tuple(round(x, 2) for x in load_before)} at the "
        f"start and {tuple(round(x, 2) for x in load_after)} at the end. CUDA: "
        + (torch.cuda.get_device_name() if torch.cuda.is_available() else "none present, no CUDA rows")
        + ".",
        "",
        "Speed-ups are pruned / dense throughput (medians of interleaved rounds); ideal is dense MACs / "
        "pruned MACs. Accuracy: top-1 (%) on the 10k Fashion-MNIST test set, mean ± standard "
        f"deviation over seeds {', '.join(map(str, args.seeds))}; the timed models are the seed-"
        f"{args.seeds[0]} ones. A variant that only sets a strategy's own defaults is not run twice: "
        + "; ".join(
            f"{s}'s `default` is also {', '.join(f'`{v}`' for v in VARIANTS if v not in variants_of(s))}"
            for s in STRATEGIES
            if len(variants_of(s)) < len(VARIANTS)
        )
        + f". `{MATH} (...)` rows force the named variant's unequal-width layers onto the math path.",
        "",
    ]
    report = "\n".join(header + text)
    print(report)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
