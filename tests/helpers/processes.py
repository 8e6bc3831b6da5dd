"""Tests that start Python processes: their environment, free ports, training scripts, and the SIGKILL-resume
harness (kill a run after a checkpoint, resume it, compare with a run never interrupted)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from ditkit.train.checkpoint import load_training_checkpoint
from helpers.models import tiny_dit
from helpers.training import TRAIN_TINY

SRC = str(Path(__file__).resolve().parents[2] / "src")
# One thread per process: several processes share the CI box's two cores.
ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_script(**kw) -> str:
    """A python -c program that trains the tiny model into the folder given as its first argument."""
    settings = dict(TRAIN_TINY, **kw)
    return textwrap.dedent(
        f"""
        import sys
        from ditkit.train import TrainOptions, train
        result = train(TrainOptions(results_dir=sys.argv[1], **{settings!r}))
        print("stopped by signal" if result.stopped_by_signal else "finished", result.step, flush=True)
        """
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until `path` exists and, for a file, has content."""
    deadline = time.time() + timeout
    while not path.exists() or (path.is_file() and path.stat().st_size == 0):
        assert proc.poll() is None, "training ended before it could be interrupted"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def assert_sigkill_resume_matches_uninterrupted(tmp_path: Path, script: str, final_step: int) -> None:
    """Run `script` (a train_script with resume="auto"), SIGKILL it after its step-4 checkpoint, run it again to
    the end, and check its final EMA and model equal those of a run never interrupted."""
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", script, str(run_dir)], env=ENV, stderr=subprocess.DEVNULL)
    wait_for(run_dir / "checkpoints" / "0000004", proc)
    proc.kill()
    proc.wait()
    done = subprocess.run([sys.executable, "-c", script, str(run_dir)], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "clean")], env=ENV, check=True, capture_output=True)
    last = f"{final_step:07d}"
    killed = load_training_checkpoint(run_dir / "checkpoints" / last, tiny_dit())
    clean = load_training_checkpoint(tmp_path / "clean" / "checkpoints" / last, tiny_dit())
    for part in ("ema", "model"):
        for k, v in getattr(clean, part).items():
            assert torch.equal(v, getattr(killed, part)[k]), (part, k)
