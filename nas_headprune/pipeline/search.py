"""The search stage: build the space, run the strategy and validate its selection, or read a finished
search back from the run folder."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from nas_headprune.checkpoint import fingerprint
from nas_headprune.errors import CheckpointError, StrategyError
from nas_headprune.jsonlog import finite_json
from nas_headprune.pipeline.latency import refine_search, refinement_summary, run_latency_table
from nas_headprune.pipeline.state import RunState
from nas_headprune.runfolder import read_json, read_tensors

log = logging.getLogger(__name__)


@dataclass
class Searched:
    """What the search stage hands on: the selection and what the strategy learned with it."""

    selection: Any
    scales: dict[str, torch.Tensor] | None
    weights: dict[str, torch.Tensor] | None
    info: dict[str, Any]
    reported_macs: float | None
    weight_steps: int  # optimizer steps of the search that updated the model's weights


def stage_search(run: RunState, done: bool) -> Searched:
    """Build the space and run the strategy, or read the finished search back."""
    from safetensors.torch import save_file

    from nas_headprune.atomic import atomic_path, atomic_write_json
    from nas_headprune.evaluator.latency_cost import LatencyTable
    from nas_headprune.evaluator.measure import measure_macs
    from nas_headprune.space.build import build_space
    from nas_headprune.strategy import SearchContext, validate_result

    cfg, out = run.cfg, run.out
    run.space = build_space(run.model, run.size, skip_unsupported=cfg.space.skip_unsupported)
    if cfg.space.prune_heads:
        run.space = run.space.with_heads()
    if cfg.space.drop_sublayers:
        run.space = run.space.with_drops(run.model)
    run.dense_macs = measure_macs(run.model, run.size)
    run.mlog.write(
        "start",
        strategy=cfg.strategy,
        budget=cfg.budget,
        seed=cfg.seed,
        dense_macs=run.dense_macs,
    )
    search_file = out / "search.json"
    if cfg.budget_kind == "latency":
        run.latency = run_latency_table(run, done)
    if done:
        saved = read_json(search_file, "search record")
        try:
            selection = run.space.selection(saved["selection"])
            scales = read_tensors(out / "search_scales.safetensors") if saved["has_scales"] else None
            weights = read_tensors(out / "search_weights.safetensors") if saved["has_weights"] else None
            info, reported = saved["info"], saved["reported_macs"]
            weight_steps = int(saved["weight_steps"])
            run.timings["search_s"] = float(saved["search_s"])
            if "latency_refinement" in saved:  # the table the selection was made on
                refined = saved["latency_refinement"]
                run.latency = LatencyTable.from_dict(refined["table"])
                run.latency_rounds = refinement_summary(refined)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{search_file} is damaged or was edited ({type(exc).__name__}: {exc}); rerun with --restart"
            ) from exc
        log.info("search already finished; resuming from %s", search_file)
        return Searched(selection, scales, weights, info, reported, weight_steps)
    run.folder.start("search", run.inputs["search"])
    (out / "search_state").mkdir(exist_ok=True)
    ctx = SearchContext(
        model=run.model,
        space=run.space,
        budget=cfg.budget,
        dense_macs=run.dense_macs,
        calib=run.calib,
        seed=cfg.seed,
        device=str(run.device),
        train_loader=run.train_loader,
        work_dir=out / "search_state",
        progress=cfg.progress and run.main,
        rank=run.rank,
        world_size=run.world,
        budget_kind=cfg.budget_kind,
        latency=run.latency,
    )

    def search(ctx: SearchContext) -> tuple[Any, Any]:
        with torch.random.fork_rng(devices=[]):  # every search of a refinement starts from one RNG state
            result = run.strategy.search(ctx)
        return result, validate_result(cfg.strategy, ctx, result)[0]

    t0 = time.perf_counter()
    refinement: dict[str, Any] | None = None
    if cfg.budget_kind == "latency" and cfg.latency.refine_rounds:
        result, selection, refinement = refine_search(run, ctx, search)
        run.latency_rounds = refinement_summary(refinement)
    else:
        result, selection = search(ctx)
    run.timings["search_s"] = time.perf_counter() - t0
    if run.world > 1:
        _same_on_every_rank(cfg.strategy, selection)
    scales = {k: v.detach().cpu().contiguous() for k, v in (result.scales or {}).items()} or None
    weights = {k: v.detach().cpu().contiguous() for k, v in (result.weights or {}).items()} or None
    info, reported = finite_json(result.info)[0], result.reported_macs
    if run.main:
        for name, tensors in (("search_scales", scales), ("search_weights", weights)):
            if tensors:
                with atomic_path(out / f"{name}.safetensors") as tmp:
                    save_file(tensors, str(tmp))
        atomic_write_json(
            search_file,
            {
                "selection": selection.to_lists(),
                "info": info,
                "reported_macs": reported,
                "has_scales": bool(scales),
                "has_weights": bool(weights),
                "weight_steps": result.weight_steps,
                "search_s": run.timings["search_s"],
                "fingerprint": run.fingerprints["search"],
                **({"latency_refinement": refinement} if refinement else {}),
            },
        )
    run.folder.finish("search")
    run.mlog.write("search_done", seconds=run.timings["search_s"], info=info)
    return Searched(selection, scales, weights, info, reported, result.weight_steps)


def _same_on_every_rank(strategy: str, selection: Any) -> None:
    """Every rank must prune the same channels: compare the selections' hashes across ranks."""
    import torch.distributed as dist

    digest = fingerprint(selection.to_lists())
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        groups = ", ".join(f"rank {r}: {d[:12]}" for r, d in enumerate(digests))
        raise StrategyError(
            f"strategy {strategy!r} chose different channels on different ranks ({groups}); under torchrun "
            "a strategy must return the same selection on every rank (make it deterministic, or use "
            "SearchContext.shard / all_reduce_sum / broadcast to share its work)"
        )
