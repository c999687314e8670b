"""Performance suite: pytest-benchmark measurements plus a ratio table built from them.

Run from the repository root::

    python -m pytest benchmarks/perf                                          # print the table
    python -m pytest benchmarks/perf --perf-report docs/results/performance.md # and write it

Every test times one thing with ``benchmark.pedantic`` and files the result here (section, keys,
statistic) as well as in ``benchmark.extra_info``. At the end of the session the ratios are computed
from those numbers, pairing each pruned model with the dense one of the same model, device and
batch, and each search step with the dense training step of the same device. The table is printed
and, with ``--perf-report PATH``, written atomically to ``PATH`` together with the command and the
machine facts. Nothing here asserts a time.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

#: a round that runs the callable several times lasts at least this long (timer resolution, overhead)
MIN_ROUND_S = 0.005
MIN_ROUNDS = 5
MAX_ROUNDS = 200
#: a call faster than this runs a second time before the rounds, to size them
WARM_CALL_S = 0.5
#: calls slower than this are measured in at least MIN_ROUNDS_SLOW rounds (whole multi-trial searches)
SLOW_CALL_S = 3.0
MIN_ROUNDS_SLOW = 3


# --------------------------------------------------------------------------- options
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("perf", "nas-headprune performance suite")
    group.addoption(
        "--perf-report",
        metavar="PATH",
        default=None,
        help="also write the ratio table, the command and the machine facts to PATH (Markdown, atomic)",
    )
    group.addoption(
        "--perf-seconds",
        type=float,
        default=2.0,
        help="time budget of one measurement in seconds; it still runs at least "
        f"{MIN_ROUNDS} rounds (default 2.0)",
    )
    group.addoption(
        "--perf-stat",
        choices=("min", "median", "mean"),
        default="min",
        help="statistic of the rounds used for the ratios (default min: on a shared machine other "
        "work only ever adds time)",
    )
    group.addoption(
        "--perf-threads",
        type=int,
        default=1,
        help="torch CPU threads for the whole run; 0 keeps torch's default (one per core). Default 1: "
        "on cores shared with other work, several threads mostly wait on each other",
    )


def pytest_configure(config: pytest.Config) -> None:
    threads = config.getoption("--perf-threads", default=0)
    if threads < 0:
        raise pytest.UsageError(f"--perf-threads must be 0 (torch's default) or more, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    seconds = config.getoption("--perf-seconds", default=2.0)
    if not seconds > 0:
        raise pytest.UsageError(f"--perf-seconds must be positive, got {seconds}")
    config.stash[_COLLECTOR] = Collector()


# --------------------------------------------------------------------------- collection of results
@dataclass
class Record:
    """One finished measurement: which section of the table, its keys, seconds per call."""

    section: str
    info: dict[str, Any]
    seconds: float
    rounds: int
    iterations: int


@dataclass
class Collector:
    records: list[Record] = field(default_factory=list)

    def of(self, section: str) -> list[Record]:
        return [r for r in self.records if r.section == section]


_COLLECTOR = pytest.StashKey[Collector]()
_STARTED = pytest.StashKey[float]()
_LOAD = pytest.StashKey[str]()


class Perf:
    """Times a callable through the ``benchmark`` fixture and files the result for the summary.

    The callable runs once untimed (first-call costs) and, unless that took ``WARM_CALL_S`` or more,
    once more to choose the round length; then ``benchmark.pedantic`` runs it for ``--perf-seconds``
    (at least ``MIN_ROUNDS`` rounds, ``MIN_ROUNDS_SLOW`` for slow calls). Short calls are repeated
    within a round so that a round lasts ``MIN_ROUND_S`` or more. On CUDA every call ends with a
    synchronisation, so the time covers the kernels, not just their launch.
    """

    def __init__(self, benchmark: Any, config: pytest.Config) -> None:
        self.benchmark = benchmark
        self.collector = config.stash[_COLLECTOR]
        self.seconds = float(config.getoption("--perf-seconds"))
        self.stat = str(config.getoption("--perf-stat"))

    def __call__(
        self,
        fn: Callable[[], object],
        *,
        section: str,
        group: str,
        device: torch.device | str = "cpu",
        divide_by: int = 1,
        **info: Any,
    ) -> float | None:
        """Benchmark ``fn``; file and return its seconds per call divided by ``divide_by`` (the
        number of units one call does, e.g. trials of a whole search); ``None`` when benchmarks are
        disabled. ``info`` holds the keys the summary pairs measurements by."""
        dev = torch.device(device)

        def call() -> None:
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        self.benchmark.group = group
        self.benchmark.extra_info.update({"section": section, "device": str(dev), **info})
        start = time.perf_counter()
        call()  # first call: allocations, kernel choice, lazy imports; not counted
        once = time.perf_counter() - start
        if once < WARM_CALL_S:  # a second, warm call says better how long one call takes
            start = time.perf_counter()
            call()
            once = time.perf_counter() - start
        once = max(once, 1e-9)
        iterations = max(1, math.ceil(MIN_ROUND_S / once))
        least = MIN_ROUNDS if once < SLOW_CALL_S else MIN_ROUNDS_SLOW
        rounds = min(max(math.ceil(self.seconds / (once * iterations)), least), MAX_ROUNDS)
        self.benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=0)
        meta = self.benchmark.stats
        if not meta:  # --benchmark-disable: the callable ran once, nothing was measured
            return None
        seconds = float(getattr(meta.stats, self.stat)) / divide_by
        self.benchmark.extra_info.update(seconds_per_unit=seconds, units_per_call=divide_by)
        self.collector.records.append(
            Record(section, {"device": str(dev), **info}, seconds, rounds, iterations)
        )
        return seconds


@pytest.fixture
def perf(benchmark: Any, request: pytest.FixtureRequest) -> Perf:
    return Perf(benchmark, request.config)


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device of a test parametrised indirectly with ``"cpu"`` or ``"cuda"``; CUDA skips when absent."""
    name = getattr(request, "param", "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available on this machine")
    return torch.device(name)


