"""The similarity_indicator strategy (METHOD.md sections 3.1-3.7)."""

from __future__ import annotations

import copy
import re
import shutil
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, TensorDataset

from nas_headprune.errors import ArchitectureError, CheckpointError, ConfigError, NonFiniteLossError
from nas_headprune.evaluator.cost import analytic_cost, linear_attention_macs
from nas_headprune.evaluator.materialize import materialize
from nas_headprune.registry import make_strategy
from nas_headprune.space import LayerSpace, build_space
from nas_headprune.spaces._fused_qkv import FusedQkvAdapter
from nas_headprune.spaces.timm_vit import TimmMlpAdapter
from nas_headprune.strategies.similarity_indicator import (
    CHECKPOINT_NAME,
    SimilarityIndicator,
    allowed_widths,
    attention_difference_scores,
    channel_gram,
    dimension_masks,
    fit_budget,
    indicator_init_from_difference,
    load_searched_weights,
    nearest_width,
    nearest_width_tensor,
    query_subset,
    similarity_weights,
    weights_from_gram,
)
from nas_headprune.strategies.similarity_indicator.state import _Batches
from nas_headprune.strategy import SearchContext, validate_result
from nas_headprune.testing import run_conformance, tiny_context

FAST = {"steps": 4, "calib_batches_for_similarity": 1, "checkpoint_every": 0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these models are tiny: with more threads each op mostly waits on the others (and on shared
    # cores, on other processes), which makes a search many times slower
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Recording(SimilarityIndicator):
    """Records the hard masks of every step; optionally raises after a given step."""

    def __init__(self, config=None, stop_after: int | None = None) -> None:
        super().__init__(config)
        self.masks: dict[int, dict[str, torch.Tensor]] = {}
        self.stop_after = stop_after

    def search(self, ctx: SearchContext):
        return super().search(replace(ctx, on_step=self._record))

    def _record(self, step, masks) -> None:
        self.masks[step] = {k: v.clone() for k, v in masks.items()}
        if self.stop_after is not None and step >= self.stop_after:
            raise KeyboardInterrupt(f"test interrupt after step {step}")


def _head_counts(ctx: SearchContext, label: str, mask: torch.Tensor) -> list[int]:
    d = ctx.space.dims[label]
    return mask.reshape(d.heads, d.max_width).sum(1).int().tolist()


# ----------------------------------------------------------------------------- plugin contract


def test_conformance() -> None:
    run_conformance("similarity_indicator", FAST)


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ConfigError, match=r"strategy_options\.alpah: unknown key; valid keys here: .*alpha"):
        make_strategy("similarity_indicator", {"alpah": 0.5})
    with pytest.raises(
        ConfigError,
        match=r"strategy_options\.similarity: Input should be 'none', 'redundancy' or 'alignment'",
    ):
        make_strategy("similarity_indicator", {"similarity": "cosine"})
    with pytest.raises(
        ConfigError, match=r"strategy_options\.steps: Input should be greater than or equal to 0"
    ):
        make_strategy("similarity_indicator", {"steps": -1})
    fields = SimilarityIndicator.Config.model_fields
    assert all(f.description for f in fields.values())


# ------------------------------------------------------------------------ 3.3 head balance


def test_masks_are_head_balanced_at_every_step() -> None:
    ctx = tiny_context(budget=0.5)
    strategy = Recording({"steps": 60, "lr_indicator": 0.05, "checkpoint_every": 0})
    result = strategy.search(ctx)
    assert len(strategy.masks) == 60
    pruned_steps = 0
    for step, masks in strategy.masks.items():
        for label, mask in masks.items():
            if ctx.space.layer_of(label).kind != "attention":
                continue
            counts = _head_counts(ctx, label, mask)
            assert len(set(counts)) == 1, f"step {step}: {label} is unbalanced: {counts}"
        pruned_steps += any(float(m.sum()) < m.numel() for m in masks.values())
    assert pruned_steps > 10  # the masks really did prune during the search
    selection, cost = validate_result("similarity_indicator", ctx, result)
    assert float(cost.macs) <= ctx.target_macs


def test_unbalanced_masks_are_padded_and_reported() -> None:
    ctx = tiny_context(budget=0.6)
    strategy = Recording({"steps": 60, "lr_indicator": 0.05, "balance": False, "checkpoint_every": 0})
    result = strategy.search(ctx)
    unequal = [
        (step, label)
        for step, masks in strategy.masks.items()
        for label, mask in masks.items()
        if ctx.space.layer_of(label).kind == "attention" and len(set(_head_counts(ctx, label, mask))) > 1
    ]
    assert unequal, "balance=false should let heads keep different numbers of channels"
    info = result.info
    assert info["padded"] is True
    assert info["padded_macs_before_fixup"] >= info["raw_macs"]  # padding to the widest head costs
    selection, cost = validate_result("similarity_indicator", ctx, result)  # padded: balanced
    assert result.reported_macs == pytest.approx(float(cost.macs))
    assert result.reported_macs <= ctx.target_macs


def test_balanced_final_selection_is_the_last_architecture() -> None:
    ctx = tiny_context(budget=0.5)
    strategy = Recording({"steps": 80, "lr_indicator": 0.05, "checkpoint_every": 0, "lr_weights": 0.0})
    result = strategy.search(ctx)
    assert not result.info["fixup"]
    assert result.info["macs"] <= ctx.target_macs
    # without the fix-up the result is the head-balanced rule applied to the final scores: its widths
    # are those of a step's masks when the indicators have settled
    arch = ctx.space.selection(dict(result.selection.items())).architecture()
    last = strategy.masks[max(strategy.masks)]
    widths = {k: int(m.reshape(ctx.space.dims[k].heads, -1)[0].sum()) for k, m in last.items()}
    assert sum(abs(arch[k] - widths[k]) for k in arch) <= 2


# ------------------------------------------------------------------------- 3.2 similarity


def _brute_force_weights(z: torch.Tensor, reading: str) -> torch.Tensor:
    heads, d, _ = z.shape
    w = torch.zeros(heads, d, dtype=torch.float64)
    z = z.double()
    for h in range(heads):
        for j in range(d):
            if reading == "redundancy":
                sims = [F.cosine_similarity(z[h, i], z[h, j], dim=0).abs() for i in range(d) if i != j]
                w[h, j] = 1 - sum(sims) / (d - 1)
            else:
                w[h, j] = F.cosine_similarity(z[h, j], z[h].mean(0), dim=0).abs()
        w[h] /= w[h].mean()
    return w.float()


def test_similarity_readings_on_hand_made_activations() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 200, generator=gen)  # (H, d, T)
    z[0, 1] = z[0, 0]  # head 0: channels 0 and 1 identical
    z[1, 4] = -2.5 * z[1, 2]  # head 1: channels 2 and 4 equal up to scale and sign
    gram = channel_gram(z)
    red = weights_from_gram(gram, "redundancy")
    ali = weights_from_gram(gram, "alignment")
    torch.testing.assert_close(red, _brute_force_weights(z, "redundancy"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ali, _brute_force_weights(z, "alignment"), rtol=1e-5, atol=1e-5)
    assert set(red[0].argsort()[:2].tolist()) == {0, 1}  # the duplicated pair is cheapest to lose
    assert set(red[1].argsort()[:2].tolist()) == {2, 4}  # per head: head 1 has its own pair
    torch.testing.assert_close(red.mean(1), torch.ones(2))
    torch.testing.assert_close(ali.mean(1), torch.ones(2))
    assert (red - ali).abs().max() > 0.05  # the two readings differ
    # a channel that is zero on the calibration data carries nothing: weight 0
    z[0, 3] = 0
    assert weights_from_gram(channel_gram(z), "redundancy")[0, 3] == 0
    assert weights_from_gram(channel_gram(z), "alignment")[0, 3] == 0


def test_similarity_weights_read_q_k_v_and_mlp_hidden_activations() -> None:
    ctx = tiny_context()
    model = ctx.model
    batch = ctx.calib[0]
    weights = similarity_weights(model, ctx.space, [batch], "redundancy")
    seen = {}
    attn, mlp = model.blocks[1].attn, model.blocks[1].mlp
    hooks = [
        attn.register_forward_pre_hook(lambda m, a: seen.__setitem__("attn", a[0])),
        mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp", a[0])),
    ]
    with torch.no_grad():
        model(batch[0])
        for h in hooks:
            h.remove()
        heads = attn.num_heads
        q, k, v = rearrange(attn.qkv(seen["attn"]), "b n (t h d) -> t h d (b n)", t=3, h=heads)
        hidden = rearrange(mlp.act(mlp.fc1(seen["mlp"])), "b n m -> 1 m (b n)")
    expect_qk = weights_from_gram(channel_gram(torch.cat([q, k], dim=-1)), "redundancy")
    expect_v = weights_from_gram(channel_gram(v), "redundancy")
    expect_hidden = weights_from_gram(channel_gram(hidden), "redundancy")[0]
    torch.testing.assert_close(weights["blocks.1.attn:qk"], expect_qk, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weights["blocks.1.attn:v"], expect_v, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weights["blocks.1.mlp:hidden"], expect_hidden, rtol=1e-4, atol=1e-5)


def test_alpha_zero_reproduces_the_plain_indicator() -> None:
    runs = {}
    for name, opts in {
        "none": {"similarity": "none"},
        "alpha0": {"similarity": "redundancy", "alpha": 0.0},
        "alpha0_additive": {"similarity": "alignment", "alpha": 0.0, "combine": "additive"},
        "alpha1": {"similarity": "redundancy", "alpha": 1.0},
    }.items():
        strategy = Recording({"steps": 40, "lr_indicator": 0.05, "checkpoint_every": 0, **opts})
        runs[name] = (strategy.search(tiny_context(budget=0.5)), strategy.masks)

    def same(a, b) -> bool:
        return a[0].selection == b[0].selection and all(
            torch.equal(a[1][s][k], b[1][s][k]) for s in a[1] for k in a[1][s]
        )

    assert same(runs["none"], runs["alpha0"])
    assert same(runs["none"], runs["alpha0_additive"])
    assert all(
        torch.equal(runs["none"][0].scales[k], runs["alpha0"][0].scales[k]) for k in runs["none"][0].scales
    )
    assert not same(runs["none"], runs["alpha1"])  # the weights do change the search


# ---------------------------------------------------------------------------- 3.4 reweight


@pytest.mark.parametrize("model", ["vit", "swin"])
def test_folded_scales_equal_the_masked_model(model: str) -> None:
    ctx = tiny_context(budget=0.6, model=model)
    result = make_strategy(
        "similarity_indicator", {"steps": 15, "lr_scales": 0.05, "checkpoint_every": 0}
    ).search(ctx)
    space, selection = ctx.space, ctx.space.selection(dict(result.selection.items()))
    attention = [k for k in space.dims if space.layer_of(k).kind == "attention"]
    assert result.scales is not None and set(result.scales) == set(attention)
    assert max(float((s - 1).abs().max()) for s in result.scales.values()) > 0.05  # they were trained
    masks = space.masks_from_selection(selection)
    for label, s in result.scales.items():
        if label.endswith(":qk"):
            masks[label + "@q"] = s
        else:
            masks[label] = masks[label] * s
    x = torch.randn(4, *space.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with space.apply_masks(ctx.model, masks):
            masked = ctx.model(x)
        folded = materialize(ctx.model, space, selection, scales=result.scales)(x)
    assert (masked - folded).abs().max().item() < 1e-5


# ------------------------------------------------------------------------ 3.6 the objective


def test_macs_penalty_drives_the_architecture_to_the_budget() -> None:
    ctx = tiny_context(budget=0.5)
    # every indicator starts at 1.0 and the penalty is on from the first step (no warm-up)
    uniform = {"init_other": "uniform", "lam_warmup": 0.0}
    result = make_strategy("similarity_indicator", {"steps": 100, "checkpoint_every": 0, **uniform}).search(
        ctx
    )
    info = result.info
    assert info["first_step_within_budget"] is not None
    assert not info["fixup"], "the penalty alone should have met the budget"
    assert 0.4 <= info["macs_ratio"] <= 0.5
    assert info["under_budget"] == pytest.approx(0.5 - info["macs_ratio"])
    assert info["loss"]["macs_ratio_to_target_trace"][0] == pytest.approx(2.0, rel=1e-3)  # dense / target
    # without the penalty nothing pushes the indicators down: the fix-up has to meet the budget
    free = make_strategy(
        "similarity_indicator", {"steps": 30, "lam": 0.0, "checkpoint_every": 0, **uniform}
    ).search(ctx)
    assert free.info["fixup"] and free.info["fixup_steps"]
    assert free.info["searched_macs_ratio"] > 0.9
    validate_result("similarity_indicator", ctx, free)


def test_fit_budget_removes_the_lowest_score_per_mac_head_balanced() -> None:
    ctx = tiny_context(budget=0.85)
    space = ctx.space
    scores = {k: torch.ones(d.heads, d.max_width) for k, d in space.dims.items()}
    scores = {k: (v[0] if space.layer_of(k).kind == "mlp" else v) for k, v in scores.items()}
    scores["blocks.1.attn:v"] = torch.full((4, 8), 0.01)  # nearly worthless value channels
    widths, removed = fit_budget(space, scores, space.dense(), ctx.target_macs)
    assert float(analytic_cost(space, widths).macs) <= ctx.target_macs
    assert removed[0] == {"label": "blocks.1.attn:v", "from": 8, "to": 7}
    assert widths["blocks.1.attn:v"] < widths["blocks.0.attn:v"]


def _fit_budget_by_scan(space, scores, arch, target):
    """fit_budget's rule written as a plain scan: every step, look at every dimension in the space's
    order and take the first with the smallest score lost per MAC saved; recount the MACs."""
    from nas_headprune.space import HEADS

    widths = dict(arch)
    ranked = {
        k: torch.sort(scores[k].double().reshape(d.heads, d.max_width), dim=1, descending=True).values
        for k, d in space.dims.items()
    }
    while float(analytic_cost(space, widths).macs) > target:
        best = None
        for label, d in space.dims.items():
            smaller = [a for a in d.allowed() if a < widths[label]]
            if not smaller:
                continue
            layer = space.layer_of(label)
            cur = {k: widths[dd.label] for k, dd in layer.dims.items()}
            saved = float(layer.macs(cur)) - float(layer.macs({**cur, d.kind: smaller[-1]}))
            lost = float(ranked[label][:, smaller[-1] : widths[label]].sum())
            if d.kind == HEADS:
                lost *= sum(cur[dd.kind] for dd in layer.head_channel_dims())
            key = lost / max(saved, 1e-12)
            if best is None or key < best[0]:
                best = (key, label, smaller[-1])
        assert best is not None
        widths[best[1]] = best[2]
    return widths


@pytest.mark.parametrize("heads", [False, True])
def test_fit_budget_equals_a_plain_scan_with_ties(heads: bool) -> None:
    """The shared greedy trim gives fit_budget's steps, ties included (integer scores tie often),
    from dense and from narrower starting widths."""
    ctx = tiny_context()
    space = ctx.space.with_heads() if heads else ctx.space
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        scores = {
            k: torch.randint(0, 3, (d.heads * d.max_width,), generator=g).float()
            for k, d in space.dims.items()
        }
        start = space.sample(seed) if seed % 2 else space.dense()
        for frac in (0.3, 0.6):
            target = frac * ctx.dense_macs
            if float(analytic_cost(space, space.smallest()).macs) > target:
                continue
            widths, removed = fit_budget(space, scores, start, target)
            assert widths == _fit_budget_by_scan(space, scores, start, target)
            assert len(removed) == sum(
                sum(1 for a in space.dims[k].allowed() if w <= a < start[k]) for k, w in widths.items()
            )


def test_unreachable_budget_is_a_usage_error() -> None:
    from nas_headprune.allocate import BudgetError

    with pytest.raises(BudgetError, match="cannot be met"):
        make_strategy("similarity_indicator", FAST).search(tiny_context(budget=0.01))


# ---------------------------------------------------------------------- 3.7 state and resume


def _loader_context(budget: float = 0.5) -> SearchContext:
    ctx = tiny_context(budget=budget)
    gen = torch.Generator().manual_seed(7)
    data = TensorDataset(
        torch.randn(40, *ctx.space.input_size, generator=gen), torch.randint(0, 5, (40,), generator=gen)
    )
    ctx.train_loader = DataLoader(
        data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(5)
    )
    return ctx


def test_resume_after_interruption_equals_an_uninterrupted_search(tmp_path) -> None:
    config = {"steps": 14, "lr_indicator": 0.08, "lr_scales": 0.02, "checkpoint_every": 3}
    ctx = _loader_context()  # 5 batches per epoch: the search crosses epochs
    loader_state = ctx.train_loader.generator.get_state()

    ctx.work_dir = tmp_path / "reference"
    reference = Recording(config)
    expected = reference.search(ctx)
    assert torch.equal(ctx.train_loader.generator.get_state(), loader_state)  # left as it was

    ctx.work_dir = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        Recording(config, stop_after=8).search(ctx)
    saved = torch.load(ctx.work_dir / CHECKPOINT_NAME, weights_only=True)
    assert saved["step"] == 6  # the last checkpoint before the interruption
    resumed = Recording(config)
    result = resumed.search(ctx)

    assert result.info["resumed_from_step"] == 6
    assert sorted(resumed.masks) == list(range(7, 15))
    for step, masks in resumed.masks.items():
        assert all(torch.equal(masks[k], reference.masks[step][k]) for k in masks), f"step {step} differs"
    assert result.selection == expected.selection
    assert all(torch.equal(result.scales[k], expected.scales[k]) for k in expected.scales)
    skip = {"resumed_from_step", "trained_weights"}
    assert {k: v for k, v in result.info.items() if k not in skip} == {
        k: v for k, v in expected.info.items() if k not in skip
    }
    final_a = torch.load(tmp_path / "reference" / CHECKPOINT_NAME, weights_only=True)["model"]
    final_b = torch.load(ctx.work_dir / CHECKPOINT_NAME, weights_only=True)["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)  # the same trained weights
    # a finished search only re-finalises
    again = Recording(config)
    assert again.search(ctx).selection == expected.selection and not again.masks


def test_checkpoint_of_another_search_is_not_resumed(tmp_path) -> None:
    ctx = tiny_context(budget=0.5)
    ctx.work_dir = tmp_path
    make_strategy("similarity_indicator", {**FAST, "checkpoint_every": 2}).search(ctx)
    ctx_other = tiny_context(budget=0.7)
    ctx_other.work_dir = tmp_path
    strategy = Recording({**FAST, "checkpoint_every": 2})
    result = strategy.search(ctx_other)
    assert result.info["resumed_from_step"] is None and sorted(strategy.masks) == [1, 2, 3, 4]


# ------------------------------------------------ damaged checkpoints and diverging searches


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The work folder of a finished FAST search on ``tiny_context(budget=0.5)``."""
    work = tmp_path_factory.mktemp("search")
    ctx = tiny_context(budget=0.5)
    ctx.work_dir = work
    make_strategy("similarity_indicator", {**FAST, "checkpoint_every": 2}).search(ctx)
    return work


def _edit_state(edit):
    def damage(path: Path) -> None:
        state = torch.load(path, weights_only=True)
        edit(state)
        torch.save(state, path)

    return damage


def _first(mapping: dict) -> str:
    return sorted(mapping)[0]


SEARCH_DAMAGE = {
    "empty": (lambda p: p.write_bytes(b""), "cannot read the search checkpoint"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:1000]), "cannot read the search checkpoint"),
    "garbage": (lambda p: p.write_bytes(b"\xff not a checkpoint " * 9), "cannot read the search checkpoint"),
    "not-a-dict": (lambda p: torch.save([torch.zeros(2)], p), "holds a list, not a dict"),
    "missing-key": (_edit_state(lambda s: s.pop("optimizer")), "incomplete, it lacks optimizer"),
    "step-not-an-int": (_edit_state(lambda s: s.update(step="4")), "'step' has type str, expected int"),
    "indicator-missing": (
        _edit_state(lambda s: s["indicators"].pop(_first(s["indicators"]))),
        "indicators of 'blocks.0.attn:qk' is missing",
    ),
    "indicator-wrong-shape": (
        _edit_state(lambda s: s["indicators"].update({_first(s["indicators"]): torch.ones(3)})),
        "indicators of 'blocks.0.attn:qk' has shape (3,), expected (4, 8)",
    ),
    "weights-wrong-shape": (
        _edit_state(lambda s: s["model"].update({_first(s["model"]): torch.zeros(1)})),
        "damaged (RuntimeError",
    ),
    "history-damaged": (_edit_state(lambda s: s.update(history={})), "damaged (KeyError"),
}


@pytest.mark.parametrize("kind", sorted(SEARCH_DAMAGE))
def test_damaged_search_checkpoint_raises_naming_the_file(
    finished_search: Path, tmp_path: Path, kind: str
) -> None:
    damage, message = SEARCH_DAMAGE[kind]
    ctx = tiny_context(budget=0.5)
    ctx.work_dir = Path(shutil.copytree(finished_search, tmp_path / "work"))
    path = ctx.work_dir / CHECKPOINT_NAME
    damage(path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))) as info:
        make_strategy("similarity_indicator", {**FAST, "checkpoint_every": 2}).search(ctx)
    assert message in str(info.value) and "delete it to start over" in str(info.value)


@pytest.mark.parametrize("kind", ["empty", "garbage", "not-a-dict", "no-weights", "weights-wrong-shape"])
def test_damaged_search_checkpoint_in_load_searched_weights(
    finished_search: Path, tmp_path: Path, kind: str
) -> None:
    work = Path(shutil.copytree(finished_search, tmp_path / "work"))
    path = work / CHECKPOINT_NAME
    damage = {
        "no-weights": _edit_state(lambda s: s.pop("model")),
        **{k: v[0] for k, v in SEARCH_DAMAGE.items()},
    }[kind]
    damage(path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_searched_weights(tiny_context(budget=0.5).model, work)


def test_diverging_search_stops_and_keeps_the_last_finite_checkpoint(tmp_path) -> None:
    ctx = tiny_context(budget=0.5)
    ctx.work_dir = tmp_path
    # lr_weights=1e30: the first step moves every weight by about 1e30, the next forward overflows
    strategy = Recording({**FAST, "checkpoint_every": 1, "lr_weights": 1e30})
    with pytest.raises(NonFiniteLossError, match=r"search loss is nan at step 2 of 4") as info:
        strategy.search(ctx)
    assert "strategy_options.lr_weights (now 1e+30)" in str(info.value)
    assert sorted(strategy.masks) == [1]  # step 2 ended in the error, before its hook and checkpoint
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["step"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values())


# ------------------------------------------------------ 3.5 linear attention initialisation


def _amap(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Row-normalised linear attention map; an all-zero row stays zero."""
    s = q @ k.transpose(-2, -1)  # (B, H, N, N)
    r = s.sum(-1, keepdim=True)
    return torch.where(r > 0, s / r.clamp_min(1e-30), torch.zeros_like(s))


class ToyLinearAttention(nn.Module):
    """A hand-written linear attention: phi = ReLU, O = phi(Q) (phi(K)^T V) / (phi(Q) sum phi(K))."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = rearrange(self.qkv(x), "b n (t h d) -> t b h n d", t=3, h=self.num_heads)
        return F.relu(q), F.relu(k), v

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        phi_q, phi_k, _ = self.features(x)
        return _amap(phi_q, phi_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phi_q, phi_k, v = self.features(x)
        kv = phi_k.transpose(-2, -1) @ v  # (B, H, d, d)
        norm = phi_q @ phi_k.sum(2, keepdim=True).transpose(-2, -1)  # (B, H, N, 1)
        out = (phi_q @ kv) / (norm + 1e-6)  # (B, H, N, d)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


def test_attention_difference_equals_removing_the_channel_from_a_layer() -> None:
    torch.manual_seed(0)
    layer = ToyLinearAttention(dim=16, heads=2)
    x = torch.randn(3, 20, 16)
    with torch.no_grad():
        phi_q, phi_k, _ = layer.features(x)
        diff = attention_difference_scores(phi_q, phi_k, max_query_tokens=20)
        dense_map = layer.attention_map(x)
        expected = torch.zeros(2, 8)
        for h in range(2):
            for j in range(8):
                pruned = copy.deepcopy(layer)
                for part in (0, 1):  # the q row and the k row of channel j of head h
                    row = part * 16 + h * 8 + j
                    pruned.qkv.weight[row] = 0
                    pruned.qkv.bias[row] = 0
                pruned_map = pruned.attention_map(x)
                expected[h, j] = (dense_map[:, h] - pruned_map[:, h]).norm() / dense_map[:, h].norm()
    torch.testing.assert_close(diff, expected, rtol=1e-4, atol=1e-6)


def test_attention_difference_zero_channel_and_init() -> None:
    gen = torch.Generator().manual_seed(0)
    phi_q = torch.rand(2, 2, 12, 6, generator=gen)
    phi_k = torch.rand(2, 2, 12, 6, generator=gen)
    phi_k[..., 4] = 0  # channel 4 never contributes to the map
    diff = attention_difference_scores(phi_q, phi_k, 64)
    assert (diff[:, 4] == 0).all() and (diff[:, 4] < diff[:, [0, 1, 2, 3, 5]].min(1).values).all()
    init = indicator_init_from_difference(diff, tau=0.5, margin=0.4)
    assert init.min() == pytest.approx(0.5) and init.max() == pytest.approx(0.9)
    assert (init.argsort(dim=1) == diff.argsort(dim=1)).all()  # larger D starts safer
    assert torch.equal(indicator_init_from_difference(torch.ones(2, 3), 0.5, 0.4), torch.full((2, 3), 0.9))


def test_rank_scaled_init_spreads_a_skewed_difference() -> None:
    # one channel dominates D: min-max leaves the rest near tau, rank spreads them over the margin
    diff = torch.tensor([[0.1, 5.0, 0.1], [0.2, 0.3, 0.0]])
    minmax = indicator_init_from_difference(diff, 0.5, 0.5)
    ranked = indicator_init_from_difference(diff, 0.5, 0.5, scale="rank")
    assert (minmax.flatten().sort().values[:5] < 0.531).all()
    # sorted D: 0.0, 0.1, 0.1, 0.2, 0.3, 5.0 -> ranks 0, 1.5, 1.5, 3, 4, 5 over 5
    expected = torch.tensor([[0.65, 1.0, 0.65], [0.8, 0.9, 0.5]])
    torch.testing.assert_close(ranked, expected)
    assert torch.equal(
        indicator_init_from_difference(torch.ones(2, 3), 0.5, 0.4, scale="rank"), torch.full((2, 3), 0.9)
    )


class _MaxTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_attention_difference_query_subsampling_and_memory_bound() -> None:
    gen = torch.Generator().manual_seed(3)
    phi_q = torch.rand(1, 2, 96, 4, generator=gen)
    phi_k = torch.rand(1, 2, 96, 4, generator=gen)
    full = attention_difference_scores(phi_q, phi_k, max_query_tokens=96)
    torch.testing.assert_close(attention_difference_scores(phi_q, phi_k, max_query_tokens=500), full)

    def reference(rows: torch.Tensor) -> torch.Tensor:
        a = _amap(phi_q.double(), phi_k.double())[:, :, rows]  # (B, H, Q, N)
        out = torch.zeros(2, 4, dtype=torch.float64)
        for j in range(4):
            keep = torch.ones(4, dtype=torch.float64)
            keep[j] = 0
            aj = _amap(phi_q.double() * keep, phi_k.double() * keep)[:, :, rows]
            out[:, j] = (a - aj).square().sum((0, 2, 3)).sqrt() / a.square().sum((0, 2, 3)).sqrt()
        return out.float()

    torch.testing.assert_close(full, reference(torch.arange(96)), rtol=1e-4, atol=1e-6)
    rows = query_subset(96, 10, torch.Generator().manual_seed(11))
    assert rows.numel() == 10 and rows.unique().numel() == 10
    sub = attention_difference_scores(phi_q, phi_k, 10, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(sub, reference(rows), rtol=1e-4, atol=1e-6)
    with _MaxTensor() as probe:
        attention_difference_scores(phi_q, phi_k, 10)
    # nothing larger than the inputs: not even one head's (queries x N) block
    assert probe.largest <= phi_k.numel() < 10 * 96


class ToyLinearAdapter(FusedQkvAdapter):
    """A linear-attention adapter for the toy layer: fused-qkv masks, the linear-attention cost."""

    name = "toy_linear_attention"
    attention_kind = "linear"

    def claims(self, module: nn.Module) -> bool:
        return type(module) is ToyLinearAttention

    def describe(self, label: str, module: nn.Module, tokens: int) -> LayerSpace:
        meta = {**self._meta(module, tokens, kv_tokens=tokens), "attention": "linear"}
        return LayerSpace(label, self.name, self.kind, self._dims(label, module), meta, self)

    def macs(self, layer, widths):
        m = layer.meta
        return linear_attention_macs(
            m["tokens"], m["embed_dim"], m["out_dim"], layer.dims["qk"].heads, widths["qk"], widths["v"], 0
        )

    def build_pruned(self, module, layer, widths, params):  # not needed by the search
        raise NotImplementedError

    def fold_scales(self, layer, widths, params, scales):
        if "qk" in scales:
            raise ArchitectureError("the feature map sits between the q projection and its use")
        return super().fold_scales(layer, widths, params, scales)  # values: exact in the v rows

    def focused_features(self, module: ToyLinearAttention, x: torch.Tensor):
        phi_q, phi_k, _ = module.features(x)
        return phi_q, phi_k


class ToyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.attn = ToyLinearAttention(16, 2)
        self.mlp = Mlp(16, 32)
        self.head = nn.Linear(16, 3)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.embed(rearrange(img, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2))  # (B, 16, 4)
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return self.head(x.mean(1))


def _toy_linear_context(work_dir: Path) -> SearchContext:
    """A search context over :class:`ToyNet` (one linear-attention layer and an MLP), 2 calibration
    batches; the same model, space and batches on every call."""
    torch.manual_seed(0)
    model = ToyNet().eval()
    space = build_space(model, (1, 8, 8), adapters=[ToyLinearAdapter(), TimmMlpAdapter()])
    gen = torch.Generator().manual_seed(1)
    calib = [
        (torch.randn(6, 1, 8, 8, generator=gen), torch.randint(0, 3, (6,), generator=gen)) for _ in range(2)
    ]
    return SearchContext(
        model=model,
        space=space,
        budget=0.7,
        dense_macs=int(analytic_cost(space).macs),
        calib=calib,
        seed=0,
        work_dir=work_dir,
    )


def test_linear_attention_layers_start_from_the_attention_difference(tmp_path) -> None:
    ctx = _toy_linear_context(tmp_path)
    model, calib = ctx.model, ctx.calib
    # the other indicators start at 1.0, so only the attention difference shapes the start
    config = {"init": "attention_difference", "init_margin": 0.3, "steps": 0, "init_other": "uniform"}
    result = make_strategy("similarity_indicator", config).search(ctx)
    indicators = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["indicators"]

    seen = []
    hook = model.attn.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for x, _ in calib:
            model(x)
    hook.remove()
    with torch.no_grad():
        phi_q, phi_k = ToyLinearAdapter().focused_features(model.attn, torch.cat(seen))
    diff = attention_difference_scores(phi_q, phi_k, 256)
    torch.testing.assert_close(indicators["attn:qk"], indicator_init_from_difference(diff, 0.5, 0.3, "rank"))
    assert torch.equal(indicators["attn:v"], torch.ones(2, 8))  # only q/k shape the map
    assert torch.equal(indicators["mlp:hidden"], torch.ones(32))
    assert result.info["init_layers"] == ["attn"]
    assert result.info["scales_left_out"] == ["attn:qk"]  # the adapter folds value scales only
    assert set(result.scales) == {"attn:v"}
    # and the search runs on it
    trained = make_strategy("similarity_indicator", {**config, "steps": 10, "checkpoint_every": 0})
    ctx.work_dir = None
    validate_result("similarity_indicator", ctx, trained.search(ctx))


def test_shuffled_difference_deals_the_same_starts_in_another_seeded_order(tmp_path) -> None:
    def start(init: str, run: str) -> torch.Tensor:
        config = {"init": init, "init_scale": "rank", "steps": 0}
        make_strategy("similarity_indicator", config).search(_toy_linear_context(tmp_path / run))
        return torch.load(tmp_path / run / CHECKPOINT_NAME, weights_only=True)["indicators"]["attn:qk"]

    ordered = start("attention_difference", "a")
    shuffled = start("shuffled_difference", "b")
    assert torch.equal(ordered.flatten().sort().values, shuffled.flatten().sort().values)
    assert not torch.equal(ordered, shuffled)
    assert torch.equal(shuffled, start("shuffled_difference", "c"))  # seeded


def test_distillation_frozen_weights_progress_and_json_info(tmp_path) -> None:
    import json

    from nas_headprune.strategies.similarity_indicator import load_searched_weights

    ctx = tiny_context(budget=0.6)
    ctx.progress = True
    result = make_strategy("similarity_indicator", {"steps": 3, "distill": True}).search(ctx)
    validate_result("similarity_indicator", ctx, result)
    json.dumps(result.info)  # recorded as is by the runner

    ctx.work_dir = tmp_path
    frozen = make_strategy("similarity_indicator", {"steps": 5, "train_weights": False}).search(ctx)
    assert frozen.info["trained_weights"] is False and frozen.weights is None
    kept = load_searched_weights(ctx.model, tmp_path).state_dict()
    assert all(torch.equal(v, kept[k]) for k, v in ctx.model.state_dict().items())

    trained = make_strategy("similarity_indicator", {"steps": 5, "lr_weights": 1e-2}).search(ctx)
    assert trained.info["trained_weights"] is True and trained.weights is not None
    changed = load_searched_weights(ctx.model, tmp_path).state_dict()
    assert any(not torch.equal(v, changed[k]) for k, v in ctx.model.state_dict().items())
    assert all(torch.equal(trained.weights[k], v) for k, v in changed.items())


def test_attention_difference_init_on_a_flatten_model() -> None:
    from nas_headprune.evaluator.measure import measure_macs
    from nas_headprune.models.factory import create_model

    torch.manual_seed(0)
    model = create_model("flatten_swin_mnist").eval()
    space = build_space(model, (1, 28, 28))
    linear = sorted(name for name, layer in space.layers.items() if layer.meta.get("attention") == "linear")
    assert linear  # stage 1 is focused linear attention
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randn(4, 1, 28, 28, generator=gen), torch.randint(0, 10, (4,), generator=gen))]
    ctx = SearchContext(model, space, 0.7, measure_macs(model, (1, 28, 28)), calib, seed=0)
    result = make_strategy("similarity_indicator", {"steps": 2, "init": "attention_difference"}).search(ctx)
    assert result.info["init_layers"] == linear
    assert result.info["init_skipped"] == []
    validate_result("similarity_indicator", ctx, result)


# ------------------------------------------------------ mixed precision, host syncs, torchrun parts


def test_amp_switch_is_validated_and_changes_nothing_on_the_cpu(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"strategy_options\.amp: Input should be a valid boolean"):
        make_strategy("similarity_indicator", {"amp": "sometimes"})
    ctx = tiny_context(budget=0.5)
    ctx.work_dir = tmp_path
    config = {**FAST, "checkpoint_every": 2}
    with_amp = make_strategy("similarity_indicator", {**config, "amp": True}).search(ctx)
    assert "amp" not in with_amp.info  # no autocast on the CPU
    # the same fingerprint on the CPU: the finished search is only re-finalised
    again = Recording({**config, "amp": False})
    without = again.search(ctx)
    assert not again.masks and without.info["resumed_from_step"] == 4
    ctx.work_dir = None
    fresh = make_strategy("similarity_indicator", {**config, "amp": False}).search(ctx)
    assert fresh.selection == with_amp.selection
    assert all(torch.equal(fresh.scales[k], v) for k, v in with_amp.scales.items())
    assert all(torch.equal(fresh.weights[k], v) for k, v in with_amp.weights.items())


def test_non_finite_loss_stops_at_the_next_sync_before_any_checkpoint(tmp_path) -> None:
    ctx = tiny_context(budget=0.5)
    ctx.work_dir = tmp_path
    # 40 steps: values are read every 4 steps and before the checkpoint of step 3; the loss turns
    # NaN at step 2 (lr_weights=1e30), which is named, and the checkpoint of step 3 is not written
    strategy = Recording(
        {"steps": 40, "checkpoint_every": 3, "lr_weights": 1e30, "calib_batches_for_similarity": 1}
    )
    with pytest.raises(NonFiniteLossError, match=r"search loss is nan at step 2 of 40"):
        strategy.search(ctx)
    assert sorted(strategy.masks) == [1, 2]  # step 3 ended in the error, before its hook
    assert not (tmp_path / CHECKPOINT_NAME).exists()
    ctx.work_dir = None
    strategy = Recording(
        {"steps": 40, "checkpoint_every": 0, "lr_weights": 1e30, "calib_batches_for_similarity": 1}
    )
    with pytest.raises(NonFiniteLossError, match=r"search loss is nan at step 2 of 40"):
        strategy.search(ctx)
    assert sorted(strategy.masks) == [1, 2, 3]  # read at step 4, the logging cadence


_SYNCS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__bool__,
    torch.Tensor.__index__,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
}


class _SyncProbe(TorchFunctionMode):
    """Records the calls that read a tensor back to the host (a device sync on a GPU), by the step
    that was running; the optimizer's own reads of its CPU step counters are left out."""

    def __init__(self) -> None:
        super().__init__()
        self.step = 0
        self.calls: dict[int, list[str]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SYNCS and not any("torch/optim/" in f.filename for f in traceback.extract_stack()):
            self.calls.setdefault(self.step, []).append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_the_search_loop_reads_values_back_only_at_the_logging_cadence() -> None:
    probe = _SyncProbe()

    def next_step(step, masks) -> None:
        probe.step = step + 1  # what follows belongs to the next step

    with probe:
        SimilarityIndicator({"steps": 40, "checkpoint_every": 0, "calib_batches_for_similarity": 1}).search(
            replace(tiny_context(budget=0.5), on_step=next_step)
        )
    in_loop = {step: names for step, names in probe.calls.items() if 2 <= step <= 40}
    assert set(in_loop) == set(range(4, 41, 4))  # log_every = steps // 10
    assert all(names == ["tolist"] for names in in_loop.values())


def test_device_masks_follow_the_host_rule() -> None:
    from nas_headprune.space import DimSpec

    for spec in (DimSpec("a:qk", "qk", 3, 8, 1, 1), DimSpec("b:v", "v", 4, 16, 4, 2)):
        allowed = allowed_widths(spec)
        for count in range(spec.heads * spec.max_width + 1):
            expected = nearest_width(count / spec.heads, spec)
            assert int(nearest_width_tensor(torch.tensor(count), spec.heads, allowed)) == expected
    spec = DimSpec("c:qk", "qk", 3, 8, 1, 1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        score = torch.randint(0, 4, (3, 8), generator=gen).float() / 3  # many ties
        hard, ste, width = dimension_masks(score, spec, 0.5, True)
        w = nearest_width(float((score > 0.5).sum()) / 3, spec)
        order = torch.sort(-score, dim=1, stable=True).indices[:, :w]
        assert torch.equal(hard, torch.zeros_like(score).scatter_(1, order, 1.0))
        assert float(width) == w and torch.equal(ste, hard)


class _ThreadRanks:
    """A fake group of processes for the reductions: one thread per rank, meeting at a barrier."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: dict[int, list[torch.Tensor]] = {}

    def rank(self, r: int):
        ranks = self

        class Reducer:
            def sum_(self, tensors):
                ranks._reduce(r, tensors, lambda x: x.sum(0))

            def max_(self, tensors):
                ranks._reduce(r, tensors, lambda x: x.amax(0))

        return Reducer()

    def _reduce(self, r, tensors, op) -> None:
        self.slots[r] = [t.clone() for t in tensors]
        self.barrier.wait()
        together = [
            op(torch.stack([self.slots[k][i] for k in range(self.world)])) for i in range(len(tensors))
        ]
        self.barrier.wait()
        for t, value in zip(tensors, together, strict=True):
            t.copy_(value)


def test_calibration_statistics_summed_over_a_split_equal_the_whole() -> None:
    ctx = tiny_context(budget=0.5)
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, *ctx.space.input_size, generator=gen),) for _ in range(4)]
    whole = similarity_weights(ctx.model, ctx.space, batches, "redundancy")
    ranks = _ThreadRanks(2)
    models = [copy.deepcopy(ctx.model) for _ in range(2)]  # each thread hooks its own copy

    def part(r: int):
        return similarity_weights(models[r], ctx.space, batches[r::2], "redundancy", reduce=ranks.rank(r))

    with ThreadPoolExecutor(2) as pool:
        split = list(pool.map(part, range(2)))
    for label, expected in whole.items():
        for got in split:
            torch.testing.assert_close(got[label], expected, rtol=0, atol=1e-5)

    phi_q = torch.randn(6, 2, 40, 8, generator=gen).relu()
    phi_k = torch.randn(6, 2, 40, 8, generator=gen).relu()
    phi_q[0] = 0  # an image without attention: its rows are left out on both sides
    whole_d = attention_difference_scores(phi_q, phi_k, 16, generator=torch.Generator().manual_seed(5))

    def part_d(r: int):
        return attention_difference_scores(
            phi_q[r::2], phi_k[r::2], 16, generator=torch.Generator().manual_seed(5), reduce=ranks.rank(r)
        )

    with ThreadPoolExecutor(2) as pool:
        split_d = list(pool.map(part_d, range(2)))
    for got in split_d:
        torch.testing.assert_close(got, whole_d, rtol=1e-5, atol=1e-6)


def test_the_data_position_is_carried_across_world_sizes() -> None:
    calib = [(torch.full((1,), float(i)), torch.zeros(1)) for i in range(5)]
    rank1 = _Batches(SimpleNamespace(train_loader=None, calib=calib, rank=1, world_size=2))
    assert [int(rank1.next()[0]) for _ in range(3)] == [1, 3, 0]  # batch (i * 2 + 1) % 5
    one = _Batches(SimpleNamespace(train_loader=None, calib=calib, rank=0, world_size=1))
    one.restore(rank1.state())
    assert one.index == 6  # 3 steps of 2 ranks
    loader = DataLoader(TensorDataset(torch.arange(10.0)), batch_size=2)  # 5 batches an epoch
    batches = _Batches(SimpleNamespace(train_loader=loader, calib=[], rank=0, world_size=1))
    batches.restore({"epoch": 1, "index": 2, "start": None, "world_size": 2, "per_epoch": 5})
    assert (batches.epoch, batches.index) == (2, 4)  # (1 * 5 + 2) * 2 batches consumed
    assert batches.next()[0].tolist() == [8.0, 9.0]


# ------------------------------------------------- data-driven init, lr schedule, annealed penalty


def test_taylor_init_orders_the_indicators_like_the_taylor_scores() -> None:
    from nas_headprune.strategies.similarity_indicator import SimilarityIndicatorConfig
    from nas_headprune.strategies.similarity_indicator.init import _taylor_init
    from nas_headprune.strategies.taylor import Taylor

    ctx = tiny_context()
    cfg = SimilarityIndicatorConfig(init_other="taylor", calib_batches_for_similarity=2)
    start = _taylor_init(ctx.space, ctx, cfg)
    scores = Taylor().score(SearchContext(**{**ctx.__dict__, "calib": ctx.calib[:2]}))
    assert start.keys() == scores.keys() == ctx.space.dims.keys()
    for label, m0 in start.items():
        assert m0.shape == scores[label].shape
        assert float(m0.min()) >= cfg.tau and float(m0.max()) <= cfg.tau + cfg.init_margin + 1e-6
        flat_m, flat_s = m0.flatten(), scores[label].flatten()
        strictly = flat_s.unsqueeze(0) > flat_s.unsqueeze(1)  # pairs with a strictly higher score
        assert bool((flat_m.unsqueeze(0) > flat_m.unsqueeze(1))[strictly].all())
    shuffled = _taylor_init(ctx.space, ctx, cfg.model_copy(update={"init_other": "shuffled_taylor"}))
    for label in start:  # the control deals the same values in another order
        assert torch.equal(shuffled[label].flatten().sort().values, start[label].flatten().sort().values)
    assert any(not torch.equal(shuffled[k], start[k]) for k in start)


def test_taylor_init_changes_the_search_and_keeps_it_valid() -> None:
    ctx = tiny_context()
    base = {"steps": 3, "checkpoint_every": 0, "calib_batches_for_similarity": 2}
    plain = make_strategy("similarity_indicator", {**base, "init_other": "uniform"}).search(ctx)
    taylor = make_strategy("similarity_indicator", {**base, "init_other": "taylor"}).search(ctx)
    selection, _ = validate_result("similarity_indicator", ctx, taylor)
    assert selection.to_lists() != ctx.space.selection(dict(plain.selection.items())).to_lists()


def test_penalty_warmup_and_cosine_indicator_rate() -> None:
    from nas_headprune.strategies.similarity_indicator.config import (
        SimilarityIndicatorConfig,
        _indicator_lr,
        _lam,
    )

    cfg = SimilarityIndicatorConfig(
        steps=100, lam=10.0, lam_warmup=0.2, lr_schedule="cosine", lr_indicator=0.02
    )
    assert [_lam(cfg, s) for s in (0, 9, 19, 50)] == pytest.approx([0.5, 5.0, 10.0, 10.0])
    assert _lam(cfg.model_copy(update={"lam_warmup": 0.0}), 0) == 10.0
    assert _indicator_lr(cfg, 0) == pytest.approx(0.02)
    assert _indicator_lr(cfg, 50) == pytest.approx(0.01)
    assert _indicator_lr(cfg, 100) == pytest.approx(0.0, abs=1e-12)
    assert _indicator_lr(cfg.model_copy(update={"lr_schedule": "constant"}), 70) == 0.02
    with pytest.raises(ValueError):
        SimilarityIndicatorConfig(lam_warmup=1.5)


def test_search_with_cosine_rate_and_annealed_penalty_meets_the_budget() -> None:
    ctx = tiny_context()
    options = {"steps": 4, "checkpoint_every": 0, "lr_schedule": "cosine", "lam_warmup": 0.5}
    result = make_strategy("similarity_indicator", options).search(ctx)
    _, cost = validate_result("similarity_indicator", ctx, result)
    assert float(cost.macs) <= ctx.target_macs
