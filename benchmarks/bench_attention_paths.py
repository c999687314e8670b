"""Which attention path is fastest for the head widths pruning really produces?

    python benchmarks/bench_attention_paths.py [--report docs/results/attention_paths.md]

For every attention shape that occurs in the embedded Fashion-MNIST ViT pruned by ``magnitude`` and
``taylor`` to 0.5 and 0.7 of its MACs, and in a ViT-Ti/16 at 224x224 (random weights; dense and
pruned by ``magnitude`` to 0.5 and 0.7), this times the candidates of
``nas_headprune.spaces._fused_qkv.attend`` at batch 1 and 64:

- ``sdpa``: ``scaled_dot_product_attention`` as is, with unequal q/k and v widths;
- ``math``: ``softmax((q * scale) @ k^T) @ v`` in plain matmuls (today's CPU path for unequal widths);
- ``sdpa_padded``: the narrower of q/k and v zero-padded to the wider width, the fused kernel, the
  padded value columns cut off (the dense model's ``scale`` passed explicitly).

q, k and v are views of one ``qkv`` output, as in the model. Every candidate of one shape runs once
per round, in a rotated order (interleaved), and the table gives medians over the rounds with
torch on 1 thread. Each candidate is also compared with ``math`` (largest absolute difference). CUDA
rows are added when a GPU is present (not run here). The output is Markdown.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from nas_headprune.evaluator.measure import measure_macs  # noqa: E402
from nas_headprune.models.dense import embedded_dir, load_dense  # noqa: E402
from nas_headprune.models.factory import create_model  # noqa: E402
from nas_headprune.registry import make_strategy  # noqa: E402
from nas_headprune.space import HeadSpace, build_space  # noqa: E402
from nas_headprune.spaces._fused_qkv import ATTENTION_PATHS, attend, attention_path, split_qkv  # noqa: E402
from nas_headprune.strategy import SearchContext, validate_result  # noqa: E402

BATCHES = (1, 64)
#: a round of one candidate lasts at least this long (repeats of the call), for timer resolution
MIN_ROUND_S = 0.004


def _calibration() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The default config's calibration batches (Fashion-MNIST), as the search stage draws them."""
    from nas_headprune import data as data_mod
    from nas_headprune.config import load_config

    cfg = load_config("default", [])
    bundle = data_mod.load_datasets(cfg.data, seed=cfg.seed)
    return data_mod.calibration_batches(bundle, cfg.data, seed=cfg.seed)


def _pruned_widths(
    model: nn.Module, space: HeadSpace, strategy: str, budget: float, calib: list
) -> dict[str, tuple[int, int]]:
    """Per attention layer, ``(d_qk, d_v)`` of ``model`` pruned by ``strategy`` to ``budget``."""
    dense_macs = measure_macs(model, space.input_size)
    ctx = SearchContext(model=model, space=space, budget=budget, dense_macs=dense_macs, calib=calib, seed=0)
    # free widths (magnitude's defaults tie them in steps of 8): the unequal q/k and v widths this
    # benchmark is about, as in its committed run
    options = {"tie_qk_v": False, "width_step": 1}
    selection, _ = validate_result(strategy, ctx, make_strategy(strategy, options).search(ctx))
    arch = selection.architecture()
    return {
        name: (arch[f"{name}:qk"], arch[f"{name}:v"]) for name in space.layers if f"{name}:qk" in space.dims
    }


