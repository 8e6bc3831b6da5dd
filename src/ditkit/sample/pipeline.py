"""A sampling pipeline: a model, its VAE and the sampler settings that turn (labels, seed) into uint8 images.

Without a VAE the model works in pixel space: its input is C×S×S pixels in [-1, 1] (C = 1 or 3). With one, the
model's input is the VAE's latents (S/8) and the VAE decodes them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ditkit.diffusion.objective import default_steps
from ditkit.models.guidance import guided, guided_captions
from ditkit.models.precision import Precision, prepare
from ditkit.objectives import Objective, entry_for, objective_for
from ditkit.recipe import PROCESSES, SD_VAE, LatentSpace, Recipe, infer_recipe
from ditkit.runtime import flag_checks
from ditkit.runtime.errors import UserError
from ditkit.sample import presets
from ditkit.sample.cache import caching
from ditkit.sample.cache import parse as parse_cache
from ditkit.sample.options import DEFAULT_CFG, TRAINING_TIMESTEPS, SampleOptions

DEFAULT_STEPS = default_steps()  # the diffusion samplers' (kept for callers of ditkit.sample.DEFAULT_STEPS)
VAE_DOWNSAMPLE = 8  # SD-VAE: 256×256 pixels ↔ 32×32 latents


# ----------------------------------------------------------------------------------------------- set-up


@dataclass
class SamplingPipeline:
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
    recipe: Recipe | None = None  # None: the authors' process for `model`, latents as `vae` says
    time_shift: float = 1.0  # flow: SD3's timestep shift of the grid

    def __post_init__(self) -> None:
        if self.recipe is None:
            latents = LatentSpace() if self.vae is None else LatentSpace(
                vae=str(getattr(self.vae, "name", "vae")), scale=float(getattr(self.vae, "scale", 1.0)),
                shift=float(getattr(self.vae, "shift", 0.0)), downsample=int(getattr(self.vae, "downsample", 8)))
            self.recipe = infer_recipe(self.model.config, latents)
        if self.objective is None:
            self.objective = objective_for(self.recipe)

    # Text models: the unconditional half's (features, mask), e.g. a negative prompt; None = the null caption.
    negative: tuple[torch.Tensor, torch.Tensor] | None = None
    cache: str | None = None  # --cache: feature caching (ditkit.sample.cache); None = every block every step
    preset: str | None = None  # --preset: the paper protocol these settings came from (ditkit.sample.presets)
    preset_overrides: tuple[str, ...] = ()  # the preset's flags given other values
    # The recipe's objective, built once per run: `load_for_sampling` passes the one it checked the flags with.
    objective: Objective | None = None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.model.config
        return (c.in_channels, c.input_size, c.input_size)

    def evaluations_per_image(self) -> int:
        """Network evaluations each image costs with these settings (2 per guided step)."""
        return self.objective.evaluations(self.sampler, self.num_steps, self.cfg_scale, self.interval)

    def describe(self) -> str:
        guidance = f"cfg {self.cfg_scale:g} on {self.guide_channels} channels" if self.cfg_scale != 1 else "no cfg"
        nfe = self.evaluations_per_image()
        cost = f"{nfe} model evaluations per image" if nfe else "adaptive steps (atol 1e-6, rtol 1e-3)"
        steps = "" if self.sampler == "dopri5" else f" {self.num_steps} steps"
        shift = f", time shift {self.time_shift:g}" if self.time_shift != 1.0 else ""
        if self.cache:
            cost += f", cache {self.cache}"
        return f"{self.model.config.name}, {self.recipe.process.kind} {self.sampler}{steps}{shift}, {guidance}: {cost}"

    def settings(self) -> dict[str, Any]:
        """What determines the samples besides (seed, labels): recorded with evaluation shards, so that a
        resumed run never mixes shards made with other settings. The weights enter as a fingerprint."""
        with torch.no_grad():  # per-tensor float64 sums, one copy to the host, added in order (as ever)
            sums = [p.detach().double().sum() for p in self.model.parameters()]
            fingerprint = sum(float(v) for v in torch.stack(sums).cpu()) if sums else 0.0
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
            "time_shift": self.time_shift,
            "recipe": self.recipe.to_dict(),
            **({"cache": self.cache} if self.cache else {}),  # only when on: older folders keep resuming
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
        precision = Precision(self.precision, self.device.type)
        choose = getattr(self.model, "choose_attention", None)
        if choose is not None:  # measured once per shape (then cached), outside the model's forward
            rows = len(labels) * (2 if self.cfg_scale != 1.0 else 1)
            choose(rows, precision.compute_dtype, self.device, training=False)
        # fp8: the FP8 block linears inside bf16 autocast; a fresh cache state for each batch
        with precision.autocast(), caching(self.model, parse_cache(self.cache)):
            x = self.objective.sample(
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
                **({"shift": self.time_shift} if self.time_shift != 1.0 else {}),
            )
        x = x.float()
        if self.vae is not None:
            # On a GPU the VAE's weights are bf16 already (load_for_sampling): no autocast, whose fp32
            # GroupNorms cost a fifth more; a CPU run in bf16 keeps fp32 weights under autocast.
            bf16_weights = getattr(self.vae, "dtype", None) == torch.bfloat16
            x = self.recipe.latents.denormalize(x) if self.recipe is not None else x  # channel statistics
            with precision.autocast() if not bf16_weights else contextlib.nullcontext():
                x = self.vae.decode(x).float()
        # The official sample_ddp.py's conversion: 127.5·x + 128, clamped, truncated. To uint8 and NHWC on the
        # device, then one copy of the bytes: `.to("cpu", dtype=uint8)` of the float tensor copied 4× the bytes
        # and converted on the host, 0.19 s a shard of 256 at 256 px while the GPU waited (H200, RESULTS.md).
        pixels = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).contiguous().cpu()




def _check_image_size(image_size: int | None, model: str | None, factor: int) -> None:
    """A latent model's image side must be a multiple of the VAE factor (× the patch, when the model is named)."""
    if image_size is None or factor == 1:
        return
    if model is not None:
        patch = int(model.split("/")[1])
        if image_size % (factor * patch):
            raise UserError(
                f"--image-size {image_size} is not divisible by {factor * patch} (VAE factor {factor} × patch "
                f"{patch}); use e.g. {256 if patch <= 4 else 512}"
            )
    elif image_size % factor:
        raise UserError(f"--image-size {image_size} is not divisible by the VAE factor {factor}")


