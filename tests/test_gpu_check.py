"""benchmarks/gpu_check.py runs (tiny shapes on the CPU), so the GPU check cannot rot between GPU runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu(tmp_path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = tmp_path / "gpu.md"
    assert module.main(["--device", "cpu", "--smoke", "--rounds", "1", "--report", str(report)]) == 0
    text = report.read_text()
    assert capsys.readouterr().out.strip() == text.strip()
    rows = [
        line for line in text.splitlines() if line.startswith("| deit_small") or line.startswith("| swin")
    ]
    assert len(rows) == 2 * 2 * 2 * 2 + 1  # 2 models x 2 budgets x 2 precisions x 2 batches, + search row
    for row in rows[:-1]:
        speedup, ideal = (float(c.strip().rstrip("x")) for c in row.split("|")[7:9])
        assert speedup > 0 and 1.0 < ideal < 2.2  # ideal: dense MACs / pruned MACs at 0.7 or 0.5
    if not torch.cuda.is_available():
        assert module.main(["--device", "cuda"]) == 2  # a clear refusal, not a crash
