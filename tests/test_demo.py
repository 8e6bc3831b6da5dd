"""`ditkit demo` end to end on a few steps: it trains, resumes, writes the grid and prints its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_demo_runs_end_to_end_and_reuses_training(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC}
    cmd = [sys.executable, "-m", "ditkit", "demo", "--results-dir", str(tmp_path / "demo"), "--steps", "4",
           "--num-samples", "20", "--per-class", "2", "--json"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    figures = json.loads(first.stdout.strip().splitlines()[-1])
    assert 0.0 <= figures["accuracy"] <= 1.0 and figures["frechet"] >= 0.0
    assert Path(figures["grid"]).stat().st_size > 0
    assert "digit-class accuracy of 20 guided samples" in first.stdout
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr and "at step 4" in again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["accuracy"] == figures["accuracy"]


def test_demo_bad_arguments_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC}
    cmd = [sys.executable, "-m", "ditkit", "demo", "--results-dir", str(tmp_path / "d"), "--steps", "0"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "--steps must be at least 1" in done.stderr and "Traceback" not in done.stderr
