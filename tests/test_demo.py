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


# `ditkit demo` with a SIGTERM sent to itself while training opens its data (before the step loop).
STOPPED_SCRIPT = """
import os, signal, sys
from ditkit.cli import main
from ditkit.train import loop
original = loop.open_data
def hooked(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)
loop.open_data = hooked
sys.exit(main(sys.argv[1:]))
"""


def test_a_demo_stopped_by_sigterm_keeps_its_checkpoint_and_samples_nothing(tmp_path):
    """A stop during training ends the demo there (exit 0, the checkpoint kept, no figures from a half-trained
    model); the same command again continues the training."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    args = ["demo", "--results-dir", str(tmp_path / "demo"), "--steps", "3", "--num-samples", "20"]
    done = subprocess.run([sys.executable, "-c", STOPPED_SCRIPT, *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training stopped by a signal at step 1 (checkpoint written)" in done.stderr, done.stderr[-3000:]
    assert "[2/3]" not in done.stderr and not (tmp_path / "demo" / "demo.json").exists()
    assert (tmp_path / "demo" / "checkpoints" / "0000001").is_dir()
