"""The section runner that the GPU benchmarks share (bench_kernels.py, bench_sample.py).

A device call has a fixed time budget, so a benchmark is a list of named sections run in order: a section is
skipped once too little of the budget is left, and one that fails is recorded with its error while the others
still run, so that a single call always brings back every figure it could measure.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class BenchBase:
    """What every section gets: the arguments (`--device`, `--budget-s`, `--out`), the device, the budget's
    clock, and `results`, saved atomically to `--out` after each section."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.start = time.monotonic()
        self.results: dict[str, Any] = {}

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.start)

    def save(self) -> None:
        if not self.args.out:
            return
        tmp = Path(self.args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        os.replace(tmp, self.args.out)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def run_sections(bench: Any, names: list[str], sections: dict[str, Callable[[Any], None]], reserve_s: float,
                 tail_chars: int | None = None) -> int:
    """Run `sections[name](bench)` for each name while `bench.left()` exceeds `reserve_s`, saving the results
    (`bench.results`, `bench.save()`) after each; print them at the end (the last `tail_chars` characters).
    Returns 0, or 1 when a section failed."""
    for name in names:
        if bench.left() < reserve_s:
            bench.results.setdefault("skipped", []).append(name)
            continue
        t0 = time.monotonic()
        try:
            sections[name](bench)
        except Exception as exc:  # keep the other sections' results; say what failed
            traceback.print_exc()
            bench.results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:2000]
        bench.results.setdefault("section_s", {})[name] = round(time.monotonic() - t0, 1)
        bench.save()
        print(f"== {name} done in {time.monotonic() - t0:.0f} s", flush=True)
    text = json.dumps({k: v for k, v in bench.results.items() if k != "args"}, indent=1, default=str)
    print(text if tail_chars is None else text[-tail_chars:])
    return 0 if "errors" not in bench.results else 1
