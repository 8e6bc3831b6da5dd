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

from ditkit.errors import UserError
from ditkit.folder_lock import FolderLock
from ditkit.models.config import MODEL_NAMES
from ditkit.objectives import sampler_names
from ditkit.sample.grid import sample_grid
from ditkit.sample.npz import sample_npz
from ditkit.sample.pipeline import load_for_sampling
from ditkit.sample.prompts import add_prompt_arguments, run_prompts

OFFICIAL_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # the official sample.py's demo classes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ckpt",
        required=True,
        help="checkpoint file (official .pt, train.py dict, ditkit "
        "safetensors) or a released name: DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt (downloaded)",
    )
    parser.add_argument("--model", choices=MODEL_NAMES, help="expected model (default: from the checkpoint)")
    parser.add_argument("--image-size", type=int, help="image side in pixels (default: from the checkpoint)")
    parser.add_argument("--num-classes", type=int, help="number of classes (default: from the checkpoint)")
    parser.add_argument(
        "--in-channels",
        type=int,
        help="model input channels when --model is given (default 4 with --vae; else from the checkpoint)",
    )
    parser.add_argument("--vae", help="VAE folder or Hugging Face id (offline cache) for latent models")
    parser.add_argument("--class-labels", type=int, nargs="+", help="one grid row per label (default: 0..7)")
    parser.add_argument("--per-label", type=int, default=4, help="samples per label in the grid (default 4)")
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help="guidance scale; 1 = none (default 4.0; 1 for meanflow models: guidance is trained in)")
    parser.add_argument(
        "--guide-channels",
        default="3",
        choices=["3", "all"],
        help="ε channels guided: 3 as the official code (default) or all",
    )
    parser.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        metavar=("T_LO", "T_HI"),
        help="guide only for timesteps in [T_LO, T_HI] (diffusion: 0..999; flow: t in 0..1, 1 = data)",
    )
    parser.add_argument("--sampler", choices=list(sampler_names()), default=None,
                        help="default: the checkpoint's process's first: ddpm (diffusion), dopri5 (flow)")
    parser.add_argument("--num-steps", type=int, help="sampling steps (default: ddpm 250, ddim 50, dpm-solver 20; "
                        "flow: euler 50, heun 25, sde-euler/sde-heun 250; dopri5 is adaptive)")
    parser.add_argument("--time-shift", type=float, default=1.0,
                        help="flow: SD3's timestep shift of the step grid (>1: more steps at high noise)")
    parser.add_argument("--objective", choices=["diffusion", "flow"], default=None,
                        help="the process of a checkpoint that records none (default: flow/velocity for files "
                        "named SiT-*, else diffusion); a checkpoint's own recipe cannot be overridden")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 = deterministic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="samples", help="output folder (default ./samples)")
    parser.add_argument("--save-images", action="store_true", help="also write each grid image as a PNG")
    parser.add_argument(
        "--num-samples",
        type=int,
        help="evaluation mode: N samples, labels uniform over the "
        "classes, sharded over torchrun processes, into OUT/samples_N.npz (ADM layout)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="samples per shard and process (default 32)")
    parser.add_argument(
        "--precision", choices=["fp32", "tf32", "bf16", "fp8"], default=None,
        help="default: bf16 on a GPU, fp32 on a CPU (fp32/tf32 for bit-level comparisons; fp8: FP8 block matmuls)",
    )
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile each DiT block (default: off; on a GPU the eager fused kernels sample faster, "
        "without the compile's start-up)",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: this process's GPU if any, else cpu)")
    parser.add_argument(
        "--cache-dir", help="where released checkpoints are kept (default $DITKIT_CACHE or ~/.cache/ditkit)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_prompt_arguments(parser)



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


def run(args: argparse.Namespace) -> int:
    from ditkit import distributed

    info = distributed.env_info()
    device = _device(args.device) if args.device else info.device
    out = Path(args.out)
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
