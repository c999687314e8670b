"""How fast does a bad ``search`` config answer? Wall time of the whole command, in a fresh process.

    python benchmarks/bench_config_error.py [--repeats 7]

Each case runs ``nas-headprune search ...`` as a user would (a new Python process, console script
entry point), interleaved with the others, and prints the median and the maximum wall time, the exit
code and whether torch was imported. The config is validated before torch is imported, so these
cases answer in the time it takes to start Python and pydantic.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "non-finite value": ["--set", "finetune.lr=.inf"],
    "unknown key": ["--set", "finetune.lrr=1e-3"],
    "value out of range": ["--set", "budget=1.5"],
    "bad data section": ["--set", "data.batch_size=0"],
    "unknown preset": ["--config", "no_such_preset"],
}

_PROBE = """
import sys
from nas_headprune.cli import main
rc = main(sys.argv[1:])
print('torch imported:', 'torch' in sys.modules, file=sys.stderr)
sys.exit(rc)
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    times: dict[str, list[float]] = {name: [] for name in CASES}
    codes: dict[str, set[int]] = {name: set() for name in CASES}
    torch_seen: dict[str, bool] = {name: False for name in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "run")
        for _ in range(args.repeats):
            for name, extra in CASES.items():  # interleaved, so drift hits every case alike
                cmd = [sys.executable, "-c", _PROBE, "search", "--out", out, *extra]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                times[name].append(time.perf_counter() - t0)
                codes[name].add(proc.returncode)
                torch_seen[name] |= "torch imported: True" in proc.stderr
    print(f"| bad input | exit code | median s | max s | torch imported | ({args.repeats} runs each)")
    print("| --- | --- | --- | --- | --- |")
    for name in CASES:
        code = ",".join(str(c) for c in sorted(codes[name]))
        med, top = statistics.median(times[name]), max(times[name])
        print(f"| {name} | {code} | {med:.2f} | {top:.2f} | {'yes' if torch_seen[name] else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
