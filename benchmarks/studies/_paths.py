"""Imported first by every study: makes benchmarks/ importable from here (its `_src` puts src/ on sys.path and
its `harness` is the benchmarks' shared layer), since `python benchmarks/studies/x.py` puts only this folder on
sys.path."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1]
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import _src  # noqa: E402, F401

ROOT = _src.ROOT
