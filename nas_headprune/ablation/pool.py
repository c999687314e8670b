"""Trials in worker processes: a pool of spawned processes, each given one GPU (round robin) and its
share of the CPU threads, runs the trials and hands each outcome back to the parent as it arrives."""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import Any

from nas_headprune.ablation.execute import run_trial
from nas_headprune.ablation.trials import Trial


def _worker_init(device_queue: Any, threads: int) -> None:
    device = device_queue.get() if device_queue is not None else None
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(device)
    os.environ["NAS_HEADPRUNE_WORKER_THREADS"] = str(threads)


def _worker_run(trial: dict[str, Any], run_dir: str) -> dict[str, Any]:
    threads = int(os.environ.get("NAS_HEADPRUNE_WORKER_THREADS", "1"))
    return run_trial(trial, run_dir, threads=threads)


def _cuda_devices() -> list[int]:
    try:
        import torch

        return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    except Exception:  # pragma: no cover - a broken CUDA install runs trials on the CPU
        return []


def run_pool(todo: list[Trial], out: Path, workers: int, store: Any, record: Any, advance: Any) -> None:
    """Run ``todo`` in at most ``workers`` spawned processes; ``record(trial, outcome)`` and
    ``advance(trial_id)`` are called in this process as each outcome arrives."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    workers = min(workers, len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    devices = _cuda_devices()
    queue = None
    if devices:
        queue = ctx.Queue()
        for w in range(workers):
            queue.put(devices[w % len(devices)])
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_worker_init, initargs=(queue, threads)
    ) as pool:
        pending = list(todo)
        running: dict[Any, Trial] = {}
        try:
            while pending or running:
                while pending and len(running) < workers:
                    trial = pending.pop(0)
                    store.mark_running(trial.trial_id)
                    fut = pool.submit(_worker_run, trial.to_dict(), str(out / "runs" / trial.trial_id))
                    running[fut] = trial
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in finished:
                    trial = running.pop(fut)
                    try:
                        res = fut.result()
                    except Exception as exc:  # the worker process died (out of memory, killed)
                        res = {
                            "status": "failed",
                            "error": f"worker process failed: {type(exc).__name__}: {exc}",
                            "detail": traceback.format_exc(limit=4),
                            "started": None,
                            "finished": time.time(),
                        }
                    record(trial, res)
                    advance(trial.trial_id)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
