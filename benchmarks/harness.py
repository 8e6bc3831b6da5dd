"""The one harness the benchmarks are written on: the source path, budgeted sections, one GPU timer, JSON out.

How to write a benchmark
------------------------
A benchmark is one file `benchmarks/bench_<topic>.py` (a one-off study: `benchmarks/studies/<topic>.py`) run on
one GPU by a command the results page states, with a `--quick` mode that runs on the CPU in seconds::

    import _src  # noqa: F401  (first: puts this checkout's src/ on sys.path; studies: `import _paths`)
    import harness
    from ditkit... import ...

    def section_forward(bench: harness.Bench) -> None:
        '''What it measures, in the words the results table uses.'''
        model = ...
        bench.results["forward"] = {"ms": bench.time_ms(lambda: model(x), warmup=2, repeats=5)}

    SECTIONS = {"forward": section_forward, ...}  # run in this order; a budget cut drops the tail

    def main(argv=None) -> int:
        parser = harness.parser(__doc__, SECTIONS, budget_s=540, reserve_s=20)
        parser.add_argument(...)  # the benchmark's own flags
        args = parser.parse_args(argv)
        bench = harness.Bench.from_args(args)  # device, budget clock, results with the environment
        return harness.run_sections(bench, args.sections, SECTIONS, args.reserve_s)

Rules the harness keeps so that each benchmark need not:
- Nothing edits `sys.path` but `_src.py` (src/) and `studies/_paths.py` (makes benchmarks/ importable from
  studies/). `import _src` sorts above `import ditkit`, so ruff's import order keeps it first.
- A device call has a fixed time budget: `run_sections` starts a section only while more than `reserve_s`
  (plus the section's own estimate, if given) is left of `--budget-s`, and records every skipped section with
  its reason; a failing section is recorded with its error while the others still run; `hard_limit` stops a
  section that runs far past the budget (SIGALRM), keeping what was measured before it.
- Results are written atomically to `--out` after each section, so a run that is cut keeps every figure it
  measured; they carry the device, GPU, torch/triton versions and the date (`environment`).
- One timer, `times_ms` (`Bench.time_ms` gives its median): warm-up calls, then CUDA events around each call on
  a GPU (`sync_each=True`: a host sync after every call, so launch overhead counts; False: calls back to back,
  the host free to run ahead as in a real loop), `time.perf_counter` on a CPU.
- No function over 100 lines (tests/test_structure.py checks benchmarks/ as it checks src/).

A section that costs much more than the others can say so: `SECTIONS = {"big": harness.Section(fn, estimate_s=120)}`
starts it only if 120 s more than the reserve are left. A benchmark with its own JSON layout subclasses `Bench` and
overrides `save` and the hooks `skip`, `failed`, `done`, `stopped` (bench_speed.py does). Figures go to the
results page of the topic with the exact command, the device (`env`) and the date.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import _src

ROOT = _src.ROOT

# ----------------------------------------------------------------------------------------------- device


def pick_device(name: str | None) -> torch.device:
    """`--device`, or cuda when there is a GPU, else cpu."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def environment(device: torch.device) -> dict[str, Any]:
    """What a figure was measured on: device, GPU name, torch and triton versions, UTC date."""
    info: dict[str, Any] = {"torch": torch.__version__, "device": str(device),
                            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    info["cpu"] = platform.processor() or platform.machine() or "?"
    return info


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- timer


def times_ms(fn: Callable[[], Any], device: torch.device, warmup: int = 2, repeats: int = 5,
             sync_each: bool = True) -> list[float]:
    """Milliseconds of each of `repeats` calls of `fn`, after `warmup` calls and a sync.

    On a GPU, CUDA events: with `sync_each` one pair per call and a host sync after it (what one isolated call
    costs, launches included); without, one event between consecutive calls and one sync at the end (calls back
    to back, the host free to run ahead as in a real loop; their sum is the loop's time). On a CPU the host
    clock per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    if sync_each:
        times = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return times
    events = [torch.cuda.Event(enable_timing=True) for _ in range(repeats + 1)]
    events[0].record()
    for i in range(repeats):
        fn()
        events[i + 1].record()
    events[-1].synchronize()
    return [events[i].elapsed_time(events[i + 1]) for i in range(repeats)]


# ----------------------------------------------------------------------------------------------- budget


class BudgetExceeded(Exception):
    """Raised (by `hard_limit`'s alarm) when a section runs past the hard time limit."""


@contextlib.contextmanager
def hard_limit(seconds: float) -> Iterator[None]:
    """Raise BudgetExceeded in the main thread after `seconds` (SIGALRM; nothing where there is none)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise BudgetExceeded(f"hard time limit {seconds:.0f} s reached")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def child_env() -> dict[str, str]:
    """This environment with the ditkit tree the benchmark imports (`_src.SRC`) first on a child's PYTHONPATH."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(_src.SRC), os.environ.get("PYTHONPATH", "")])}


def run_command(cmd: list[str], timeout: float | None, tail_chars: int = 1500) -> dict[str, Any]:
    """Run `cmd` in a child with `child_env()`: {"rc" (or "timeout"), "wall_s", "tail" of its output}."""
    import subprocess

    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-tail_chars:]
    except subprocess.TimeoutExpired as exc:
        rc, tail = "timeout", str(exc.stderr or "")[-tail_chars:]
    return {"rc": rc, "wall_s": time.monotonic() - t0, "tail": tail}


def sample_in_child(argv: list[str], events: Path, timeout: float | None, tail_chars: int = 1500) -> dict[str, Any]:
    """`ditkit sample ARGV` timed as a user runs it, in a child (bench_sample.py --child) that also writes its
    phases to `events`: {"cmd", "rc", "wall_s", "tail", and "events": [(phase, start s, end s)] when written}."""
    import sys

    child = [sys.executable, str(ROOT / "benchmarks" / "bench_sample.py"), "--child", str(events), "--", *argv]
    row = {"cmd": "ditkit sample " + " ".join(argv), **run_command(child, timeout, tail_chars)}
    row["wall_s"] = round(row["wall_s"], 2)
    if events.exists():
        row["events"] = [(e[0], round(e[1], 2), round(e[2], 2)) for e in json.loads(events.read_text())]
    return row


def write_json(path: str | os.PathLike, data: Any) -> None:
    """`data` as indented JSON, written to a temporary file beside `path` and renamed over it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


class Bench:
    """What every section gets: the arguments, the device, the budget's clock, the timer and `results` (a JSON
    dict, saved atomically to `out` after each section). Subclasses may override the hooks `skip`, `failed`,
    `done` and `stopped` to record those events in their own format."""

    def __init__(self, args: argparse.Namespace | None = None, *, device: torch.device | str | None = None,
                 budget_s: float | None = None, out: str | None = None, results: dict[str, Any] | None = None):
        self.args = args if args is not None else argparse.Namespace()
        self.device = torch.device(device) if device is not None else pick_device(getattr(args, "device", None))
        if budget_s is None:
            budget_s = getattr(args, "budget_s", None)
        self.budget_s = math.inf if budget_s is None else budget_s
        self.out = out if out is not None else getattr(args, "out", None)
        self.start = time.monotonic()
        self.results: dict[str, Any] = {} if results is None else results

    @classmethod
    def from_args(cls, args: argparse.Namespace, **extra: Any) -> Bench:
        """A bench whose results start with the environment and the arguments."""
        bench = cls(args, **extra)
        bench.results = {"env": environment(bench.device), "args": vars(args), **bench.results}
        return bench

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def sync(self) -> None:
        sync(self.device)

    def times_ms(self, fn: Callable[[], Any], warmup: int = 2, repeats: int = 5, sync_each: bool = True
                 ) -> list[float]:
        return times_ms(fn, self.device, warmup, repeats, sync_each)

    def time_ms(self, fn: Callable[[], Any], warmup: int = 2, repeats: int = 5, sync_each: bool = True) -> float:
        """Median ms per call (see `times_ms`)."""
        return statistics.median(self.times_ms(fn, warmup, repeats, sync_each))

    def save(self) -> None:
        if self.out:
            write_json(self.out, self.results)

    # hooks of run_sections
    def skip(self, name: str, reason: str) -> None:
        self.results.setdefault("skipped", []).append(name)
        self.results.setdefault("skip_reasons", {})[name] = reason
        print(f"== {name} skipped: {reason}", flush=True)

    def failed(self, name: str, exc: BaseException) -> None:
        traceback.print_exc()
        self.results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:2000]

    def done(self, name: str, seconds: float) -> None:
        self.results.setdefault("section_s", {})[name] = round(seconds, 1)
        print(f"== {name} done in {seconds:.0f} s", flush=True)

    def stopped(self, exc: BudgetExceeded) -> None:
        self.results["stopped"] = str(exc)
        print(f"== stopped: {exc}", flush=True)


@dataclass
class Section:
    """A section with a cost estimate: it starts only if `estimate_s` more than the reserve is left."""

    run: Callable[[Any], Any]
    estimate_s: float = 0.0


def run_sections(bench: Bench, names: list[str], sections: dict[str, Callable[[Any], Any] | Section],
                 reserve_s: float, tail_chars: int | None = None, report: bool = True) -> int:
    """Run `sections[name](bench)` for each name in order while the budget allows, saving after each; a
    BudgetExceeded (see `hard_limit`) ends the run. With `report`, print the results (their last `tail_chars`
    characters) at the end. Returns 0, or 1 when a section failed."""
    try:
        for name in names:
            section = sections[name]
            section = section if isinstance(section, Section) else Section(section)
            left = bench.left()
            if left < reserve_s + section.estimate_s:
                bench.skip(name, f"budget: {max(left, 0):.0f} s left, {reserve_s + section.estimate_s:.0f} s needed")
                bench.save()
                continue
            t0 = time.monotonic()
            try:
                section.run(bench)
            except BudgetExceeded:
                raise
            except Exception as exc:  # keep the other sections' results; say what failed
                bench.failed(name, exc)
            bench.done(name, time.monotonic() - t0)
            bench.save()
    except BudgetExceeded as exc:
        bench.stopped(exc)
        bench.save()
    if report:
        text = json.dumps({k: v for k, v in bench.results.items() if k != "args"}, indent=1, default=str)
        print(text if tail_chars is None else text[-tail_chars:])
    return 0 if "errors" not in bench.results else 1


def parser(doc: str | None, sections: dict[str, Any], budget_s: float | None = 540.0,
           reserve_s: float | None = 20.0, quick_help: str = "tiny sizes, a few steps (a CPU smoke run)"
           ) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark shares: --out, --device, --quick, --sections,
    --budget-s and --reserve-s (the last two left out when their default is None)."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    p.add_argument("--out", default=None, help="write the results as JSON here (after each section)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--quick", action="store_true", help=quick_help)
    if sections:
        p.add_argument("--sections", nargs="+", default=list(sections), choices=list(sections))
    if budget_s is not None:
        p.add_argument("--budget-s", type=float, default=budget_s, help="stop starting new work after this")
    if reserve_s is not None:
        p.add_argument("--reserve-s", type=float, default=reserve_s)
    return p
