"""Every benchmark in one run, as one markdown table (the README's benchmark table).

    .venv/bin/python bench/report.py              # the real figures (minutes: real-size models, big photos)
    .venv/bin/python bench/report.py --quick      # seconds: tiny models, small inputs (what the test runs)
    .venv/bin/python bench/report.py --only e2e,venv_size

Calls ``collect(quick)`` of each benchmark module (bench/anti_sus.py,
anti_sus_memory.py, e2e.py, gallery.py, dupskip.py, search.py, scale.py, stage_cost.py, venv_size.py) in this one
process, one after the other, and prints a table of figure, value, goal and
whether it is met, headed by the CPU model, the flags that matter for int8
(avx2, avx512f, avx512_vnni, amx) and the core count. A benchmark that is
missing, has no ``collect`` or fails gets one line saying so; the others still run.
Figures measured side by side in one run (ratios) survive a busy machine better
than absolute ones.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Mapping, Sequence

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))  # the benchmarks import the project's packages

BENCHMARKS = ("anti_sus", "anti_sus_memory", "e2e", "gallery", "dupskip", "search", "scale", "stage_cost", "venv_size")
FLAGS = ("avx2", "avx512f", "avx512_vnni", "amx")
Value = float | str
Collect = Callable[[bool], Mapping[str, Value]]


@dataclass(frozen=True)
class Cpu:
    """What /proc/cpuinfo says about this machine."""

    model: str
    flags: dict[str, bool]
    cores: int

    def header(self) -> str:
        flags = ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in self.flags.items())
        return f"CPU: {self.model}; {self.cores} cores; {flags}"


def cpu_info(text: str | None = None, cores: int | None = None) -> Cpu:
    """Model name, the int8-relevant flags (``amx``: any ``amx_*`` flag) and the usable core count."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text("utf-8", "replace")
        except OSError:  # not Linux: the model from platform, flags unknown
            text = ""
    model = next((m.group(1).strip() for m in re.finditer(r"^model name\s*:\s*(.+)$", text, re.M)),
                 platform.processor() or "unknown")
    found = next((set(m.group(1).split()) for m in re.finditer(r"^flags\s*:\s*(.+)$", text, re.M)), set())
    flags = {f: (any(x.startswith("amx_") for x in found) if f == "amx" else f in found) for f in FLAGS}
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return Cpu(model, flags, cores)


@dataclass(frozen=True)
class Goal:
    """Issue 14's goal for the figures of one benchmark whose key matches ``pattern``."""

    bench: str
    pattern: str
    text: str
    met: Callable[[float, Cpu], bool | None]  # None: the goal does not apply on this machine

    def applies(self, bench: str, key: str, figures: Mapping[str, Value]) -> bool:
        """This goal is about ``key``; a goal on a ``batch`` is about the benchmark's ``default_batch`` alone."""
        m = re.search(self.pattern, key) if bench == self.bench else None
        if m is None:
            return False
        batch, default = m.groupdict().get("batch"), figures.get("default_batch")
        return batch is None or not isinstance(default, (int, float)) or int(batch) == int(default)


def _at_least(x: float) -> Callable[[float, Cpu], bool | None]:
    return lambda v, _cpu: v >= x


def _at_most(x: float) -> Callable[[float, Cpu], bool | None]:
    return lambda v, _cpu: v <= x


def _vnni_at_least(x: float) -> Callable[[float, Cpu], bool | None]:
    """The int8 speed goal holds on machines with VNNI; elsewhere it is reported without a verdict."""
    return lambda v, cpu: (v >= x) if cpu.flags.get("avx512_vnni") or cpu.flags.get("amx") else None


