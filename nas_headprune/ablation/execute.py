"""One trial: a :func:`nas_headprune.runner.run_search` run in its own folder, with its log in
``trial.log`` there, and the flat metrics a store row keeps of its result."""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The flat metrics a store row keeps next to the full result record."""
    pruned, dense = result["pruned"], result["dense"]
    throughput = result.get("throughput", {}).get("pruned", {})
    steps = result.get("training_steps") or {}
    return {
        "top1_dense": dense.get("top1"),
        "top1_before": pruned["before_finetune"].get("top1"),
        "top1_after": pruned["after_finetune"].get("top1"),
        "loss_after": pruned["after_finetune"].get("loss"),
        "macs": pruned["macs"],
        "macs_ratio": pruned["macs_ratio"],
        "params": pruned["params"],
        "params_ratio": pruned["params"] / dense["params"],
        "speedup": throughput.get("speedup"),
        **{k: float(v) for k, v in result.get("timings", {}).items()},
        "top1_val_dense": dense.get("val_top1"),
        "top1_val_before": (pruned.get("val_before_finetune") or {}).get("top1"),
        "top1_val_after": pruned.get("val_top1"),
        "steps_search": steps.get("search"),
        "steps_finetune": steps.get("finetune"),
        "steps_total": steps.get("total"),
    }


def run_trial(trial: dict[str, Any], run_dir: str, threads: int | None = None) -> dict[str, Any]:
    """Run one trial (in a worker process or in-process); never raises for a failed run."""
    t0 = time.time()
    logger = logging.getLogger("nas_headprune")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(run_dir) / "trial.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)  # the trial's log goes to its folder, the console keeps the progress bar
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        from nas_headprune.config import load_config
        from nas_headprune.runner import run_search

        cfg = load_config(trial["base"], list(trial["overrides"]))
        result = run_search(cfg, run_dir)
        slim = {k: v for k, v in result.items() if k != "config"}
        return {
            "status": "done",
            "summary": summarize(result),
            "result": slim,
            "started": t0,
            "finished": time.time(),
        }
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a failed trial is recorded, never hidden, and never stops the sweep
        from nas_headprune.errors import NasHeadpruneError

        message = f"{type(exc).__name__}: {exc}"
        detail = message if isinstance(exc, NasHeadpruneError) else traceback.format_exc(limit=8)
        logger.error("trial failed: %s", detail)
        return {
            "status": "failed",
            "error": message,
            "detail": detail,
            "started": t0,
            "finished": time.time(),
        }
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
