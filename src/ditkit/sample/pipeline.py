"""A sampling pipeline: a model, its VAE and the sampler settings that turn (labels, seed) into uint8 images.

Without a VAE the model works in pixel space: its input is C×S×S pixels in [-1, 1] (C = 1 or 3). With one, the
model's input is the VAE's latents (S/8) and the VAE decodes them.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ditkit.diffusion import samplers
from ditkit.diffusion.guidance import guided, guided_captions
from ditkit.errors import UserError

DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpm-solver": 20}
TRAINING_TIMESTEPS = 1000  # T of the schedule that every sampler here respaces (create_diffusion's default)


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
    # Text models: the unconditional half's (features, mask), e.g. a negative prompt; None = the null caption.
    negative: tuple[torch.Tensor, torch.Tensor] | None = None

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
        if self.model.config.is_text:
            return guided_captions(self.model, self.cfg_scale, self.guide_channels, self.interval, self.negative)
        return guided(self.model, self.cfg_scale, self.model.num_classes, self.guide_channels, self.interval)

    @torch.no_grad()
    def images(
        self, labels: torch.Tensor, generator: torch.Generator, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """uint8 images N×H×W×C for `labels`, noise and sampler noise drawn from `generator` (on self.device).

        For a text model `labels` are caption features N×L×C and `mask` their N×L token mask.
        """
        noise = torch.randn(
            (len(labels), *self.latent_shape), generator=generator, device=self.device, dtype=torch.float32
        )
        config = self.model.config
        low = self.precision in ("bf16", "fp8")  # fp8: the FP8 block linears run inside bf16 autocast
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=low)
        with autocast:
            x = samplers.sample(
                self.denoiser(),
                noise,
                sampler=self.sampler,
                num_steps=self.num_steps,
                model_kwargs={"y": labels.to(self.device), **({} if mask is None else {"mask": mask.to(self.device)})},
                eta=self.eta,
                # x̂₀ clipping to [-1, 1] is right for pixels; latents have no such range (DiT does not clip).
                clip_denoised=self.vae is None,
                generator=generator,
                progress=self.progress,
                learn_sigma=config.learn_sigma,
            )
        x = x.float()
        if self.vae is not None:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=low):  # decoder convs in bf16
                x = self.vae.decode(x).float()
        # The official sample_ddp.py's conversion: 127.5·x + 128, clamped, truncated.
        return torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)


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
    if not (math.isfinite(args.eta) and args.eta >= 0):
        raise UserError(f"--eta must be a finite number >= 0 (0 = deterministic DDIM), got {args.eta}")
    if not (math.isfinite(args.cfg_scale) and args.cfg_scale >= 0):
        raise UserError(f"--cfg-scale must be a finite number >= 0 (1 = no guidance), got {args.cfg_scale}")
    if args.num_classes is not None and args.num_classes < 1:
        raise UserError(f"--num-classes must be at least 1, got {args.num_classes}")
    if args.guidance_interval:
        lo, hi = args.guidance_interval
        last = TRAINING_TIMESTEPS - 1
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi <= last):
            raise UserError(f"--guidance-interval takes two timesteps in 0..{last} of the diffusion schedule, "
                            f"T_LO <= T_HI; got {lo:g} {hi:g}")


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
    if cfg != 1.0 and not config.is_text and model.y_embedder.embedding_table.num_embeddings <= config.num_classes:
        raise UserError("this model was trained without label dropout, so it has no null label; use --cfg-scale 1")
    precision = _fast_path(model, args, device)
    return Sampler(
        model=model,
        vae=vae,
        sampler=sampler,
        num_steps=num_steps,
        cfg_scale=cfg,
        guide_channels="all" if args.guide_channels == "all" else int(args.guide_channels),
        interval=tuple(args.guidance_interval) if args.guidance_interval else None,
        eta=args.eta,
        device=device,
        progress=not args.no_progress,
        precision=precision,
    )


def _fast_path(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> str:
    """Move the model to `device` and apply the precision and compile settings (GPU defaults: bf16, compiled
    blocks); returns the precision."""
    precision = getattr(args, "precision", None) or ("bf16" if device.type == "cuda" else "fp32")
    if precision in ("tf32", "bf16", "fp8"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model.to(device)
    if precision == "fp8":
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise UserError("--precision fp8 needs a CUDA GPU with FP8 matrix units (Ada/Hopper or newer); use bf16")
        from ditkit.models.kernels.fp8 import enable_fp8

        enable_fp8(model)
    compile_on = getattr(args, "compile", None)
    if (compile_on if compile_on is not None else device.type == "cuda") and hasattr(model, "blocks"):
        from ditkit.fast import compile_blocks

        compile_blocks(model)
    return precision


def _checkpoint_in_channels(path: Path) -> int:
    """Input channels stated by a checkpoint's patch embedding (pixel models need not have 4)."""
    from ditkit.checkpoints import load_weights

    state_dict, _, _ = load_weights(path)
    weight = state_dict.get("x_embedder.proj.weight")
    return int(weight.shape[1]) if weight is not None else 4