# --------------------------------------------------------------------------- the summary table
def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3g}" if seconds < 1e-2 else f"{seconds * 1e3:.1f}"


def _time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def _ratio(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def throughput_table(records: list[Record]) -> list[str]:
    dense = {
        (r.info["model"], r.info["device"], r.info["batch"]): r for r in records if r.info["budget"] is None
    }
    lines = [
        "| model | device | batch | budget | pruned MACs / image | ideal speedup (dense / pruned MACs) "
        "| dense ms / batch | pruned ms / batch | measured speedup | measured / ideal |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        if r.info["budget"] is None:
            continue
        ref = dense.get((r.info["model"], r.info["device"], r.info["batch"]))
        ideal = r.info["dense_macs"] / r.info["macs"]
        measured = ref.seconds / r.seconds if ref is not None else None
        lines.append(
            f"| {r.info['model']} | {r.info['device']} | {r.info['batch']} | {r.info['budget']:.2f} "
            f"| {r.info['macs'] / 1e6:,.1f}M ({r.info['macs'] / r.info['dense_macs']:.3f}) "
            f"| {ideal:.2f} | {_ms(ref.seconds if ref else None)} | {_ms(r.seconds)} "
            f"| {_ratio(measured)} | {_ratio(measured / ideal if measured else None)} |"
        )
    return lines


def search_table(records: list[Record]) -> list[str]:
    dense = {r.info["device"]: r for r in records if r.info["strategy"] is None}
    lines = [
        "| strategy | device | what one step is | ms per step | dense training steps |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in sorted(records, key=lambda r: (r.info["device"], r.info["strategy"] is not None)):
        ref = dense.get(r.info["device"])
        units = r.seconds / ref.seconds if ref is not None else None
        name = r.info["strategy"] or "(dense training step)"
        lines.append(
            f"| {name} | {r.info['device']} | {r.info['step']} | {_ms(r.seconds)} | {_ratio(units)} |"
        )
    return lines


def macs_table(records: list[Record]) -> list[str]:
    ref = next((r for r in records if r.info["method"] == "analytic_cost"), None)
    lines = [
        "| method | what it does | time per call | relative to analytic_cost |",
        "| --- | --- | --- | --- |",
    ]
    for r in records:
        rel = r.seconds / ref.seconds if ref is not None else None
        lines.append(
            f"| {r.info['method']} | {r.info['what']} | {_time(r.seconds)} | {_ratio(rel, 1)}x |"
            if rel is not None
            else f"| {r.info['method']} | {r.info['what']} | {_time(r.seconds)} | - |"
        )
    return lines


def attention_paths_table(records: list[Record]) -> list[str]:
    """Per attention shape and device: each path's time, relative to the math path, and the choice."""
    shapes: dict[tuple, dict[str, Record]] = {}
    for r in records:
        key = tuple(r.info[k] for k in ("model", "device", "batch", "heads", "tokens", "d_qk", "d_v"))
        shapes.setdefault(key, {})[r.info["path"]] = r
    lines = [
        "| model | device | batch | heads | tokens | d_qk | d_v | math ms | sdpa ms | sdpa_padded ms "
        "| math / sdpa | math / sdpa_padded | chosen |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, paths in shapes.items():
        math_s = paths["math"].seconds if "math" in paths else None

        def cell(name: str, paths: dict[str, Record] = paths) -> str:
            return _ms(paths[name].seconds) if name in paths else "-"

        def rel(name: str, paths: dict[str, Record] = paths, math_s: float | None = math_s) -> str:
            return _ratio(math_s / paths[name].seconds) if name in paths and math_s else "-"

        chosen = next(iter(paths.values())).info["chosen"]
        lines.append(
            "| " + " | ".join(str(k) for k in key) + f" | {cell('math')} | {cell('sdpa')} "
            f"| {cell('sdpa_padded')} | {rel('sdpa')} | {rel('sdpa_padded')} | {chosen} |"
        )
    return lines


def _section(title: str, intro: str, table: list[str]) -> list[str]:
    return [f"## {title}", "", intro, "", *table, ""]


def summary_lines(collector: Collector, stat: str) -> list[str]:
    out: list[str] = []
    thr = collector.of("throughput")
    if thr:
        first = thr[0].info
        out += _section(
            "Throughput: pruned against dense",
            "Forward passes under `torch.inference_mode`, eval mode, random inputs. Each pruned model is "
            f"ranked by `{first['strategy']}` (shared global allocator) and materialised, so it is "
            "physically smaller. Ideal speedup = dense MACs / pruned MACs (both counted by "
            "`measure_macs`); measured speedup = dense time / pruned time; the last column is the "
            "fraction of the ideal that the hardware delivers.",
            throughput_table(thr),
        )
        models = {r.info["model"]: r.info["model_desc"] for r in thr}
        out += ["Models:", ""] + [f"- `{k}`: {v}" for k, v in models.items()] + [""]
    search = collector.of("search")
    if search:
        first = search[0].info
        out += _section(
            "Search cost relative to one dense training step",
            f"{first['model_desc']}; batch {first['batch']}. A dense training step is forward, cross "
            "entropy, backward and one AdamW step. What one step of a strategy is, is said in the third "
            "column; a strategy without steps is timed as a whole search, in dense-step units.",
            search_table(search),
        )
    paths = collector.of("attention_paths")
    if paths:
        out += _section(
            "Attention paths for unequal q/k and v head widths",
            "One call of `attend` on q, k, v split from one projection, as pruned layers produce "
            "them. Ratios above 1 are faster than the math path; `chosen` is the path "
            "`attention_path` picks for the shape on that device (docs/speed.md).",
            attention_paths_table(paths),
        )
    macs = collector.of("macs_count")
    if macs:
        first = macs[0].info
        counted = f"{first['macs']:,} MACs per image"
        if any(r.info["method"] == "measure_macs" for r in macs):
            counted = f"`analytic_cost` and `measure_macs` agree on it: {counted}"
        out += _section(
            "MACs count of a ViT-B-sized model",
            f"{first['model_desc']}; {first['arch_desc']}; {counted}.",
            macs_table(macs),
        )
    if out:
        out.append(f"Times are the {stat} over the benchmark rounds of this run.")
    return out


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:  # not available on this platform
        return "unknown"


def machine_lines(load_at_start: str) -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append(f"cuda ({torch.cuda.get_device_name(0)})")
    import timm

    return [
        f"- CPU: {os.cpu_count()} logical cores ({cpu}); torch CPU threads: {torch.get_num_threads()}",
        f"- load average (1 min) of the machine: {load_at_start} at the start, {_load()} at the end "
        "(other work on the same cores slows the measurements)",
        f"- devices measured: {', '.join(devices)}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
        f"{platform.system()}",
    ]


def report_text(config: pytest.Config, body: list[str], seconds: float | None) -> str:
    args = shlex.join(str(a) for a in config.invocation_params.args)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    took = f", {seconds:.0f} s wall clock" if seconds is not None else ""
    head = [
        "# Performance",
        "",
        "Written by the performance suite (`benchmarks/perf`, pytest-benchmark) with",
        "",
        "```bash",
        f"python -m pytest {args}".rstrip(),
        "```",
        "",
        f"on {when}{took}. Machine:",
        "",
        *machine_lines(config.stash.get(_LOAD, "unknown")),
        "",
    ]
    return "\n".join(head + body).rstrip() + "\n"


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_STARTED] = time.perf_counter()
    session.config.stash[_LOAD] = _load()


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    collector = config.stash.get(_COLLECTOR, None)
    if collector is None or not collector.records:
        return
    body = summary_lines(collector, str(config.getoption("--perf-stat")))
    started = config.stash.get(_STARTED, None)
    seconds = time.perf_counter() - started if started is not None else None
    terminalreporter.section("performance ratios")
    for line in body:
        terminalreporter.write_line(line)
    target = config.getoption("--perf-report")
    if target:
        from nas_headprune.atomic import atomic_write_text

        path = Path(config.invocation_params.dir) / target
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, report_text(config, body, seconds))
        terminalreporter.write_line(f"performance report written to {path}")
