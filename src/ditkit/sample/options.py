"""The settings of `ditkit sample` (`SampleOptions`), their checks, and the flags that set them: the twin of
`ditkit.train.options`. Every default is written once, on the field; `add_arguments` reads it from there, and the
library entry (`ditkit.sample.load_for_sampling`) takes the options (an argparse Namespace still works)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from ditkit.models.config import MODEL_NAMES
from ditkit.models.precision import PRECISIONS
from ditkit.objectives import OBJECTIVES, sampler_help, sampler_names
from ditkit.runtime.errors import UserError
from ditkit.runtime.seeding import MAX_SEED
from ditkit.runtime.validate import MAX_CLASSES
from ditkit.sample.cache import NAMED as CACHE_NAMES
from ditkit.sample.cache import RECOMMENDED as CACHE_FAST
from ditkit.sample.cache import parse as parse_cache
from ditkit.sample.presets import add_preset_arguments

TRAINING_TIMESTEPS = 1000  # T of the schedule that every diffusion sampler respaces (create_diffusion's default)
DEFAULT_CFG = 4.0  # the authors' sample.py default
MAX_IMAGE_SIZE = 65536  # pixels, as `ditkit flops`; the model config bounds the latent side further


@dataclass
class SampleOptions:
    """What `ditkit sample` does: the checkpoint and what is expected of it, the sampler, guidance, output."""

    ckpt: str
    model: str | None = None  # expected model; default: from the checkpoint
    image_size: int | None = None
    num_classes: int | None = None
    in_channels: int | None = None
    vae: str | None = None
    class_labels: list[int] | None = None  # grid rows; default: the official demo classes, or 0..7
    per_label: int = 4
    cfg_scale: float | None = None  # default: DEFAULT_CFG, or 1 where the objective trains its guidance in
    guide_channels: str = "3"  # "3" (the authors') or "all"
    guidance_interval: tuple[float, float] | None = None
    sampler: str | None = None  # default: the objective's first
    num_steps: int | None = None  # default: the sampler's
    time_shift: float | None = None  # default: the checkpoint recipe's (`Recipe.sampling`), else 1
    objective: str | None = None  # for checkpoints that record no recipe
    eta: float = 0.0
    seed: int = 0
    out: str = "samples"
    save_images: bool = False
    num_samples: int | None = None  # evaluation mode: an ADM .npz of N samples
    batch_size: int = 32
    precision: str | None = None  # default: bf16 on a GPU, fp32 on a CPU
    compile: bool | None = None
    device: str | None = None
    cache_dir: str | None = None
    no_progress: bool = False
    prompt: list[str] | None = None  # text models
    prompt_file: str | None = None
    negative_prompt: str | None = None
    text_encoder: str | None = None
    max_tokens: int | None = None
    cache: str | None = "off"  # feature caching (sample/cache.py): off | fast | fora-N | taylorK-N
    preset: str | None = None  # a paper's evaluation protocol (sample/presets.py)
    preset_overrides: list[str] = field(default_factory=list)  # filled by `presets.apply_preset`

    @classmethod
    def of(cls, args: SampleOptions | argparse.Namespace | dict[str, Any]) -> SampleOptions:
        """Options from options, a parsed Namespace (other verbs' keys are left out) or a mapping."""
        if isinstance(args, SampleOptions):
            return args
        given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in given.items() if k in names})

    def replace(self, **changes: Any) -> SampleOptions:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Checks of the flags alone, before any file is read (the step count is checked with the sampler)."""
        if self.image_size is not None and not 1 <= self.image_size <= MAX_IMAGE_SIZE:
            raise UserError(f"--image-size must be at least 1 and at most {MAX_IMAGE_SIZE}, got {self.image_size}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"--seed must be in 0..{MAX_SEED}, got {self.seed}")
        if self.per_label < 1 or self.batch_size < 1:
            raise UserError("--per-label and --batch-size must be at least 1")
        if self.num_samples is not None and self.num_samples < 1:
            raise UserError(f"--num-samples must be at least 1, got {self.num_samples}")
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise UserError(f"--eta must be a finite number >= 0 (0 = deterministic DDIM), got {self.eta}")
        if self.cfg_scale is not None and not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 0):
            raise UserError(f"--cfg-scale must be a finite number >= 0 (1 = no guidance), got {self.cfg_scale}")
        if self.num_classes is not None and not 1 <= self.num_classes <= MAX_CLASSES:
            raise UserError(f"--num-classes must be at least 1 and at most {MAX_CLASSES:,}, got {self.num_classes}")
        parse_cache(self.cache)  # a bad --cache name before anything is read
        # --guidance-interval is checked on the model's own time axis once it is read (flag_checks)


DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(SampleOptions) if f.default is not MISSING}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `ditkit sample` flags; each default is the `SampleOptions` field's."""
    a, d = parser.add_argument, DEFAULTS
    a("--ckpt", required=True, help="checkpoint file (official .pt, train.py dict, ditkit safetensors) or a released "
      "name: DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt (downloaded)")
    a("--model", choices=MODEL_NAMES, default=d["model"], help="expected model (default: from the checkpoint)")
    a("--image-size", type=int, default=d["image_size"], help="image side in pixels (default: from the checkpoint)")
    a("--num-classes", type=int, default=d["num_classes"], help="number of classes (default: from the checkpoint)")
    a("--in-channels", type=int, default=d["in_channels"],
      help="model input channels when --model is given (default 4 with --vae; else from the checkpoint)")
    a("--vae", default=d["vae"], help="VAE folder or Hugging Face id (offline cache) for latent models")
    a("--class-labels", type=int, nargs="+", default=d["class_labels"], help="one grid row per label (default: 0..7)")
    a("--per-label", type=int, default=d["per_label"], help=f"samples per label in the grid (default {d['per_label']})")
    a("--cfg-scale", type=float, default=d["cfg_scale"], help=f"guidance scale; 1 = none (default {DEFAULT_CFG}; 1 "
      "for objectives that train their guidance in, e.g. meanflow)")
    a("--guide-channels", default=d["guide_channels"], choices=["3", "all"],
      help="ε channels guided: 3 as the official code (default) or all")
    a("--guidance-interval", type=float, nargs=2, metavar=("T_LO", "T_HI"), default=d["guidance_interval"],
      help="guide only for timesteps in [T_LO, T_HI] (diffusion: 0..999; flow: t in 0..1, 1 = data; default: the "
      "checkpoint recipe's, else everywhere)")
    a("--sampler", choices=list(sampler_names()), default=d["sampler"],
      help="default: the first of the checkpoint's objective: " + ", ".join(
          f"{next(iter(e.samplers()))} ({e.name})" for e in OBJECTIVES.values()))
    a("--num-steps", type=int, default=d["num_steps"],
      help=f"sampling steps (default: {sampler_help()}; dopri5 is adaptive)")
    a("--time-shift", type=float, default=d["time_shift"],
      help="flow: SD3's timestep shift of the step grid (>1: more steps at high noise; default: the checkpoint "
      "recipe's, else 1)")
    a("--objective", choices=list(OBJECTIVES), default=d["objective"],
      help="the process of a checkpoint that records none (default: flow/velocity for files named SiT-*, else "
      "diffusion); a checkpoint's own recipe cannot be overridden")
    a("--eta", type=float, default=d["eta"], help="DDIM noise (0 = deterministic)")
    a("--seed", type=int, default=d["seed"])
    a("--out", default=d["out"], help=f"output folder (default ./{d['out']})")
    a("--save-images", action="store_true", help="also write each grid image as a PNG")
    a("--num-samples", type=int, default=d["num_samples"], help="evaluation mode: N samples, labels uniform over "
      "the classes, sharded over torchrun processes, into OUT/samples_N.npz (ADM layout)")
    a("--batch-size", type=int, default=d["batch_size"],
      help=f"samples per shard and process (default {d['batch_size']})")
    a("--precision", choices=PRECISIONS, default=d["precision"], help="default: bf16 on a GPU, fp32 on a CPU "
      "(fp32/tf32 for bit-level comparisons; fp8: FP8 block matmuls)")
    a("--compile", action=argparse.BooleanOptionalAction, default=d["compile"], help="torch.compile each DiT block "
      "(default: off; on a GPU the eager fused kernels sample faster, without the compile's start-up)")
    a("--device", default=d["device"], help="cpu, cuda, cuda:1 (default: this process's GPU if any, else cpu)")
    a("--cache-dir", default=d["cache_dir"],
      help="where released checkpoints are kept (default $DITKIT_CACHE or ~/.cache/ditkit)")
    a("--no-progress", action="store_true", help="no progress bars")
    a("--prompt", action="append", default=d["prompt"], help="text models: a prompt, one grid row (repeatable)")
    a("--prompt-file", default=d["prompt_file"], help="text models: prompts one a line (cycled with --num-samples)")
    a("--negative-prompt", default=d["negative_prompt"],
      help="text models: guide away from this prompt, not the null caption")
    a("--text-encoder", default=d["text_encoder"], help="text models: T5/CLIP folder or Hugging Face id in the "
      "local cache (default for 4096-feature models: DeepFloyd/t5-v1_1-xxl)")
    a("--max-tokens", type=int, default=d["max_tokens"], help="text models: tokens per prompt (default: the model's)")
    a("--cache", default=d["cache"], metavar="NAME", help=f"feature caching: {', '.join(CACHE_NAMES)} (fast = "
      f"{CACHE_FAST}; fora-N reuses the block stack's residual N-1 of N steps, taylorK-N forecasts it; default off)")
    add_preset_arguments(parser)  # last: it marks the defaults of the flags a preset sets
