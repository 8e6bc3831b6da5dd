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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditkit.diffusion import samplers
from ditkit.diffusion.guidance import guided
from ditkit.errors import UserError
from ditkit.folder_lock import FolderLock
from ditkit.models.config import MODEL_NAMES

DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpm-solver": 20}
OFFICIAL_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # the official sample.py's demo classes


# ----------------------------------------------------------------------------------------------- set-up


@dataclass
class Sampler:
    """Everything needed to turn (labels, seed) into images: the model, the VAE and the sampler settings."""

    model: torch.nn.Module
    vae: Any | None
    sampler: str = "ddpm"
    num_steps: int = 250
    cfg_scale: float = 1.0
    guide_channels: int | str = 3
    interval: tuple[float, float] | None = None
    eta: float = 0.0
    device: torch.device = torch.device("cpu")
    progress: bool = False
    precision: str = "fp32"

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.model.config
        return (c.in_channels, c.input_size, c.input_size)

    def evaluations_per_image(self) -> int:
        """Network evaluations each image costs with these settings (2 per guided step)."""
        steps = samplers.steps_for(self.sampler, self.num_steps)
        from ditkit.diffusion import create_diffusion

        return samplers.model_evaluations(create_diffusion(steps), self.cfg_scale, self.interval)

    def describe(self) -> str:
        guidance = f"cfg {self.cfg_scale:g} on {self.guide_channels} channels" if self.cfg_scale != 1 else "no cfg"
        return (
            f"{self.model.config.name}, {self.sampler} {self.num_steps} steps, {guidance}: "
            f"{self.evaluations_per_image()} model evaluations per image"
        )

    def settings(self) -> dict[str, Any]:
        """What determines the samples besides (seed, labels): recorded with evaluation shards, so that a
        resumed run never mixes shards made with other settings. The weights enter as a fingerprint."""
        with torch.no_grad():
            fingerprint = sum(float(p.detach().double().sum()) for p in self.model.parameters())
        return {
            "model": self.model.config.to_dict(),
            "weights": f"{fingerprint:.10g}",
            "vae": getattr(self.vae, "name", None),
            "sampler": self.sampler,
            "num_steps": self.num_steps,
            "cfg_scale": self.cfg_scale,
            "guide_channels": self.guide_channels,
            "interval": list(self.interval) if self.interval else None,
            "eta": self.eta,
            "precision": self.precision,
        }

    def denoiser(self):
        """The model, wrapped for classifier-free guidance when the scale is not 1."""
        if self.cfg_scale == 1.0:
            return self.model
        return guided(self.model, self.cfg_scale, self.model.num_classes, self.guide_channels, self.interval)

    @torch.no_grad()
    def images(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 images N×H×W×C for `labels`, noise and sampler noise drawn from `generator` (on self.device)."""
        noise = torch.randn(
            (len(labels), *self.latent_shape), generator=generator, device=self.device, dtype=torch.float32
        )
        config = self.model.config
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        with autocast:
            x = samplers.sample(
                self.denoiser(),
                noise,
                sampler=self.sampler,
                num_steps=self.num_steps,
                model_kwargs={"y": labels.to(self.device)},
                eta=self.eta,
                # x̂₀ clipping to [-1, 1] is right for pixels; latents have no such range (DiT does not clip).
                clip_denoised=self.vae is None,
                generator=generator,
                progress=self.progress,
                learn_sigma=config.learn_sigma,
            )
        x = x.float()
        if self.vae is not None:
            x = self.vae.decode(x)
        # The official sample_ddp.py's conversion: 127.5·x + 128, clamped, truncated.
        return torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)


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
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale; 1 = none (default 4.0)")
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
        help="guide only for timesteps in [T_LO, T_HI] (0..999)",
    )
    parser.add_argument("--sampler", choices=list(samplers.SAMPLERS), default="ddpm")
    parser.add_argument("--num-steps", type=int, help="sampling steps (default: ddpm 250, ddim 50, dpm-solver 20)")
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
    parser.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: this process's GPU if any, else cpu)")
    parser.add_argument(
        "--cache-dir", help="where released checkpoints are kept (default $DITKIT_CACHE or ~/.cache/ditkit)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


MAX_SEED = 2**32 - 1  # seeds are combined as seed·1_000_003 + shard, which must stay within torch's 64 bits


def _check_args(args: argparse.Namespace, factor: int | None = None) -> None:
    """Argument checks; those that need the VAE's downsampling `factor` run once it is known."""
    if args.image_size is not None:
        if args.image_size < 1:
            raise UserError(f"--image-size must be positive, got {args.image_size}")
        if factor is not None and args.model:
            patch = int(args.model.split("/")[1])
            step = factor * patch
            if args.image_size % step:
                low = max(step, args.image_size // step * step)
                raise UserError(
                    f"--image-size {args.image_size} is not divisible by {step} (VAE factor {factor} × patch "
                    f"{patch}); use e.g. {low} or {low + step}"
                )
        elif factor is not None and args.image_size % factor:
            raise UserError(f"--image-size {args.image_size} is not divisible by the VAE factor {factor}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be in 0..{MAX_SEED}, got {args.seed}")
    if args.num_steps is not None and args.num_steps < 2:
        raise UserError(f"--num-steps must be at least 2, got {args.num_steps}")
    if args.per_label < 1 or args.batch_size < 1:
        raise UserError("--per-label and --batch-size must be at least 1")
    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {args.num_samples}")
    if not args.eta >= 0:
        raise UserError(f"--eta must be >= 0 (0 = deterministic DDIM), got {args.eta}")
    if args.cfg_scale < 0:
        raise UserError(f"--cfg-scale must be >= 0, got {args.cfg_scale}")
    if args.guidance_interval and args.guidance_interval[0] > args.guidance_interval[1]:
        raise UserError("--guidance-interval takes T_LO T_HI with T_LO <= T_HI")


def load_for_sampling(args: argparse.Namespace, device: torch.device) -> Sampler:
    """Model (checked against --model/--image-size/--num-classes), VAE and settings from the arguments."""
    from ditkit import pretrained
    from ditkit.checkpoints import load_model

    _check_args(args)
    name = Path(args.ckpt).name
    released = pretrained.PRETRAINED.get(name) if not Path(args.ckpt).exists() else None
    path = pretrained.resolve_checkpoint(args.ckpt, args.cache_dir, progress=not args.no_progress)
    vae_name = args.vae
    if released is not None:
        vae_name = vae_name or "stabilityai/sd-vae-ft-ema"  # the authors sample their release through it
        args.model = args.model or released.model
        args.image_size = args.image_size or released.image_size
        args.num_classes = args.num_classes or released.num_classes
        _check_args(args)
    vae = None
    if vae_name:
        from ditkit.autoencoder import load_vae  # diffusers is imported only when a VAE is used

        vae = load_vae(vae_name, device=device)
        _check_args(args, vae.downsample)  # the latent side is the image side over this VAE's own factor
    overrides: dict[str, Any] = {}
    factor = vae.downsample if vae is not None else 1
    if args.image_size is not None:
        overrides["input_size"] = args.image_size // factor
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    if args.in_channels is not None:
        overrides["in_channels"] = args.in_channels
    elif args.model is not None and not vae_name:
        overrides["in_channels"] = _checkpoint_in_channels(path)
    model = load_model(path, model=args.model, **overrides)
    config = model.config
    if args.model is None and vae_name is None and config.input_size % config.patch_size:
        raise UserError(f"image size {config.input_size} is not divisible by the patch size {config.patch_size}")
    if vae_name is None and config.in_channels not in (1, 3):
        raise UserError(
            f"the model takes {config.in_channels}-channel inputs, which are latents, not pixels; pass --vae PATH"
        )
    if vae is not None and config.input_size % config.patch_size:
        raise UserError(f"latent size {config.input_size} is not divisible by the patch size {config.patch_size}")
    if vae is not None:
        if vae.latent_channels != config.in_channels:
            raise UserError(
                f"the VAE makes {vae.latent_channels}-channel latents but the model takes {config.in_channels}"
            )
    sampler = args.sampler
    num_steps = args.num_steps or DEFAULT_STEPS[sampler]
    samplers.steps_for(sampler, num_steps)  # validates the step count
    cfg = float(args.cfg_scale)
    if cfg != 1.0 and model.y_embedder.embedding_table.num_embeddings <= config.num_classes:
        raise UserError("this model was trained without label dropout, so it has no null label; use --cfg-scale 1")
    if args.precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Sampler(
        model=model.to(device),
        vae=vae,
        sampler=sampler,
        num_steps=num_steps,
        cfg_scale=cfg,
        guide_channels="all" if args.guide_channels == "all" else int(args.guide_channels),
        interval=tuple(args.guidance_interval) if args.guidance_interval else None,
        eta=args.eta,
        device=device,
        progress=not args.no_progress,
        precision=args.precision,
    )


def _checkpoint_in_channels(path: Path) -> int:
    """Input channels stated by a checkpoint's patch embedding (pixel models need not have 4)."""
    from ditkit.checkpoints import load_weights

    state_dict, _, _ = load_weights(path)
    weight = state_dict.get("x_embedder.proj.weight")
    return int(weight.shape[1]) if weight is not None else 4


# ----------------------------------------------------------------------------------------------- grid


def make_grid(images: np.ndarray, labels: list[int], per_label: int) -> Any:
    """A PIL image: one row per label (its samples side by side), the label written left of each row."""
    from PIL import Image, ImageDraw

    n, h, w, c = images.shape
    cell = max(1, math.ceil(64 / max(h, w)))  # tiny (e.g. 8×8 digits) images are enlarged to about 64 px
    ch, cw = h * cell, w * cell
    pad, margin = 2, 72
    grid = Image.new("RGB", (margin + per_label * (cw + pad) + pad, len(labels) * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for row, label in enumerate(labels):
        top = pad + row * (ch + pad)
        draw.text((4, top + ch // 2 - 6), f"class {label}", fill="black")
        for col in range(per_label):
            img = images[row * per_label + col]
            tile = Image.fromarray(img[..., 0] if c == 1 else img, "L" if c == 1 else "RGB").convert("RGB")
            grid.paste(tile.resize((cw, ch), Image.NEAREST), (margin + pad + col * (cw + pad), top))
    return grid


def _save_png(image: Any, path: Path) -> None:
    from ditkit.checkpoints import atomic_write

    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def sample_grid(sampler: Sampler, labels: list[int], per_label: int, seed: int, out: Path, save_images: bool) -> Path:
    """Sample `per_label` images for each label and write OUT/grid.png (and OUT/images/*.png)."""
    from PIL import Image

    num_classes = sampler.model.config.num_classes
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise UserError(f"class label {bad[0]} is out of range: this model has classes 0..{num_classes - 1}")
    ys = torch.tensor([y for y in labels for _ in range(per_label)], dtype=torch.long)
    generator = torch.Generator(device=sampler.device).manual_seed(seed)
    images = sampler.images(ys, generator).numpy()
    grid_path = out / "grid.png"
    _save_png(make_grid(images, labels, per_label), grid_path)
    if save_images:
        for i, (img, y) in enumerate(zip(images, ys.tolist())):
            tile = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
            _save_png(tile, out / "images" / f"{i:04d}_class{y}.png")
    return grid_path


# ----------------------------------------------------------------------------------------------- evaluation


def shard_labels(seed: int, shard: int, size: int, num_classes: int) -> torch.Tensor:
    """A shard's labels, uniform over the classes, fixed by (seed, shard) alone."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + shard)
    return torch.randint(0, num_classes, (size,), generator=g)


def shard_path(out: Path, shard: int) -> Path:
    return out / "shards" / f"shard_{shard:06d}.npz"


def _shard_done(path: Path, size: int) -> bool:
    """A shard file that is complete (atomically written, so a readable one with the right count is done)."""
    try:
        with np.load(path) as f:
            return f["arr_0"].shape[0] == size
    except (OSError, ValueError, KeyError):
        return False


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    from ditkit.checkpoints import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a temp name
            np.savez(f, **arrays)

    atomic_write(path, write)


def sample_npz(
    sampler: Sampler, num_samples: int, batch_size: int, seed: int, out: Path, rank: int = 0, world_size: int = 1
) -> Path | None:
    """Write this rank's missing shards (shard k goes to rank k mod world_size), then, on rank 0 after all
    ranks finish, OUT/samples_{N}x{H}x{W}x3.npz with uint8 `arr_0` (N×H×W×3) and labels `arr_1`."""
    from ditkit import distributed

    num_shards = math.ceil(num_samples / batch_size)
    num_classes = sampler.model.config.num_classes
    _check_settings(out, {**sampler.settings(), "seed": seed, "batch_size": batch_size}, write=rank == 0)
    mine = [k for k in range(num_shards) if k % world_size == rank]
    todo = [k for k in mine if not _shard_done(shard_path(out, k), _shard_size(k, num_samples, batch_size))]
    if rank == 0:
        print(
            f"sampling {num_samples} images in {num_shards} shards of {batch_size} over {world_size} "
            f"process(es); {len(mine) - len(todo)} of this process's {len(mine)} shards already done"
        )
    bar = None
    if sampler.progress and rank == 0 and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="shards", unit="shard")
    for k in todo:
        size = _shard_size(k, num_samples, batch_size)
        labels = shard_labels(seed, k, size, num_classes)
        generator = torch.Generator(device=sampler.device).manual_seed(seed * 1_000_003 + k)
        images = sampler.images(labels, generator).numpy()
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)  # the ADM layout is RGB
        _write_npz(shard_path(out, k), arr_0=images, arr_1=labels.numpy())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    distributed.barrier()
    if rank != 0:
        return None
    for tmp in (out / "shards").glob(".shard_*.tmp"):  # left by killed runs; every rank's writes are over now
        tmp.unlink(missing_ok=True)
    arrays, labels = [], []
    for k in range(num_shards):
        with np.load(shard_path(out, k)) as f:
            arrays.append(f["arr_0"])
            labels.append(f["arr_1"])
    images = np.concatenate(arrays)[:num_samples]
    n, h, w, c = images.shape
    final = out / f"samples_{n}x{h}x{w}x{c}.npz"
    _write_npz(final, arr_0=images, arr_1=np.concatenate(labels)[:num_samples])
    return final


def _check_settings(out: Path, settings: dict[str, Any], write: bool) -> None:
    """Refuse to resume into OUT when its shards were made with other settings; record them on first use."""
    import json

    from ditkit.checkpoints import atomic_write

    path = out / "settings.json"
    settings = json.loads(json.dumps(settings))  # as it reads back (tuples become lists)
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            stored = None
        if stored != settings:
            changed = sorted(k for k in settings if not isinstance(stored, dict) or stored.get(k) != settings[k])
            raise UserError(
                f"{out} holds shards sampled with other settings ({', '.join(changed) or 'unreadable'} differ); "
                "use another --out, or delete it to start over"
            )
    elif write:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=1)))


def _shard_size(k: int, num_samples: int, batch_size: int) -> int:
    return min(batch_size, num_samples - k * batch_size)


# ----------------------------------------------------------------------------------------------- CLI


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
            labels = args.class_labels
            if labels is None:
                n = sampler.model.config.num_classes
                labels = OFFICIAL_LABELS if n == 1000 else list(range(min(n, 8)))
            print(sampler.describe())
            path = sample_grid(sampler, labels, args.per_label, args.seed, out, args.save_images)
        print(f"wrote {path}")
        return 0
    info = distributed.init()
    lock = None
    try:
        if args.device is None:
            device = info.device
        sampler = load_for_sampling(args, device)
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
