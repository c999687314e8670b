"""One rank of the DDP fine-tune test; launched by tests/test_finetune.py through torch.distributed.run.

Usage: ``python -m torch.distributed.run --nproc_per_node=2 tests/_ddp_worker.py OUT_DIR``. Each rank
builds the tiny model from its own seed (so only DDP's initial broadcast can make them agree),
fine-tunes one short epoch on its shard of the digits and writes ``OUT_DIR/rank{r}.json`` with hashes
of its weights before and after, the fine-tune result and a distributed evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def weights_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(out_dir: Path) -> None:
    import timm
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    from nas_headprune.datasets.digits import read_digits
    from nas_headprune.evaluator.finetune import (
        FinetuneConfig,
        cleanup_distributed,
        finetune,
        init_distributed_from_env,
    )
    from nas_headprune.evaluator.metrics import evaluate

    rank, world_size, device = init_distributed_from_env()
    try:
        pixels, targets = read_digits()
        images = torch.tensor(pixels, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
        labels = torch.tensor(targets)
        train = TensorDataset(images[:512], labels[:512])
        held_out = TensorDataset(images[1500:1700], labels[1500:1700])  # 200 samples: even shards, no padding
        train_loader = DataLoader(
            train, batch_size=32, sampler=DistributedSampler(train, shuffle=True, seed=0)
        )
        eval_loader = DataLoader(held_out, batch_size=64, sampler=DistributedSampler(held_out, shuffle=False))

        torch.manual_seed(100 + rank)  # different initial weights per rank on purpose
        model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=8,
            patch_size=2,
            in_chans=1,
            embed_dim=32,
            depth=1,
            num_heads=2,
            num_classes=10,
        )
        initial = weights_hash(model)
        cfg = FinetuneConfig(epochs=1, lr=1e-3, max_steps_per_epoch=4, log_every=2)
        result = finetune(
            model,
            train_loader,
            cfg,
            seed=0,
            device=device,
            checkpoint_dir=out_dir / "ckpt",
            metrics_log=out_dir / "metrics.jsonl",
            progress=False,
        )
        metrics = evaluate(model, eval_loader, device)
        report = {
            "rank": rank,
            "world_size": world_size,
            "initial_hash": initial,
            "final_hash": weights_hash(model),
            "steps": result.steps,
            "final_train_loss": result.final_train_loss,
            "eval": metrics,
        }
        (out_dir / f"rank{rank}.json").write_text(json.dumps(report, indent=2) + "\n")
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
