"""`ditkit sample`: images from a DiT checkpoint, as a labelled grid or as an ADM `.npz` for evaluation.

    ditkit sample --ckpt DiT-XL-2-256x256.pt --vae stabilityai/sd-vae-ft-ema --class-labels 207 360 --cfg-scale 4
    ditkit sample --ckpt run/ckpt.safetensors --sampler dpm-solver --num-steps 20 --out samples
    torchrun --nproc_per_node 8 -m ditkit sample --ckpt ... --num-samples 50000 --out eval   # FID protocol

Without `--vae` the model works in pixel space: its input is C×S×S pixels in [-1, 1] (C = 1 or 3) and
`--image-size` is S. With `--vae` the model's input is the VAE's latents (S/8) and the VAE decodes them.
A seed fixes every sample: the grid is the same for the same arguments; in `--num-samples` mode every shard's
labels and noise depend only on (seed, shard index), so the result does not depend on the number of GPUs and
an interrupted run resumes by skipping the shards already written.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

import torch

from ditkit.runtime import counts
from ditkit.runtime.errors import UserError
from ditkit.runtime.folder_lock import FolderLock
from ditkit.runtime.path_guard import refuse_overlap
from ditkit.sample.grid import sample_grid
from ditkit.sample.npz import sample_npz
from ditkit.sample.options import SampleOptions, add_arguments
from ditkit.sample.pipeline import load_for_sampling
from ditkit.sample.presets import apply_preset, describe_preset
from ditkit.sample.prompts import run_prompts

__all__ = ["OFFICIAL_LABELS", "add_arguments", "run"]  # the verb: its flags (from SampleOptions) and its run
OFFICIAL_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # the official sample.py's demo classes


def _device(text: str) -> torch.device:
    """--device as a torch device that exists on this machine, or one line saying what to pass instead."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UserError(f"bad --device {text!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {text} given but no GPU is visible; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {text}: only {count} GPU(s) are visible (cuda:0..cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {text} given but MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {text}: ditkit samples on cpu, cuda or mps")
    return device


def run(args: argparse.Namespace | SampleOptions) -> int:
    """`ditkit sample` with parsed flags or options."""
    from ditkit.runtime import distributed
    args = SampleOptions.of(args)

    info = distributed.env_info()
    device = _device(args.device) if args.device else info.device
    if info.is_main and args.preset:
        print(describe_preset(args.preset, apply_preset(args)))
    else:
        apply_preset(args)
    out = Path(args.out)
    counts.sample_flags(args)  # counts bounded before anything is read or allocated
    refuse_overlap({"--ckpt": args.ckpt, "--vae": args.vae}, out, "--out", allow=("contains", "is inside"))
    if args.num_samples is None:
        sampler = load_for_sampling(args, device)
        with FolderLock(out, "ditkit sample", "--out"):  # one writer; a read-only --out is named before sampling
            if sampler.model.config.is_text:
                print(sampler.describe())
                print(f"wrote {run_prompts(args, sampler, out)}")
                return 0
            labels = args.class_labels
            if labels is None:
                n = sampler.model.config.num_classes
                labels = OFFICIAL_LABELS if n == 1000 else list(range(min(n, 8)))
            print(sampler.describe())
            path = sample_grid(sampler, labels, args.per_label, args.seed, out, args.save_images)
        print(f"wrote {path}")
        return 0
    # The device by the local rank (a bare --device cuda too); ranks that finish their shards early wait for the
    # slowest at the end, so allow hours, not a training step's timeout.
    info = distributed.init(device=device if args.device else None, timeout=timedelta(hours=6))
    device = info.device
    lock = None
    try:
        sampler = load_for_sampling(args, device)
        if sampler.model.config.is_text:
            if info.world_size > 1:
                raise UserError("text models sample --num-samples in one process; run without torchrun")
            print(sampler.describe())
            print(f"wrote {run_prompts(args, sampler, out)}")
            return 0
        if info.is_main:
            lock = FolderLock(out, "ditkit sample", "--out")
            counts.sample_space(args.num_samples, sampler.recipe.image_size, out)
            print(sampler.describe())
        if info.is_main and args.class_labels:
            print("note: --class-labels is ignored with --num-samples (labels are uniform over the classes)")
        path = sample_npz(sampler, args.num_samples, args.batch_size, args.seed, out, info.rank, info.world_size)
        if path is not None:
            print(f"wrote {path}")
    finally:
        if lock is not None:
            lock.release()
        distributed.cleanup()
    return 0
