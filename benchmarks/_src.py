"""Imported first by every benchmark (directly or through `harness`): puts this checkout's src/ on sys.path, so a
benchmark runs from a checkout without installing ditkit and the checkout's ditkit wins over an installed one.
The one place in benchmarks/ that sets the source path (named with a leading underscore so that import sorting
keeps it above `import ditkit`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# BENCH_DITKIT_SRC: another ditkit tree for a child process that times the code before a change (bench_meanflow)
SRC = Path(os.environ.get("BENCH_DITKIT_SRC") or ROOT / "src")
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))
