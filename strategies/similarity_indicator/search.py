"""The search loop: indicators trained with the weights under the MACs penalty (METHOD.md 3)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nas_headprune.allocate import check_reachable
from nas_headprune.atomic import atomic_path
from nas_headprune.errors import (
    CheckpointError,
    ConfigError,
    NonFiniteLossError,
    StrategyError,
)
from nas_headprune.evaluator.cost import analytic_cost
from nas_headprune.evaluator.finetune import kl_to_teacher
from nas_headprune.evaluator.metrics import amp_dtype
from nas_headprune.space import (
    HEADS,
    QUERY_SCALE,
    HeadSpace,
    MaskSet,
)
from nas_headprune.strategy import (
    SearchContext,
    SearchResult,
    Strategy,
    resolve_width_step,
)

from .config import (
    _FORMAT,
    _NOT_FINGERPRINTED,
    _SIMILARITY_SKIPPED,
    _STATE_KEYS,
    CHECKPOINT_NAME,
    SimilarityIndicatorConfig,
    _indicator_lr,
    _lam,
)
from .init import _attention_difference_init, _taylor_init
from .masks import (
    _logits,
    _search_macs,
    allowed_widths,
    dimension_masks,
    fit_budget,
    foldable_kinds,
    nearest_width,
    padded_width,
)
from .parallel import _DataParallel, _share
from .similarity import channel_grams, weights_from_grams
from .state import (
    _Batches,
    _check_state,
    _History,
    _model_digest,
    _Pending,
    _read_state,
    _same_state_on_every_rank,
)

log = logging.getLogger(__name__)


# =========================================================================== strategy


def _always_balanced(cfg: SimilarityIndicatorConfig, space: HeadSpace, label: str) -> bool:
    """Whether a dimension's mask keeps the same count in every head: with ``balance``, and always
    for an MLP (one group of units) and a head count (one group of heads, at least one kept)."""
    return cfg.balance or space.layer_of(label).kind == "mlp" or space.dims[label].kind == HEADS


@dataclass
class _Run:
    """Everything one search holds; what :meth:`SimilarityIndicator._save` writes is its state."""

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


class SimilarityIndicator(Strategy[SimilarityIndicatorConfig]):
    """Learnable channel indicators with similarity weights, head-balanced masks and reweight
    scales, trained jointly with the weights under a differentiable MACs penalty."""

    summary = (
        "learned channel indicators x similarity weights, head-balanced every step, reweight scales, "
        "MACs penalty (METHOD.md 3)"
    )
    Config = SimilarityIndicatorConfig
    reports_steps = True  # ctx.step_done(step, hard masks) after every step and its checkpoint
    head_pruning = True  # with strategy_options.head_indicator: a learned indicator per head

    def planned_weight_steps(self) -> int:
        """Every search step updates the model's weights unless they are frozen."""
        cfg = self.config
        return cfg.steps if cfg.train_weights and cfg.lr_weights > 0 else 0

    # -------------------------------------------------------------------- search
    def search(self, ctx: SearchContext) -> SearchResult:
        """Search on a copy of ``ctx.model``; resumes from ``ctx.work_dir`` when it holds this search."""
        cfg = self.config
        if ctx.space.has_heads and not cfg.head_indicator:
            raise ConfigError(
                "similarity_indicator searches whole heads (space.prune_heads: true) only with its head "
                "indicator: set strategy_options.head_indicator: true, or space.prune_heads: false"
            )
        space = ctx.space.with_step(resolve_width_step(cfg.width_step, ctx.device), cfg.min_width)
        check_reachable(space, ctx.target_macs)
        dev = torch.device(ctx.device)
        forked = (
            [dev.index if dev.index is not None else torch.cuda.current_device()]
            if dev.type == "cuda"
            else []
        )
        with torch.random.fork_rng(devices=forked):
            run = self._setup(ctx, space, cfg)
            try:
                with space.apply_masks(run.model, MaskSet()) as handle:
                    self._train(run, handle.masks)
            finally:
                run.batches.close()
            self._save(run)  # the finished state: trained weights; a rerun only re-finalises
            return self._finish(run)

    def _fingerprint(self, ctx: SearchContext, space: HeadSpace, cfg: SimilarityIndicatorConfig) -> str:
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
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def _load_checkpoint(self, path: Path | None, fingerprint: str, device: torch.device) -> dict | None:
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

    def _setup(self, ctx: SearchContext, space: HeadSpace, cfg: SimilarityIndicatorConfig) -> _Run:
        device = torch.device(ctx.device)
        model = copy.deepcopy(ctx.model).to(device)  # never touch the caller's model
        model.train(cfg.train_weights)
        model.requires_grad_(cfg.train_weights)
        teacher = copy.deepcopy(ctx.model).to(device).eval().requires_grad_(False) if cfg.distill else None
        comm = _DataParallel(ctx, device)
        dtype = amp_dtype(device) if cfg.amp else None
        ckpt_path = Path(ctx.work_dir) / CHECKPOINT_NAME if ctx.work_dir is not None else None
        fingerprint = self._fingerprint(ctx, space, cfg) if ckpt_path is not None else ""
        saved = self._load_checkpoint(ckpt_path, fingerprint, device)
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
                channels = space.without_heads() if space.has_heads else space  # heads: weight 1
                grams, similarity_skipped = channel_grams(model, channels, calib, device, reduce=reduce)
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

        run = _Run(
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
            self._sync_replicas(run)
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
        self._sync_replicas(run)
        if ctx.rank == 0:
            log.info("resuming the search from step %d of %d (%s)", run.step, cfg.steps, ckpt_path)
        return run

    @staticmethod
    def _sync_replicas(run: _Run) -> None:
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

    def _save(self, run: _Run) -> None:
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
        with atomic_path(run.ckpt_path) as tmp:
            torch.save(state, tmp)
        run.last_saved = run.step

    def _train(self, run: _Run, masks: MaskSet) -> None:
        """The search loop. Nothing in a step waits for the device: the loss, task loss and MACs
        ratio stay on it until :meth:`_flush` reads them, every ``log_every = max(1, steps // 10)``
        steps, before every checkpoint and after the last step."""
        from nas_headprune.progress import stderr_progress

        cfg, space, history = run.cfg, run.space, run.history
        dims = space.dims
        balanced = {label: _always_balanced(cfg, space, label) for label in dims}
        allowed = {label: allowed_widths(d, run.device) for label, d in dims.items()}
        trainable = [p for group in run.opt.param_groups for p in group["params"]]
        log_every = max(1, cfg.steps // 10)
        dtype = run.amp_dtype
        non_blocking = run.device.type == "cuda"
        with stderr_progress(enabled=run.ctx.progress, transient=True) as bar:
            task_id = bar.add_task("similarity_indicator search", total=cfg.steps, completed=run.step)
            while run.step < cfg.steps:
                x, y = (t.to(run.device, non_blocking=non_blocking) for t in run.batches.next()[:2])
                hard: dict[str, Tensor] = {}
                widths: dict[str, Tensor] = {}
                masks.clear()
                for label, score in run.scores().items():
                    hard[label], ste, widths[label] = dimension_masks(
                        score, dims[label], cfg.tau, balanced[label], allowed[label]
                    )
                    gamma = run.gammas.get(label)
                    if gamma is not None and label.endswith(":v"):
                        ste = ste * gamma  # value scales ride on the value mask
                    elif gamma is not None:
                        masks[label + QUERY_SCALE] = gamma  # query scales: queries only
                    masks[label] = ste
                autocast = (
                    torch.autocast(device_type=run.device.type, dtype=dtype)
                    if dtype is not None
                    else nullcontext()
                )
                with autocast:
                    logits = _logits(run.model(x)).float()  # (B, classes); a no-op in float32
                    teacher = None
                    if run.teacher is not None:
                        with torch.no_grad():
                            teacher = _logits(run.teacher(x)).float()
                task = F.cross_entropy(logits, y)
                loss = task
                if teacher is not None:
                    loss = loss + kl_to_teacher(logits, teacher)
                ratio = _search_macs(space, widths) / run.target  # differentiable in the scores
                excess = ratio - 1.0
                penalty = torch.relu(excess).square() if cfg.penalty == "above" else excess.square()
                loss = loss + _lam(cfg, run.step) * penalty
                run.opt.zero_grad(set_to_none=True)
                (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
                run.comm.average_grads_(trainable)  # under torchrun: the mean gradient of all ranks
                if run.scaler is not None:
                    run.scaler.step(run.opt)
                    run.scaler.update()
                else:
                    run.opt.step()
                if cfg.lr_schedule != "constant":  # the next step's rate: a function of the step alone
                    run.opt.param_groups[0]["lr"] = _indicator_lr(cfg, run.step + 1)

                run.step += 1
                run.pending.add(loss, task, ratio)
                checkpoint = bool(cfg.checkpoint_every) and run.step % cfg.checkpoint_every == 0
                logged = run.step % log_every == 0
                if checkpoint or logged or run.step == cfg.steps:
                    self._flush(run)  # raises before a checkpoint of a non-finite step is written
                if checkpoint:
                    self._save(run)
                if logged and run.ctx.rank == 0:
                    log.info(
                        "step %d/%d: loss %.4f (task %.4f), MACs %.3f of the target",
                        run.step,
                        cfg.steps,
                        history.loss[-1],
                        history.task[-1],
                        history.ratio[-1],
                    )
                bar.update(task_id, completed=run.step)
                run.ctx.step_done(run.step, {k: v.detach() for k, v in hard.items()})

    def _flush(self, run: _Run) -> None:
        """Read the pending steps' values (one host sync), averaged over the ranks under torchrun,
        into the history. A NaN or infinite loss on any rank makes the mean non-finite on every rank,
        so all of them raise :class:`NonFiniteLossError` here, together, naming the first such step."""
        pending = len(run.pending.loss)
        if not pending:
            return
        first = run.step - pending + 1
        values = run.pending.take()  # (3, n): loss, task, ratio
        if run.comm.active:
            run.comm.sum_([values[:2]])  # the ratio is the same on every rank
            values[:2] /= run.comm.world
        loss, task, ratio = values.tolist()
        cfg = run.cfg
        for i, value in enumerate(loss):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"similarity_indicator: the search loss is {value} at step {first + i} of "
                    f"{cfg.steps} (task loss {task[i]}); the search stops without saving that step or "
                    f"any later one. Lower strategy_options.lr_weights (now {cfg.lr_weights:g}) or "
                    f"strategy_options.lr_indicator (now {cfg.lr_indicator:g}), or check the model "
                    "and data for NaN or inf values"
                )
        if run.comm.mismatch is not None and bool(run.comm.mismatch):
            raise StrategyError(
                "similarity_indicator: the ranks' backward passes reached different parameters (the "
                "model took another path on some rank), so their copies would drift apart; the search "
                "stops without saving"
            )
        run.history.extend(first, loss, task, ratio)

    def _finish(self, run: _Run) -> SearchResult:
        cfg, ctx = run.cfg, run.ctx
        scores = {k: v.detach().float().cpu() for k, v in run.scores().items()}
        scales = {k: v.detach().float().cpu().clone() for k, v in run.gammas.items()} or None
        weights = None
        if cfg.train_weights:
            weights = {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()}
        info: dict[str, Any] = {
            "similarity": cfg.similarity,
            "combine": cfg.combine,
            "alpha": cfg.alpha,
            "balance": cfg.balance,
            "reweight": cfg.reweight,
            "init": cfg.init,
            "head_indicator": cfg.head_indicator,
            "steps": cfg.steps,
            "resumed_from_step": run.resumed_from,
        }
        if run.comm.active:
            _same_state_on_every_rank(scores, scales, weights)
            # rank 0 picks the architecture (and any fix-up) and hands it to the others
            decided = ctx.broadcast(self._decide(run, scores) if ctx.rank == 0 else None)
            info.update(world_size=ctx.world_size)
        else:
            decided = self._decide(run, scores)
        if run.resumed_world is not None:
            info.update(resumed_from_world_size=run.resumed_world)
        if run.amp_dtype is not None:
            info.update(amp=str(run.amp_dtype).removeprefix("torch."))
        selection, decision, macs = decided
        info.update(decision)
        info.update(
            first_step_within_budget=run.history.first_within,
            loss=run.history.summary(),
            scales_left_out=run.unfoldable if cfg.reweight else [],
            init_layers=run.init_layers,
            init_skipped=run.init_skipped,
            similarity_skipped=run.similarity_skipped,
            trained_weights=bool(cfg.train_weights),
        )
        return SearchResult(
            selection,
            info=info,
            scales=scales,
            reported_macs=None if cfg.balance else macs,
            weights=weights,
            weight_steps=self.planned_weight_steps(),
        )

    @staticmethod
    def _decide(run: _Run, scores: Mapping[str, Tensor]) -> tuple[Any, dict[str, Any], float]:
        """The final selection from the final scores: the architecture the next forward would use,
        padded without balance, narrowed by :func:`fit_budget` when above the budget. Returns the
        selection, its ``info`` entries and its MACs."""
        cfg, space, ctx = run.cfg, run.space, run.ctx
        decision: dict[str, Any] = {}
        # the architecture the next forward would use: the same rule as dimension_masks
        arch: dict[str, int] = {}
        raw_widths: dict[str, float] = {}
        for label, d in space.dims.items():
            counts = (scores[label].reshape(d.heads, d.max_width) > cfg.tau).sum(1)  # (H,)
            raw_widths[label] = float(counts.sum()) / d.heads
            if _always_balanced(cfg, space, label):
                arch[label] = nearest_width(raw_widths[label], d)
            else:  # pad every head to the widest one, each with its next-best channels
                arch[label] = padded_width(int(counts.max()), d)
        searched_macs = float(analytic_cost(space, arch).macs)
        if not cfg.balance:
            raw_macs = float(analytic_cost(space, raw_widths).macs)
            decision.update(padded=True, raw_macs=raw_macs, padded_macs_before_fixup=searched_macs)
            log.info(
                "unbalanced search: the raw masks cost %.4g MACs, padded to equal heads %.4g",
                raw_macs,
                searched_macs,
            )
        widths, removed = fit_budget(space, scores, arch, run.target)
        if removed:
            log.warning(
                "the searched architecture costs %.4g MACs, above the target of %.4g: removed %d width "
                "step(s) head-balanced, lowest score per MAC first",
                searched_macs,
                run.target,
                len(removed),
            )
        selection = space.selection_from_scores(scores, widths)
        macs = float(analytic_cost(space, selection.architecture()).macs)
        dense = float(ctx.dense_macs)
        decision.update(
            macs=macs,
            macs_ratio=macs / dense,
            searched_macs_ratio=searched_macs / dense,
            under_budget=(run.target - macs) / dense,
            fixup=bool(removed),
            fixup_steps=removed,
        )
        return selection, decision, macs
