"""The state of one search: set up (similarity weights, initial indicators, optimizer) or resumed
from its checkpoint, kept equal on every rank, and saved atomically (METHOD.md 3, 3.2, 3.5)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nas_headprune.checkpoint import fingerprint, save_checkpoint
from nas_headprune.errors import CheckpointError
from nas_headprune.evaluator.metrics import amp_dtype
from nas_headprune.space import HeadSpace
from nas_headprune.strategy import SearchContext

from .config import (
    _FORMAT,
    _NOT_FINGERPRINTED,
    _SIMILARITY_SKIPPED,
    _STATE_KEYS,
    CHECKPOINT_NAME,
    SimilarityIndicatorConfig,
)
from .init import _attention_difference_init, _taylor_init
from .masks import foldable_kinds
from .parallel import _DataParallel, _share
from .similarity import channel_grams, weights_from_grams
from .state import (
    _Batches,
    _check_state,
    _History,
    _model_digest,
    _Pending,
    _read_state,
)

log = logging.getLogger(__name__)


@dataclass
class SearchRun:
    """Everything one search holds; what :func:`save_run` writes is its state."""

    ctx: SearchContext
    cfg: SimilarityIndicatorConfig
    space: HeadSpace
    device: torch.device
    model: nn.Module
    teacher: nn.Module | None
    similarity: dict[str, Tensor]
    mult: dict[str, Tensor]
    add: dict[str, Tensor]
    indicators: dict[str, nn.Parameter]
    gammas: dict[str, nn.Parameter]
    opt: torch.optim.Optimizer
    batches: _Batches
    history: _History
    ckpt_path: Path | None
    fingerprint: str
    unfoldable: list[str]
    init_layers: list[str]
    init_skipped: list[str]
    #: dimensions that got no similarity weights (weight 1); None: unknown (an older checkpoint)
    similarity_skipped: list[str] | None
    comm: _DataParallel
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    pending: _Pending = field(default_factory=_Pending)
    step: int = 0
    resumed_from: int | None = None
    resumed_world: int | None = None
    last_saved: int = -1

    @property
    def target(self) -> float:
        return float(self.ctx.target_macs)

    def scores(self) -> dict[str, Tensor]:
        return {k: m * self.mult[k] + self.add[k] for k, m in self.indicators.items()}


def run_fingerprint(ctx: SearchContext, space: HeadSpace, cfg: SimilarityIndicatorConfig) -> str:
    record = {
        "config": cfg.model_dump(mode="json", exclude=set(_NOT_FINGERPRINTED)),
        "seed": ctx.seed,
        "budget": ctx.budget,
        "dense_macs": ctx.dense_macs,
        "dims": {k: [d.heads, d.max_width, d.min_width, d.step] for k, d in space.dims.items()},
        "model": _model_digest(ctx.model),
    }
    # neither the device nor the world size: a search resumes on another number of processes
    # (docs/similarity_indicator.md); autocast changes the numbers, so its dtype is recorded
    dtype = amp_dtype(torch.device(ctx.device)) if cfg.amp else None
    if dtype is not None:
        record["amp"] = str(dtype)
    return fingerprint(record)


def load_saved_state(path: Path | None, fingerprint: str, device: torch.device) -> dict | None:
    if path is None or not path.is_file():
        return None
    state = _read_state(path, device)
    if state.get("format") != _FORMAT or state.get("fingerprint") != fingerprint:
        log.warning(
            "%s belongs to another search (model, budget, seed or config differ); starting over", path
        )
        return None
    missing = sorted(_STATE_KEYS - state.keys())
    if missing:
        raise CheckpointError(
            f"{path}: the search checkpoint is incomplete, it lacks {', '.join(missing)}; "
            "delete it to start over"
        )
    return state


def setup_run(ctx: SearchContext, space: HeadSpace, cfg: SimilarityIndicatorConfig) -> SearchRun:
    device = torch.device(ctx.device)
    model = copy.deepcopy(ctx.model).to(device)  # never touch the caller's model
    model.train(cfg.train_weights)
    model.requires_grad_(cfg.train_weights)
    teacher = copy.deepcopy(ctx.model).to(device).eval().requires_grad_(False) if cfg.distill else None
    comm = _DataParallel(ctx, device)
    dtype = amp_dtype(device) if cfg.amp else None
    ckpt_path = Path(ctx.work_dir) / CHECKPOINT_NAME if ctx.work_dir is not None else None
    fingerprint = run_fingerprint(ctx, space, cfg) if ckpt_path is not None else ""
    saved = load_saved_state(ckpt_path, fingerprint, device)
    if saved is not None:
        _check_state(saved, space, ckpt_path)
    if comm.active:  # every rank reads rank 0's file: they must agree on where to start
        step = int(saved["step"]) if saved is not None else -1
        first = ctx.broadcast(step)
        if ctx.any_rank(first != step):
            raise CheckpointError(
                f"{ckpt_path}: the ranks found different search checkpoints (rank 0: step {first}, "
                f"rank {ctx.rank}: step {step}; -1 is none); put ctx.work_dir on a file system "
                "every rank shares"
            )

    modules = dict(ctx.model.named_modules())
    foldable: list[str] = []
    unfoldable: list[str] = []
    for name, layer in space.layers.items():
        if layer.kind == "attention":
            kinds = foldable_kinds(layer, modules[name])
            foldable += [layer.dims[k].label for k in kinds]
            unfoldable += [layer.dims[k].label for k in ("qk", "v") if k not in kinds]
    if cfg.reweight and unfoldable:
        log.info("reweight scales cannot be folded for %s; those get none", ", ".join(unfoldable))

    # similarity weights (3.2) and initial indicators (3.1, 3.5): computed once, then checkpointed
    init_layers: list[str] = []
    init_skipped: list[str] = []
    similarity_skipped: list[str] | None = []
    if saved is not None:
        similarity = saved["similarity"]
        start = saved["indicators"]
        init_layers, init_skipped = list(saved["init_layers"]), list(saved["init_skipped"])
        similarity_skipped = saved.get(_SIMILARITY_SKIPPED)
        if similarity_skipped is None:
            log.warning(
                "%s predates the record of the dimensions that got no similarity weights; their "
                "weights are taken as saved (delete the file to compute them again)",
                ckpt_path,
            )
        else:
            similarity_skipped = list(similarity_skipped)
    else:
        if cfg.similarity == "none":
            similarity = {label: torch.ones(space.shape(label)) for label in space.dims}
        else:  # under torchrun: each rank reads its share, the Gram matrices are summed
            calib, reduce = _share(ctx, ctx.calib[: cfg.calib_batches_for_similarity], comm)
            # head counts get no Gram matrices: their weight is 1
            grams, similarity_skipped = channel_grams(
                model, space.without_heads(), calib, device, reduce=reduce
            )
            similarity = weights_from_grams(space, grams, cfg.similarity)
        start = {label: torch.ones(space.shape(label)) for label in space.dims}
        if cfg.init_other != "uniform":
            start.update(_taylor_init(space, ctx, cfg))
        if cfg.init in ("attention_difference", "shuffled_difference"):
            init, init_skipped = _attention_difference_init(model, space, ctx, cfg, comm)
            start.update(init)
            init_layers = sorted(k.rpartition(":")[0] for k in init)
    similarity = {k: v.float().to(device) for k, v in similarity.items()}
    # score = m * mult + add: alpha = 0 gives mult = 1 and add = 0 exactly, the plain indicator
    if cfg.combine == "multiplicative":
        mult = {k: 1.0 + cfg.alpha * (w - 1.0) for k, w in similarity.items()}
        add = {k: torch.zeros_like(w) for k, w in similarity.items()}
    else:
        mult = {k: torch.ones_like(w) for k, w in similarity.items()}
        add = {k: cfg.alpha * (w - 1.0) for k, w in similarity.items()}

    indicators = {k: nn.Parameter(start[k].detach().float().to(device).clone()) for k in space.dims}
    gammas: dict[str, nn.Parameter] = {}
    if cfg.reweight:
        for label in foldable:
            gammas[label] = nn.Parameter(torch.ones(space.shape(label), device=device))
    # no momentum on the indicators: they all see the same MACs gradient, and momentum carries
    # them across tau together, far below the target (docs/similarity_indicator.md)
    groups: list[dict[str, Any]] = [
        {
            "params": list(indicators.values()),
            "lr": cfg.lr_indicator,
            "weight_decay": 0.0,
            "betas": (0.0, 0.999),
        }
    ]
    if gammas:
        groups.append({"params": list(gammas.values()), "lr": cfg.lr_scales, "weight_decay": 0.0})
    if cfg.train_weights:
        groups.append(
            {"params": list(model.parameters()), "lr": cfg.lr_weights, "weight_decay": cfg.weight_decay}
        )
    opt = torch.optim.AdamW(groups)

    run = SearchRun(
        ctx=ctx,
        cfg=cfg,
        space=space,
        device=device,
        model=model,
        teacher=teacher,
        similarity=similarity,
        mult=mult,
        add=add,
        indicators=indicators,
        gammas=gammas,
        opt=opt,
        batches=_Batches(ctx),
        history=_History(),
        ckpt_path=ckpt_path,
        fingerprint=fingerprint,
        unfoldable=unfoldable,
        init_layers=init_layers,
        init_skipped=init_skipped,
        similarity_skipped=similarity_skipped,
        comm=comm,
        amp_dtype=dtype,
        # fp16 (a GPU without bf16) needs loss scaling; bf16 and the CPU do not
        scaler=torch.amp.GradScaler("cuda") if dtype == torch.float16 else None,
    )
    if saved is None:
        torch.default_generator.manual_seed(ctx.rng("similarity_indicator").getrandbits(62))
        if device.type == "cuda":
            torch.cuda.manual_seed(ctx.rng("similarity_indicator:cuda").getrandbits(62))
        sync_replicas(run)
        return run
    try:
        with torch.no_grad():
            for k, p in gammas.items():
                p.copy_(saved["gammas"][k])
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if run.scaler is not None and saved.get("scaler") is not None:
            run.scaler.load_state_dict(saved["scaler"])
        run.history = _History.from_state(saved["history"])
        run.step = run.resumed_from = run.last_saved = int(saved["step"])
        saved_world = int(saved["batches"].get("world_size", 1))
        run.resumed_world = saved_world if saved_world != ctx.world_size else None
        run.batches.restore(saved["batches"])
        torch.set_rng_state(saved["rng"].cpu())
        if saved.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(saved["cuda_rng"].cpu(), device)
    # entries of the wrong type or shape in a file whose fingerprint matches: edited or damaged
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(
            f"{ckpt_path}: the search checkpoint is damaged ({type(exc).__name__}: {exc}); "
            "delete it to start over"
        ) from exc
    sync_replicas(run)
    if ctx.rank == 0:
        log.info("resuming the search from step %d of %d (%s)", run.step, cfg.steps, ckpt_path)
    return run


def sync_replicas(run: SearchRun) -> None:
    """Under torchrun, every rank starts from rank 0's weights, indicators, scales and similarity
    weights (one broadcast, as DistributedDataParallel does); from then on the averaged gradients
    keep them equal."""
    if not run.comm.active:
        return
    tensors = [
        *(t for t in run.model.state_dict().values() if t.is_floating_point()),  # not index buffers
        *run.indicators.values(),
        *run.gammas.values(),
        *(t for k in sorted(run.similarity) for t in (run.similarity[k], run.mult[k], run.add[k])),
    ]
    run.comm.broadcast_(tensors)


def save_run(run: SearchRun) -> None:
    """Write the whole state atomically (temporary file, then ``os.replace``); rank 0 alone
    writes (every rank holds the same state)."""
    if run.ckpt_path is None or run.last_saved == run.step:
        return
    if run.ctx.rank != 0:
        run.last_saved = run.step
        return
    state = {
        "format": _FORMAT,
        "fingerprint": run.fingerprint,
        "step": run.step,
        "indicators": {k: v.detach() for k, v in run.indicators.items()},
        "gammas": {k: v.detach() for k, v in run.gammas.items()},
        "similarity": run.similarity,
        "model": run.model.state_dict(),
        "optimizer": run.opt.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None,
        "batches": run.batches.state(),
        "history": run.history.state(),
        "init_layers": run.init_layers,
        "init_skipped": run.init_skipped,
        _SIMILARITY_SKIPPED: run.similarity_skipped,
    }
    if run.scaler is not None:
        state["scaler"] = run.scaler.state_dict()
    run.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, run.ckpt_path)
    run.last_saved = run.step