def load_for_sampling(args: SampleOptions | argparse.Namespace, device: torch.device) -> SamplingPipeline:
    """Model, recipe, VAE and settings from the arguments, reading the checkpoint once; `args` is not changed.

    The recipe stored in the checkpoint (or inferred for older files) gives the process (schedule, steps,
    prediction) and the VAE; --model/--image-size/--num-classes/--vae state what is expected and override it.
    """
    from ditkit.weights import pretrained
    from ditkit.weights.checkpoints import build_checked, checkpoint_recipe, read_checkpoint

    args = SampleOptions.of(args)
    args.validate()
    released = pretrained.PRETRAINED.get(Path(args.ckpt).name) if not Path(args.ckpt).exists() else None
    expected = {
        "model": args.model or (released.model if released else None),
        "image_size": args.image_size or (released.image_size if released else None),
        "num_classes": args.num_classes or (released.num_classes if released else None),
    }
    # The VAE: the flag, else the one the authors sample their release through, else the checkpoint's own.
    vae_name = args.vae or (SD_VAE if released else None)
    vae_dtype = Precision.resolve(args.precision, device).inference_dtype
    found = read_checkpoint(pretrained.resolve_checkpoint(args.ckpt, args.cache_dir, progress=not args.no_progress))
    stored = Recipe.from_json(found.recipe_json, where=str(found.path)) if found.recipe_json else None
    presets.check_checkpoint(args.preset, found, args.objective)
    if vae_name is None and stored is not None and not stored.latents.is_pixels:
        vae_name = stored.latents.vae
    # Only the decoder, through ditkit.encoders.vae_decoder where it can (no diffusers import), in this thread:
    # loading the VAE through diffusers in a thread gained nothing, its imports hold the GIL (benchmarks/RESULTS.md,
    # issue 13).
    vae = _load_vae(vae_name, device, vae_dtype)
    factor = vae.downsample if vae is not None else 1  # the latent side is the image side over its own factor
    _check_image_size(expected["image_size"], expected["model"], factor)
    overrides: dict[str, Any] = {}
    if expected["image_size"] is not None:
        overrides["input_size"] = expected["image_size"] // factor
    if expected["num_classes"] is not None:
        overrides["num_classes"] = expected["num_classes"]
    if args.in_channels is not None:
        overrides["in_channels"] = args.in_channels
    elif expected["model"] is not None and not vae_name:
        weight = found.state_dict.get("x_embedder.proj.weight")  # pixel models need not have 4 channels
        overrides["in_channels"] = int(weight.shape[1]) if weight is not None else 4
    model = build_checked(found, expected["model"], device=device, **overrides)
    flag_checks.conditioning_flags(args, model.config.is_text)  # a flag the model cannot use is refused
    presets.check_image_size(args.preset, model.config.input_size * factor)
    _check_model_and_vae(model, vae, expected["model"] is None)
    recipe = _with_objective(checkpoint_recipe(found, model.config), args.objective,
                             found.recipe_json is not None)
    stats = {"mean": recipe.latents.mean, "std": recipe.latents.std}  # of the model's training latents: kept
    recipe = recipe.replace(latents=dataclasses.replace(_latent_space(vae), **stats) if vae is not None else
                            _latent_space(vae))
    objective = objective_for(recipe)
    flag_checks.guidance_interval(args.guidance_interval, objective.kind,
                                  getattr(recipe.process, "diffusion_steps", TRAINING_TIMESTEPS))
    # The recipe's sampling defaults (`Recipe.sampling`) where the flag is not given; a flag wins.
    time_shift = recipe.sampling.time_shift if args.time_shift is None else float(args.time_shift)
    if time_shift != 1.0 and (objective.kind != "flow" or not time_shift > 0):
        raise UserError(f"--time-shift {time_shift:g} applies to flow models only and must be > 0; drop it")
    sampler = args.sampler or objective.default_sampler
    num_steps = args.num_steps or objective.default_steps.get(sampler, 0)
    flag_checks.sampler_flags(args, sampler)
    objective.check_sampler(sampler, num_steps)  # the one check of the sampler and its step count
    folds = entry_for(objective.kind).folds_guidance  # MeanFlow trains its guidance in: unguided unless asked
    cfg = float(args.cfg_scale) if args.cfg_scale is not None else (1.0 if folds else DEFAULT_CFG)
    if cfg != 1.0 and not model.config.is_text and \
            model.y_embedder.embedding_table.num_embeddings <= model.config.num_classes:
        raise UserError("this model was trained without label dropout, so it has no null label; use --cfg-scale 1")
    precision = _fast_path(model, args, device)
    return SamplingPipeline(
        model=model, vae=vae, sampler=sampler, num_steps=num_steps, cfg_scale=cfg,
        guide_channels="all" if args.guide_channels == "all" else int(args.guide_channels),
        interval=tuple(args.guidance_interval) if args.guidance_interval else recipe.sampling.guidance_interval,
        eta=args.eta, device=device, progress=not args.no_progress, precision=precision, recipe=recipe,
        time_shift=time_shift, cache=_cache_name(args.cache), preset=args.preset,
        preset_overrides=tuple(args.preset_overrides), objective=objective,
    )


