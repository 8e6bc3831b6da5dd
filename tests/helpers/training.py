"""TrainOptions for tiny training runs (the tiny DiT on sklearn's 8×8 digits, on the CPU) and their logs."""

from __future__ import annotations

import json
from pathlib import Path

from ditkit.train import TrainOptions
from helpers.models import TINY

# Every setting of a tiny run but its length and folder (also written into subprocess scripts, see processes).
TRAIN_TINY = dict(data_path="digits", model="DiT-S/2", image_size=8, global_batch_size=16, log_every=1, lr=1e-3,
                  num_workers=0, progress=False, model_overrides=TINY)
# The same run on the `ditkit train` command line (the CLI takes only the paper's model names: no overrides).
TINY_FLAGS = ["--data-path", "digits", "--model", "DiT-S/2", "--image-size", "8", "--num-workers", "0", "--no-progress"]


def train_options(results_dir: Path | str, **kw) -> TrainOptions:
    """A tiny run writing into `results_dir`; `kw` sets or overrides any TrainOptions field."""
    return TrainOptions(**{**TRAIN_TINY, "model_overrides": dict(TINY), "results_dir": str(results_dir), **kw})


def options(tmp_path: Path, **kw) -> TrainOptions:
    """The training tests' run: 6 steps, checkpoints at 3 and 6, results in `tmp_path / "run"` (kw overrides any
    of these, results_dir included)."""
    results_dir = kw.pop("results_dir", tmp_path / "run")
    return train_options(results_dir, **{"max_steps": 6, "ckpt_every": 3, **kw})


def read_losses(results: Path) -> dict[int, float]:
    """step -> loss, from a run's metrics.jsonl."""
    lines = (results / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}
