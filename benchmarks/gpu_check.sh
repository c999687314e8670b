#!/usr/bin/env bash
# The GPU check (docs/results/gpu.md): run on a machine with a CUDA device, from the repository root.
#   benchmarks/gpu_check.sh            # prints the tables and writes docs/results/gpu.md
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
exec timeout 480 python benchmarks/gpu_check.py --report docs/results/gpu.md "$@"
