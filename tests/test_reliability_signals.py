"""SIGINT (Ctrl-C, and what some schedulers send before preemption) through the `ditkit` command line: training
writes a checkpoint at the step it reached, says so, and exits 0; `--resume auto` continues from it to the same
weights as a run never interrupted. (SIGTERM through the Python API is covered in test_train.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from ditkit.models import DiT, DiTConfig
from ditkit.train.checkpoint import list_checkpoints, load_training_checkpoint
from helpers.models import TINY
from helpers.models import tiny_dit as _tiny
from helpers.processes import ENV

# The CLI's own entry point, with the tiny model (the command line takes only the paper's model names).
SCRIPT = textwrap.dedent(
    f"""
    import sys
    from ditkit import train as t
    from ditkit.cli import main
    real = t.TrainOptions
    t.TrainOptions = lambda **kw: real(**kw, model_overrides={TINY!r})
    sys.exit(main(["train", "--data-path", "digits", "--model", "DiT-S/2", "--image-size", "8",
                   "--global-batch-size", "16", "--lr", "1e-3", "--log-every", "1", "--ckpt-every", "1000",
                   "--num-workers", "0", "--no-progress", "--resume", "auto", "--results-dir", sys.argv[1],
                   "--max-steps", sys.argv[2]]))
    """
)


def test_sigint_checkpoints_exits_zero_and_resumes_exactly(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(run), "30"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    metrics = run / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):  # a few steps done
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:] if proc.poll() else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "stopped by signal SIGINT" in err and "exiting cleanly" in err
    (ckpt,) = list_checkpoints(run / "checkpoints")
    stopped_at = int(ckpt.name)
    assert 3 <= stopped_at < 30
    assert f"checkpoint written at step {stopped_at}" in err
    load_training_checkpoint(ckpt, _tiny())  # complete and readable

    done = subprocess.run([sys.executable, "-c", SCRIPT, str(run), "30"], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from {ckpt} at step {stopped_at}" in done.stderr
    clean = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "clean"), "30"], env=ENV,
                           capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr[-2000:]
    a = load_training_checkpoint(run / "checkpoints" / "0000030", _tiny())
    b = load_training_checkpoint(tmp_path / "clean" / "checkpoints" / "0000030", _tiny())
    for key, value in b.model.items():
        assert torch.equal(value, a.model[key]), key
    for key, value in b.ema.items():
        assert torch.equal(value, a.ema[key]), key


# The same entry point on an image folder with real DataLoader worker processes (digits use none).
WORKER_SCRIPT = textwrap.dedent(
    f"""
    import sys
    from ditkit import train as t
    from ditkit.cli import main
    real = t.TrainOptions
    t.TrainOptions = lambda **kw: real(**kw, model_overrides={TINY!r})
    sys.exit(main(["train", "--data-path", sys.argv[3], "--model", "DiT-S/2", "--image-size", "8",
                   "--global-batch-size", "4", "--log-every", "1", "--ckpt-every", "1000", "--num-workers", "2",
                   "--no-progress", "--resume", "auto", "--results-dir", sys.argv[1], "--max-steps", sys.argv[2]]))
    """
)


def _image_folder(root: Path, per_class: int = 8) -> Path:
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (12, 12, 3), generator=rng, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


def test_sigterm_to_the_process_group_with_dataloader_workers_checkpoints_and_resumes(tmp_path):
    """What SLURM sends before pre-emption: SIGTERM to every process of the job, the DataLoader workers
    included (`setsid` + `kill -TERM -- -PGID`). The workers must not die under the trainer: it writes a
    checkpoint at the step it reached, exits 0, and `--resume auto` continues from there."""
    images = _image_folder(tmp_path / "images")
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, str(run), "100000", str(images)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    metrics = run / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 6):  # past an epoch boundary (4 steps)
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:] if proc.poll() else ""
        time.sleep(0.05)
    # Workers are started afresh each epoch (4 steps), so wait for a moment at which both of them run.
    children_file = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    while len(children_file.read_text().split()) < 2:
        assert proc.poll() is None and time.time() < deadline, "the DataLoader worker processes are missing"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group: trainer and workers
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "stopped by signal SIGTERM" in err, err[-2000:]
    (ckpt,) = list_checkpoints(run / "checkpoints")
    stopped_at = int(ckpt.name)
    assert f"checkpoint written at step {stopped_at}" in err
    tiny3 = DiT(DiTConfig.from_name("DiT-S/2", input_size=8, in_channels=3, num_classes=2, **TINY))
    load_training_checkpoint(ckpt, tiny3)

    done = subprocess.run([sys.executable, "-c", WORKER_SCRIPT, str(run), str(stopped_at + 2), str(images)],
                          env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from {ckpt} at step {stopped_at}" in done.stderr
    assert [int(p.name) for p in list_checkpoints(run / "checkpoints")][-1] == stopped_at + 2


# A SIGTERM sent to the process itself at a chosen moment outside the step loop: `HOOK` names the function of
# ditkit.train.loop that is wrapped, `WHEN` whether the signal goes before it runs or after it returned.
HOOKED_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from ditkit.train import loop
    HOOK, WHEN = sys.argv[3], sys.argv[4]
    original = getattr(loop, HOOK)  # not `real`: the script below uses that name
    def hooked(*args, **kwargs):
        if WHEN == "before":
            os.kill(os.getpid(), signal.SIGTERM)
        out = original(*args, **kwargs)
        if WHEN == "after":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the signal is delivered here if nothing catches it
        return out
    setattr(loop, HOOK, hooked)
    """
) + SCRIPT.replace("sys.exit(main(", "code = main(") .replace("]))", "])\nsys.exit(code)")


def _hooked(tmp_path: Path, hook: str, when: str, steps: int = 5) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HOOKED_SCRIPT, str(tmp_path / "run"), str(steps), hook, when],
                          env=ENV, capture_output=True, text=True, timeout=300)


def test_a_sigterm_after_training_returned_lets_the_finished_run_exit_zero(tmp_path):
    """A scheduler's SIGTERM that lands as the job finishes (after its last checkpoint): exit 0, not -15."""
    done = _hooked(tmp_path, "train", "after")
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert [int(p.name) for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [5]


def test_a_sigterm_during_set_up_stops_after_the_first_step_with_a_checkpoint(tmp_path):
    """A SIGTERM before the step loop began (here while the data is opened) is not lost and does not kill the
    process: the first step runs, its checkpoint is written, and the run exits 0 saying so."""
    done = _hooked(tmp_path, "open_data", "before")
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "stopped by signal SIGTERM at step 1" in done.stderr, done.stderr[-2000:]
    assert [int(p.name) for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [1]
