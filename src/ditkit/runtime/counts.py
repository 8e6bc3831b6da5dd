"""Counts from flags, bounded before work starts (issue 30, class 4).

`ditkit sample --num-samples 10^12` used to allocate until memory ran out, and `demo`/`scaling` started minutes
of training with counts no run could finish. Every count a verb takes is checked here against what its output
could hold (and, for files, the free space of the disk they go to), with one line naming the flag, the allowed
range and, for space, what it needs and what is free.

| count                                    | bound                                        |
| ---------------------------------------- | -------------------------------------------- |
| training steps                           | `MAX_TRAIN_STEPS` (10^8; DiT-XL/2 trained 7·10^6) |
| samples scored or written (`.npz`)       | `MAX_SAMPLES` (10^7; the FID protocol uses 5·10^4), and the disk |
| images in one grid picture               | `MAX_GRID_IMAGES` (4,096)                     |
| a batch                                  | `MAX_BATCH` (65,536)                          |
| sampling steps                           | `MAX_SAMPLE_STEPS` (10,000)                   |
| extract / evaluate batches, shard size   | `MAX_BATCH`, 10^6 images a shard                |
| model sizes (overrides, `--image-size`)  | `validate.LIMITS`, checked by `DiTConfig` where models are built |
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ditkit.runtime.errors import UserError

MAX_TRAIN_STEPS = 10**8
MAX_SAMPLES = 10**7
MAX_GRID_IMAGES = 4096
MAX_BATCH = 65_536
MAX_SAMPLE_STEPS = 10_000


def bounded(value: Any, flag: str, lo: int, hi: int) -> int:
    """`value` when it is an integer in lo..hi, else one line naming `flag` and the range."""
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise UserError(f"{flag} must be at least {lo:,} and at most {hi:,}, got {value}")
    return value


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Free space of the file system `folder` (or its nearest existing parent) is on; None if unknown."""
    path = Path(os.path.abspath(folder))
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the files already under `folder` (a resumed run's shards), 0 when it does not exist."""
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def check_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse a job whose output needs more than the free space where it goes (counting what a resumed job has
    written there already)."""
    free = free_bytes(folder)
    if free is None:
        return
    missing = needed - folder_bytes(folder) if Path(folder).exists() else needed
    if missing > free:
        raise UserError(f"{what} needs about {_size(needed)} in {folder} but its disk has {_size(free)} free; "
                        "ask for fewer, or choose a folder on a larger disk")


def _size(n: int | float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} EB"


def sample_space(num_samples: int, image_size: int, out: str | os.PathLike, channels: int = 3) -> None:
    """`sample --num-samples`: the shards and the final `.npz` each hold every image as uint8 pixels."""
    needed = 2 * num_samples * image_size * image_size * channels
    check_space(out, needed, f"--num-samples {num_samples:,} at {image_size}×{image_size}")


def sample_flags(args: Any) -> None:
    """The counts of `ditkit sample`'s flags (before the checkpoint is read)."""
    if args.num_samples is not None:
        bounded(args.num_samples, "--num-samples", 1, MAX_SAMPLES)
    bounded(args.batch_size, "--batch-size", 1, MAX_BATCH)
    bounded(args.per_label, "--per-label", 1, MAX_GRID_IMAGES)
    labels = len(args.class_labels) if args.class_labels else 8
    if args.num_samples is None and labels * args.per_label > MAX_GRID_IMAGES:
        raise UserError(f"the grid would hold {labels} labels × --per-label {args.per_label} = "
                        f"{labels * args.per_label:,} images; at most {MAX_GRID_IMAGES:,} fit one picture")
    if args.num_steps is not None:
        bounded(args.num_steps, "--num-steps", 1, MAX_SAMPLE_STEPS)


def run_counts(values: Iterable[tuple[str, Any, int, int]]) -> None:
    """Check (flag, value, lo, hi) tuples, skipping values left None (a default decided later)."""
    for flag, value, lo, hi in values:
        if value is not None:
            bounded(value, flag, lo, hi)


def demo_flags(args: Any) -> None:
    """`ditkit demo`: training steps, samples scored, grid columns per class (10 classes)."""
    run_counts([("--steps", args.steps, 1, MAX_TRAIN_STEPS), ("--num-samples", args.num_samples, 20, MAX_SAMPLES),
                ("--per-class", args.per_class, 1, MAX_GRID_IMAGES // 10)])


def scaling_options(opts: Any) -> None:
    """`ditkit scaling`: steps, samples, batch, sampling steps and image size (its models are checked by the
    scaling app itself, which knows the configs)."""
    run_counts([("--steps", opts.steps, 1, MAX_TRAIN_STEPS), ("--num-samples", opts.num_samples, 20, MAX_SAMPLES),
                ("--batch-size", opts.batch_size, 1, MAX_BATCH),
                ("--sample-steps", opts.sample_steps, 1, MAX_SAMPLE_STEPS), ("--image-size", opts.image_size, 1, 4096)])


def train_options(opts: Any) -> None:
    """`ditkit train`: steps, batch, and the model the flags and overrides describe (built later from them)."""
    run_counts([("--max-steps", opts.max_steps, 1, MAX_TRAIN_STEPS),
                ("--global-batch-size", opts.global_batch_size, 1, MAX_BATCH),
                ("--image-size", opts.image_size, 1, 65_536), ("--eval-samples", opts.eval_samples, 2, MAX_SAMPLES)])
    if not isinstance(opts.model_overrides, dict):
        raise UserError("--model-overrides must be a JSON object of model config fields")


def extract_flags(args: Any) -> None:
    """`ditkit extract`: crop side, VAE batch, shard size, decoding workers, caption tokens."""
    run_counts([("--image-size", args.image_size, 1, 65_536), ("--batch-size", args.batch_size, 1, MAX_BATCH),
                ("--shard-size", args.shard_size, 1, 1_000_000), ("--workers", args.workers, 0, 1024),
                ("--max-tokens", getattr(args, "max_tokens", None), 1, 65_536)])