def _cache_name(cache: str | None) -> str | None:
    """--cache as the setting it stands for ("fast" → its measured choice); None for off."""
    setting = parse_cache(cache)
    return None if setting is None else setting.name


def _with_objective(recipe: Recipe, objective: str | None, stored: bool) -> Recipe:
    """--objective for a checkpoint that records no recipe (SiT's released files are DiT-shaped: the file name
    decides by default, see `checkpoints.checkpoint_recipe`); a recorded recipe is never overridden."""
    if objective is None or objective == recipe.process.kind:
        return recipe
    if stored:
        raise UserError(f"--objective {objective} conflicts with the checkpoint's recipe (a {recipe.process.kind} "
                        "model); drop the flag")
    return recipe.replace(process=PROCESSES[objective]())


def _fast_path(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> str:
    """Move the model to `device` and apply the precision and compile settings (GPU default: bf16, eager fused
    kernels); returns the precision."""
    precision = Precision.resolve(getattr(args, "precision", None), device)
    precision.set_tf32()
    model.to(device)
    # Not compiled unless asked: on an H200 the eager fused path (Triton LayerNorm/modulate/residual kernels,
    # fc1's GELU in the GEMM epilogue, the measured attention) took 241 ms per guided DiT-XL/2 step of 256
    # against 254 ms compiled, and a cold compile costs tens of seconds (benchmarks/RESULTS.md, issue 13).
    compile_on = bool(getattr(args, "compile", None)) and hasattr(model, "blocks")
    prepare(model, precision, training=False, compile=compile_on)
    return precision.name


def _latent_space(vae: Any | None) -> LatentSpace:
    """What was used to decode: pixels, or the VAE as loaded (its own scale and shift)."""
    if vae is None:
        return LatentSpace()
    return LatentSpace(vae=vae.name, scale=vae.scale, shift=vae.shift, downsample=vae.downsample)


def _load_vae(name: str | None, device: torch.device, dtype: torch.dtype = torch.float32) -> Any:
    """The VAE named by the flag or the recipe, loaded on `device`; None for a pixel-space model."""
    if name is None:
        return None
    from ditkit.encoders.autoencoder import load_vae  # diffusers is imported only when a VAE is used

    return load_vae(name, device=device, dtype=dtype, decode_only=True)


def _check_model_and_vae(model: Any, vae: Any | None, config_from_file: bool) -> None:
    """The model's input fits pixels or the VAE's latents (one line each)."""
    config = model.config
    if config_from_file and vae is None and config.input_size % config.patch_size:
        raise UserError(f"image size {config.input_size} is not divisible by the patch size {config.patch_size}")
    if vae is None and config.in_channels not in (1, 3):
        raise UserError(
            f"the model takes {config.in_channels}-channel inputs, which are latents, not pixels; pass --vae PATH"
        )
    if vae is None:
        return
    if config.input_size % config.patch_size:
        raise UserError(f"latent size {config.input_size} is not divisible by the patch size {config.patch_size}")
    if vae.latent_channels != config.in_channels:
        raise UserError(f"the VAE makes {vae.latent_channels}-channel latents but the model takes {config.in_channels}")


Sampler = SamplingPipeline  # the old name (until 0.2): "sampler" also names a sampling method and SiT's class
