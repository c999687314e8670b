"""GPU check: what pruning buys on a CUDA device, measured in one run (about 5 minutes on one GPU).

    python benchmarks/gpu_check.py [--report docs/results/gpu.md]     # on a machine with CUDA
    python benchmarks/gpu_check.py --device cpu --smoke                  # tiny shapes: the script works

Prints Markdown tables:

1. forward throughput of deit_small_patch16_224 and swin_tiny_patch4_window7_224 at 224x224 (random
   weights), dense and pruned by ``magnitude`` to 0.7 and 0.5 of the dense MACs (widths in multiples
   of 8), at batch 1 and 128, under fp16 and bf16 autocast: the pruned/dense speed-up next to the
   ideal (dense MACs / pruned MACs). Models run interleaved, medians of the rounds.
2. one ``similarity_indicator`` search step against one dense training step (forward, cross
   entropy, backward, AdamW) of the same model, batch and precision.
3. with two or more GPUs, a 2-process NCCL ``search`` under torchrun (tiny model, digits): exit code,
   one selection on both ranks (the runner checks it), wall time.

``--report`` writes the tables with the GPU's name, the versions and the command, atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MODELS = {"deit_small": "deit_small_patch16_224", "swin_tiny": "swin_tiny_patch4_window7_224"}
SMOKE_KWARGS = {
    "deit_small": dict(img_size=32, depth=1),
    "swin_tiny": dict(img_size=56, depths=(1, 1), num_heads=(3, 6)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_interleaved(
    fns: dict[str, Any], rounds: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per call of each function, the order rotated every round."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            _sync(device)
            t0 = time.perf_counter()
            fns[n]()
            _sync(device)
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def _pruned(model: torch.nn.Module, size: tuple[int, ...], budget: float, step: int) -> torch.nn.Module:
    from nas_headprune.evaluator.materialize import materialize
    from nas_headprune.evaluator.measure import measure_macs
    from nas_headprune.registry import make_strategy
    from nas_headprune.space import build_space
    from nas_headprune.strategy import SearchContext

    space = build_space(model, size)
    ctx = SearchContext(
        model=model, space=space, budget=budget, dense_macs=measure_macs(model, size), calib=[]
    )
    result = make_strategy("magnitude", {"width_step": step}).search(ctx)
    return materialize(model, space, space.selection(dict(result.selection.items())))


def throughput_table(device: torch.device, smoke: bool, rounds: int) -> list[str]:
    from nas_headprune.evaluator.measure import measure_macs
    from nas_headprune.models.factory import create_model

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        dtypes.pop("bf16")
    batches = (1, 4) if smoke else (1, 128)
    rows = [
        "| model | budget | precision | batch | dense ms | pruned ms | speed-up | ideal |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, name in MODELS.items():
        kwargs = SMOKE_KWARGS[key] if smoke else {}
        torch.manual_seed(0)
        dense = create_model(name, **kwargs).eval()
        size = (3, kwargs.get("img_size", 224), kwargs.get("img_size", 224))
        dense_macs = measure_macs(dense, size)
        variants = {b: _pruned(dense, size, b, 1 if smoke else 8) for b in (0.7, 0.5)}
        ideal = {b: dense_macs / measure_macs(m, size) for b, m in variants.items()}
        models = {"dense": dense, **{f"b{b}": m for b, m in variants.items()}}
        for m in models.values():
            m.to(device).eval()
        for label, dtype in dtypes.items():
            for batch in batches:
                x = torch.randn(batch, *size, device=device)

                def call(m: torch.nn.Module = dense, x: torch.Tensor = x, dtype: torch.dtype = dtype) -> None:
                    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype):
                        m(x)

                fns = {n: (lambda m=m: call(m)) for n, m in models.items()}
                med = _time_interleaved(fns, rounds=rounds, warmup=1 if smoke else 3, device=device)
                for b in variants:
                    rows.append(
                        f"| {name} | {b} | {label} | {batch} | {med['dense'] * 1e3:.2f} | "
                        f"{med[f'b{b}'] * 1e3:.2f} | {med['dense'] / med[f'b{b}']:.2f}x | {ideal[b]:.2f}x |"
                    )
        for m in models.values():
            m.cpu()
    return rows


def search_step_table(device: torch.device, smoke: bool, rounds: int) -> list[str]:
    """Seconds per similarity_indicator search step (from two search lengths) over a dense step."""
    from nas_headprune.evaluator.measure import measure_macs
    from nas_headprune.models.factory import create_model
    from nas_headprune.registry import make_strategy
    from nas_headprune.space import build_space
    from nas_headprune.strategy import SearchContext

    key = "deit_small"
    kwargs = SMOKE_KWARGS[key] if smoke else {}
    side = kwargs.get("img_size", 224)
    batch = 4 if smoke else 64
    torch.manual_seed(0)
    model = create_model(MODELS[key], **kwargs).to(device)
    size = (3, side, side)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, *size, generator=gen), torch.randint(0, 1000, (batch,), generator=gen))]
    space = build_space(model, size)
    dense_macs = measure_macs(model, size)

    def search(steps: int) -> float:
        ctx = SearchContext(
            model=model,
            space=space,
            budget=0.7,
            dense_macs=dense_macs,
            calib=batches,
            device=str(device),
            train_loader=batches * steps,
        )
        strategy = make_strategy("similarity_indicator", {"steps": steps, "checkpoint_every": 0})
        _sync(device)
        t0 = time.perf_counter()
        strategy.search(ctx)
        _sync(device)
        return time.perf_counter() - t0

    short, long = (2, 6) if smoke else (5, 25)
    repeats = 1 if smoke else 3
    per_step = statistics.median([(search(long) - search(short)) / (long - short) for _ in range(repeats)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x, y = (t.to(device) for t in batches[0])

    def train_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    dense = _time_interleaved({"dense": train_step}, rounds=rounds, warmup=3, device=device)["dense"]
    return [
        "| model | batch | dense training step ms | search step ms | search step / dense step |",
        "| --- | --- | --- | --- | --- |",
        f"| {MODELS[key]} | {batch} | {dense * 1e3:.1f} | {per_step * 1e3:.1f} | {per_step / dense:.2f} |",
    ]


def nccl_table() -> list[str]:
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return ["2-process NCCL run: skipped (fewer than 2 CUDA devices)"]
    tiny = [
        "model.name=vit_tiny_patch16_224",
        "model.kwargs={img_size: 8, patch_size: 2, in_chans: 1, embed_dim: 32, depth: 2, num_heads: 2, num_classes: 10}",
        "data={name: digits, batch_size: 64, calib_batches: 2, calib_batch_size: 32}",
        "finetune={epochs: 1, max_steps_per_epoch: 3}",
        "throughput_batch=8",
    ]
    rows = ["| strategy | exit code | seconds |", "| --- | --- | --- |"]
    for strategy in ("magnitude", "taylor", "similarity_indicator"):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "-m",
                "nas_headprune.cli",
            ]
            cmd += ["search", "--strategy", strategy, "--out", str(Path(tmp) / "run"), "--no-progress"]
            cmd += [a for item in tiny for a in ("--set", item)]
            if strategy == "similarity_indicator":
                cmd += ["--set", "strategy_options.steps=20"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            rows.append(f"| {strategy} | {proc.returncode} | {time.perf_counter() - t0:.1f} |")
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few rounds (checks the script)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--report", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; use --device cpu --smoke to check the script", file=sys.stderr)
        return 2
    rounds = args.rounds or (3 if args.smoke else 20)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    started = time.perf_counter()
    sections = {
        "Forward throughput, pruned vs dense": throughput_table(device, args.smoke, rounds),
        "similarity_indicator search step vs dense training step": search_step_table(
            device, args.smoke, rounds
        ),
    }
    if device.type == "cuda":
        sections["2-process NCCL search under torchrun"] = nccl_table()
    import timm

    lines = [
        f"# GPU check on {name}",
        "",
        f"Command: `{shlex.join(['python', 'benchmarks/gpu_check.py', *(argv or sys.argv[1:])])}`; "
        f"torch {torch.__version__}, timm {timm.__version__}, CUDA {torch.version.cuda}; "
        f"{time.perf_counter() - started:.0f} s in all.",
    ]
    for title, rows in sections.items():
        lines += ["", f"## {title}", "", *rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        from nas_headprune.atomic import atomic_write_text

        atomic_write_text(args.report, text)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
