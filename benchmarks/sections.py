"""Old home of the section runner (bench_kernels.py and bench_sample.py used it): now `harness.py`.

Kept so that benchmarks written against it still run; new code imports `harness`."""

from __future__ import annotations

from harness import Bench as BenchBase
from harness import run_sections

__all__ = ["BenchBase", "run_sections"]