GOALS = (
    Goal("anti_sus", r"int8.*(upstream|fp32)|(upstream|fp32).*int8|speedup", ">= 2.2x on VNNI machines", _vnni_at_least(2.2)),
    # On the rate of a crawl under way (bench/e2e.py's steady figure), as nomad runs by default: what a crawler
    # that runs for months gets. The one-shot run (start-up, first fill and last delivery included, ~1.6 s of fixed
    # cost on 64 photos) and the --end-of-cycle comparison are reported beside it without a goal.
    Goal("e2e", r"^e2e_steady_ratio$|e2e.*vs.*anti_sus", ">= 0.85x anti_sus alone (steady)", _at_least(0.85)),
    # At the default batch only (the benchmark names it in ``default_batch``; quick runs use a smaller one).
    Goal("anti_sus_memory", r"^peak_rss_mb_fp32_batch(?P<batch>\d+)_budget$", "<= 1000 MB", _at_most(1000)),
    Goal("anti_sus_memory", r"^peak_rss_mb_int8_batch(?P<batch>\d+)_budget$", "<= 600 MB", _at_most(600)),
    Goal("anti_sus_memory", r"^throughput_budgeted_vs_unbudgeted$", ">= 0.95 (at most 5% slower)", _at_least(0.95)),
    # Issue 11: a search among 100k stored 512-d features (full runs; quick runs use 20k and carry no goal).
    Goal("search", r"^(text|example)_search_ms_100k$", "< 100 ms (median)", lambda v, _cpu: v < 100),
    # The duplicate skip: reposts of what the gallery holds never reach CLIP, and no new photo is lost to it.
    Goal("dupskip", r"^repost_skip_rate$", ">= 0.9 of the reposts skipped before anti_sus", _at_least(0.9)),
    Goal("dupskip", r"^new_photos_skipped$", "0 (no new photo dropped)", _at_most(0)),
    # Issue 15: two anti_sus workers behind the broker, each pinned to its own core, against one (same run).
    Goal("scale", r"^two_vs_one_worker$", ">= 1.6x one worker", _at_least(1.6)),
    # Issue 12: the probe and the prompt checks together, per image, against the served CLIP (same run).
    Goal("stage_cost", r"^stages_share_of_clip$", "< 0.02 (2% of CLIP's time)", lambda v, _cpu: v < 0.02),
)


def goal_of(bench: str, key: str, figures: Mapping[str, Value]) -> Goal | None:
    return next((g for g in GOALS if g.applies(bench, key, figures)), None)


def load(name: str, folder: Path = BENCH) -> tuple[Collect | None, str]:
    """``collect`` of ``folder/name.py``, or None and the line that says why not."""
    path = folder / f"{name}.py"
    if not path.is_file():
        return None, f"bench/{name}.py: missing, skipped"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module: ModuleType = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name while it runs
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a benchmark that cannot even be imported must not stop the others
        return None, f"bench/{name}.py: cannot be imported ({type(exc).__name__}: {exc}), skipped"
    fn = getattr(module, "collect", None)
    if not callable(fn):
        return None, f"bench/{name}.py: has no collect(quick), skipped"
    return fn, ""


def fmt(value: Value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def row(bench: str, key: str, value: Value, cpu: Cpu, figures: Mapping[str, Value]) -> str:
    goal = goal_of(bench, key, figures)
    verdict = "-"
    if goal is not None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            met = goal.met(float(value), cpu)
            verdict = "n/a on this CPU" if met is None else ("yes" if met else "**no**")
        else:
            verdict = "not measured"
    return f"| {bench}: {key} | {fmt(value)} | {goal.text if goal else '-'} | {verdict} |"


def report(names: Sequence[str], quick: bool, cpu: Cpu, folder: Path = BENCH,
           log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> str:
    """Run every named benchmark's ``collect(quick)`` here, one after the other; the markdown report."""
    started = dt.datetime.now(dt.timezone.utc)
    rows: list[str] = []
    notes: list[str] = []
    for name in names:
        fn, why = load(name, folder)
        if fn is None:
            notes.append(why)
            log(why)
            continue
        log(f"bench/{name}.py: collect(quick={quick}) …")
        t0 = time.monotonic()
        try:
            # What a benchmark prints while it runs goes to stderr: stdout is the report alone.
            with contextlib.redirect_stdout(sys.stderr):
                figures = dict(fn(quick))
        except Exception as exc:  # one failing benchmark is a line in the report, not the end of the run
            line = f"bench/{name}.py: collect failed ({type(exc).__name__}: {str(exc)[:300]})"
            notes.append(line)
            log(line)
            continue
        log(f"bench/{name}.py: {len(figures)} figures in {time.monotonic() - t0:.0f} s")
        # The CPU some benchmarks report is the header's already.
        rows += [row(name, key, value, cpu, figures) for key, value in figures.items() if key != "cpu"]
    head = [f"Benchmarks of {started:%Y-%m-%d %H:%M} UTC ({'quick' if quick else 'full'} run, "
            f"`python bench/report.py{' --quick' if quick else ''}`)", "", cpu.header(), "",
            "| figure | value | goal | met? |", "|---|---|---|---|"]
    tail = ([""] + [f"- {n}" for n in notes]) if notes else []
    return "\n".join(head + rows + tail)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="seconds instead of minutes: tiny models, small inputs")
    p.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated benchmarks (default: {','.join(BENCHMARKS)})")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if not re.fullmatch(r"[a-z0-9_]+", n)]
    if unknown:
        print(f"error: not a benchmark name: {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})", file=sys.stderr)
        return 2
    print(report(names, args.quick, cpu_info()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