def attention_shapes() -> list[dict]:
    """Distinct (model, heads, tokens, d_qk, d_v) with the pruned models they occur in."""
    shapes: dict[tuple, dict] = {}

    def add(model_key: str, heads: int, tokens: int, d_qk: int, d_v: int, where: str) -> None:
        key = (model_key, heads, tokens, d_qk, d_v)
        entry = shapes.setdefault(
            key,
            {"model": model_key, "heads": heads, "tokens": tokens, "d_qk": d_qk, "d_v": d_v, "where": []},
        )
        if where not in entry["where"]:
            entry["where"].append(where)

    torch.manual_seed(0)
    embedded, record = load_dense(embedded_dir("embedded"))
    size = tuple(record["input_size"])
    space = build_space(embedded, size)
    calib = _calibration()
    for strategy in ("magnitude", "taylor"):
        for budget in (0.5, 0.7):
            for name, (d_qk, d_v) in _pruned_widths(embedded, space, strategy, budget, calib).items():
                layer = space.layers[name]
                add(
                    "vit_fmnist",
                    layer.dims["qk"].heads,
                    layer.meta["tokens"],
                    d_qk,
                    d_v,
                    f"{strategy} {budget}",
                )
    tiny = create_model("vit_tiny_patch16_224").eval()  # random weights
    tiny_space = build_space(tiny, (3, 224, 224))
    first = next(iter(tiny_space.layers.values()))
    heads, tokens, d = first.dims["qk"].heads, first.meta["tokens"], first.dims["qk"].max_width
    add("vit_tiny_224", heads, tokens, d, d, "dense")
    for budget in (0.5, 0.7):
        for _, (d_qk, d_v) in _pruned_widths(tiny, tiny_space, "magnitude", budget, []).items():
            add("vit_tiny_224", heads, tokens, d_qk, d_v, f"magnitude {budget}")
    return sorted(shapes.values(), key=lambda e: (e["model"], e["d_qk"] == e["d_v"], e["d_qk"], e["d_v"]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    calls: dict[str, Callable[[], object]], device: torch.device, rounds: int
) -> dict[str, float]:
    """Median seconds per call of each callable; one round runs each, in a rotated order."""
    names = list(calls)
    repeats = {}
    for name in names:  # warm-up, then size the repeats so that a round lasts MIN_ROUND_S
        calls[name]()
        _sync(device)
        start = time.perf_counter()
        calls[name]()
        _sync(device)
        repeats[name] = max(1, int(MIN_ROUND_S / max(time.perf_counter() - start, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            start = time.perf_counter()
            for _ in range(repeats[name]):
                calls[name]()
            _sync(device)
            times[name].append((time.perf_counter() - start) / repeats[name])
    return {name: statistics.median(t) for name, t in times.items()}


def measure_shape(shape: dict, batch: int, device: torch.device, rounds: int) -> dict:
    heads, tokens, d_qk, d_v = shape["heads"], shape["tokens"], shape["d_qk"], shape["d_v"]
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, tokens, heads * (2 * d_qk + d_v), generator=gen).to(
        device
    )  # (B, N, H*(2dqk+dv))
    q, k, v = split_qkv(qkv, heads, d_qk, d_v)  # views, as in the model
    scale = 24**-0.5 if shape["model"] == "vit_fmnist" else 64**-0.5  # the dense model's scale
    drop = nn.Dropout(0.0).eval()
    paths = [p for p in ATTENTION_PATHS if d_qk != d_v or p != "sdpa_padded"]

    def call(path: str) -> Callable[[], object]:
        return lambda: attend(q, k, v, scale, fused=True, dropout=drop, path=path)

    with torch.inference_mode():
        reference = attend(q, k, v, scale, fused=True, dropout=drop, path="math")
        error = {p: (call(p)() - reference).abs().max().item() for p in paths}  # type: ignore[operator]
        seconds = time_interleaved({p: call(p) for p in paths}, device, rounds)
    return {"seconds": seconds, "error": error, "chosen": attention_path(device.type, d_qk, d_v)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per shape (medians)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--report", default=None, help="also write the Markdown to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    t0 = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    shapes = attention_shapes()
    header = (
        "| device | model | B | H | N | d_qk | d_v | occurs in | math ms | sdpa ms | sdpa_padded ms "
        "| math / sdpa | math / sdpa_padded | fastest | chosen | max abs diff to math |"
    )
    lines = [header, "|" + " --- |" * 16]
    for device in devices:
        for shape in shapes:
            for batch in BATCHES:
                r = measure_shape(shape, batch, device, args.rounds)
                s = r["seconds"]
                fastest = min(s, key=s.get)
                pad = s.get("sdpa_padded")
                row = (
                    f"| {device.type} | {shape['model']} | {batch} | {shape['heads']} | {shape['tokens']} "
                    f"| {shape['d_qk']} | {shape['d_v']} | {', '.join(shape['where'])} "
                    f"| {1e3 * s['math']:.3f} | {1e3 * s['sdpa']:.3f} | "
                    + (f"{1e3 * pad:.3f}" if pad else "-")
                    + f" | {s['math'] / s['sdpa']:.2f} | "
                    + (f"{s['math'] / pad:.2f}" if pad else "-")
                    + f" | {fastest} | {r['chosen']} | "
                    + ", ".join(f"{k} {v:.1e}" for k, v in r["error"].items() if k != "math")
                    + " |"
                )
                lines.append(row)
                print(row, flush=True)
    minutes = (time.perf_counter() - t0) / 60
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cmd = "python benchmarks/bench_attention_paths.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    text = "\n".join(
        [
            "# Attention paths for pruned head widths",
            "",
            f"Command: `{cmd.strip()}`",
            "",
            f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, torch threads {args.threads}, load average {load:.2f} before and "
            f"{load_after:.2f} after, {minutes:.1f} minutes. CUDA: "
            + (torch.cuda.get_device_name() if torch.cuda.is_available() else "none present, no CUDA rows")
            + ".",
            "",
            f"Medians over {args.rounds} interleaved rounds per shape; ratios above 1 mean faster than "
            "the math path. `chosen` is what `attention_path` picks for the shape on that device.",
            "",
            *lines,
            "",
        ]
    )
    print(f"\n{minutes:.1f} minutes")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
