"""The settings of a training run (`TrainOptions`), their checks, and the `ditkit train` flags that set them."""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from ditkit.models.config import CONDITIONINGS, KNOB_CHOICES, KNOB_DEFAULTS, MODEL_NAMES
from ditkit.models.precision import PRECISIONS
from ditkit.objectives import OBJECTIVES, process_from_flags
from ditkit.recipe import DiffusionProcess, FlowProcess, SamplingDefaults
from ditkit.runtime import counts
from ditkit.runtime import distributed as dist_utils
from ditkit.runtime.errors import UserError
from ditkit.runtime.seeding import MAX_SEED

MAX_CLASSES = 1_000_000  # ImageNet-21k has 21,841; a million label embeddings of XL width is 4.6 GB already


@dataclass
class TrainOptions:
    """Settings of a training run; defaults are the paper's (AdamW 1e-4, no weight decay, batch 256, EMA 0.9999)."""

    data_path: str
    model: str = "DiT-XL/2"
    image_size: int | None = None  # default: 256 for image folders, 16 for digits, the store's for latents
    num_classes: int | None = None  # default: from the data
    vae: str | None = None
    global_batch_size: int = 256
    grad_accum_steps: int = 1  # micro-steps per optimizer step; the global batch stays global_batch_size
    strategy: str = "ddp"  # "ddp" (replicated) or "fsdp" (FSDP2: parameters, gradients, AdamW state sharded)
    epochs: int = 1400
    max_steps: int | None = None
    global_seed: int = 0
    lr: float = 1e-4
    ema_decay: float = 0.9999
    precision: str | None = None  # default: bf16 on GPU, fp32 on CPU
    compile: bool | None = None  # default: on for GPUs (each block compiled, see ditkit.runtime.fast), off on CPU
    grad_checkpointing: bool = False
    grad_clip: float = 0.0
    log_every: int = 100
    ckpt_every: int = 50_000
    keep_last: int = 0
    sample_every: int = 0
    eval_every: int = 0
    eval_samples: int = 500
    results_dir: str | None = None
    resume: str | None = None  # None, "auto" or a checkpoint folder
    num_workers: int = 4
    conditioning: str = "adaln-zero"
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    noise_schedule: str = "linear"
    objective: str = "diffusion"  # "diffusion" (the authors' Gaussian diffusion) or "flow" (SiT's interpolants)
    prediction: str | None = None  # default: the objective's (epsilon | velocity)
    path_type: str | None = None  # flow: Linear (default) | GVP | VP
    loss_weight: str | None = None  # flow, noise/score predictions: velocity | likelihood
    t_sampling: str | None = None  # flow: uniform (default, SiT) | lognormal (SD3, LightningDiT)
    train_eps: float | None = None  # flow: SiT's defaults when unset
    sample_eps: float | None = None
    meanflow: str | None = None  # meanflow: "KEY=VALUE,..." of recipe.MeanFlowProcess (default: the paper's)
    skip_nonfinite: bool = False
    repa_encoder: str | None = None  # REPA (train/methods.py): the frozen encoder; None = off
    repa_depth: int = 8
    repa_coeff: float = 0.5
    repa_projector_dim: int = 2048
    tread_rate: float = 0.0  # TREAD: the fraction of tokens routed (0 = off; the paper's 0.5)
    tread_start: int = 2
    tread_end: int | None = None  # default: depth − 4 (TREAD's guideline)
    exif_transpose: bool = False  # image folders: apply the EXIF orientation tag (the authors' code does not)
    progress: bool = True
    # The modern recipe (LightningDiT; docs/lightningdit.md): model switches, flow training terms, sampling defaults.
    norm: str = "layernorm"
    qk_norm: str = "none"
    rope: bool = False
    mlp: str = "gelu"
    preset_model: str | None = None  # "lightningdit": RMSNorm + RoPE + SwiGLU (its released XL/1's switches)
    t_mean: float | None = None  # flow, lognormal t: sigmoid(N(t_mean, t_std²)); default 0, 1
    t_std: float | None = None
    loss_cosine_weight: float | None = None  # flow, velocity: weight of the velocity-direction term (default 0)
    sample_time_shift: float | None = None  # recorded sampling default (flow): SD3-convention timestep shift
    sample_guidance_interval: tuple[float, float] | None = None  # recorded sampling default: guide only here
    latent_norm: bool = False  # latent stores: normalise each channel by the store's mean/std (recorded)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. depth/hidden_size for small demos


def validate(opts: TrainOptions, world_size: int) -> None:
    """Checks that need no data and no GPU: one clear line each."""
    positive = ("global_batch_size", "epochs", "log_every", "ckpt_every")
    for name in positive:
        if getattr(opts, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(opts, name)}")
    if opts.max_steps is not None and opts.max_steps < 1:
        raise UserError(f"--max-steps must be at least 1, got {opts.max_steps}")
    if opts.global_batch_size % world_size:
        raise UserError(
            f"--global-batch-size {opts.global_batch_size} is not divisible by the world size {world_size}; "
            f"use a multiple of {world_size}"
        )
    if opts.grad_accum_steps < 1:
        raise UserError(f"--grad-accum-steps must be at least 1, got {opts.grad_accum_steps}")
    if opts.global_batch_size % (world_size * opts.grad_accum_steps):
        per_rank = opts.global_batch_size // world_size
        raise UserError(
            f"the per-process batch {per_rank} (--global-batch-size {opts.global_batch_size} / world size "
            f"{world_size}) is not divisible by --grad-accum-steps {opts.grad_accum_steps}; choose values that divide"
        )
    if opts.strategy not in dist_utils.STRATEGIES:
        raise UserError(f"--strategy must be one of {', '.join(dist_utils.STRATEGIES)}, got {opts.strategy!r}")
    if not opts.lr > 0 or not math.isfinite(opts.lr):
        raise UserError(f"--lr must be a positive number, got {opts.lr}")
    if not 0.0 <= opts.ema_decay < 1.0:
        raise UserError(f"--ema-decay must be in [0, 1), got {opts.ema_decay}")
    if not (math.isfinite(opts.grad_clip) and opts.grad_clip >= 0):
        raise UserError(f"--grad-clip must be a finite number >= 0 (0 = off), got {opts.grad_clip}")
    if opts.num_classes is not None and opts.num_classes < 1:  # 0 would fall back to the data's count unseen
        raise UserError(f"--num-classes must be at least 1, got {opts.num_classes}")
    if opts.precision is not None and opts.precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {opts.precision!r}")
    if opts.model not in MODEL_NAMES:
        raise UserError(f"unknown model {opts.model!r}; choose one of {', '.join(MODEL_NAMES)}")
    if opts.image_size is not None and opts.image_size < 1:
        raise UserError(f"--image-size must be positive, got {opts.image_size}")
    for name in ("num_workers", "keep_last", "sample_every", "eval_every"):  # 0 means off / none
        if getattr(opts, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(opts, name)}")
    if opts.eval_every and opts.eval_samples < 2:
        raise UserError(f"--eval-samples must be at least 2, got {opts.eval_samples}")
    if opts.eval_every and opts.data_path != "digits":
        raise UserError("--eval-every scores digits samples; for image data sample an .npz and run ditkit evaluate")
    if opts.latent_norm and opts.data_path == "digits":
        raise UserError("--latent-norm needs a latent store (its manifest holds the channel statistics); digits "
                        "are pixels: drop --latent-norm")
    if opts.vae and opts.data_path == "digits":
        raise UserError("--vae does not apply to --data-path digits (a pixel-space data set); drop --vae")
    process_of(opts)  # the objective's flags: one line for a bad value or combination
    counts.train_options(opts)  # steps, batch and sizes bounded before any work
    model_knobs(opts), sampling_of(opts)  # the modern recipe's flags, checked here too
    if not 0 <= opts.global_seed <= MAX_SEED:
        raise UserError(f"--global-seed must be in 0..{MAX_SEED}, got {opts.global_seed}")
    if opts.num_classes is not None and opts.num_classes > MAX_CLASSES:
        raise UserError(
            f"--num-classes {opts.num_classes} is more than {MAX_CLASSES:,} (the label table alone would not fit in "
            "memory); give the number of classes in the data"
        )


# --preset-model NAME: model switches; a switch given on the command line (away from its default) wins.
MODEL_PRESETS: dict[str, dict[str, Any]] = {"lightningdit": {"norm": "rmsnorm", "rope": True, "mlp": "swiglu"}}


def model_knobs(opts: TrainOptions) -> dict[str, Any]:
    """The model config's modern-recipe switches from the flags and the preset (checked by DiTConfig)."""
    if opts.preset_model is not None and opts.preset_model not in MODEL_PRESETS:
        raise UserError(f"unknown --preset-model {opts.preset_model!r}; choose one of {', '.join(MODEL_PRESETS)}")
    knobs = dict(MODEL_PRESETS.get(opts.preset_model or "", {}))
    knobs.update({k: getattr(opts, k) for k, default in KNOB_DEFAULTS.items() if getattr(opts, k) != default})
    return knobs


def sampling_of(opts: TrainOptions) -> SamplingDefaults:
    """The recipe's sampling defaults from --sample-time-shift / --sample-guidance-interval."""
    interval = opts.sample_guidance_interval
    sampling = SamplingDefaults(time_shift=1.0 if opts.sample_time_shift is None else float(opts.sample_time_shift),
                                guidance_interval=tuple(float(v) for v in interval) if interval else None)
    sampling.validate()
    return sampling


def process_of(opts: TrainOptions) -> Any:
    """The recipe's process from the objective flags (checked by the objective's own module: one line for a flag
    of another objective, a prediction it has not, or a combination it cannot train)."""
    return process_from_flags(opts)


# Every flag's default is the TrainOptions field's: written once, there.
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(TrainOptions) if f.default is not MISSING}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", default=DEFAULTS["model"], choices=MODEL_NAMES)
    a("--data-path", required=True, help="'digits' (built in), an image folder, or a latent store from ditkit extract")
    a("--image-size", type=int, default=DEFAULTS["image_size"], help="image side (default 256; 16 for digits)")
    a("--num-classes", type=int, default=DEFAULTS["num_classes"], help="default: number of classes in the data")
    a("--vae", default=DEFAULTS["vae"],
      help="SD-VAE folder or Hugging Face id, to train on an image folder in latent space")
    a("--global-batch-size", type=int, default=DEFAULTS["global_batch_size"])
    a("--grad-accum-steps", type=int, default=DEFAULTS["grad_accum_steps"],
      help="split each process's share of the global batch into N micro-batches (same result, less memory)")
    a("--strategy", choices=dist_utils.STRATEGIES, default=DEFAULTS["strategy"],
      help="ddp: replicate the model on every GPU; fsdp: shard parameters, gradients and AdamW state (FSDP2)")
    a("--epochs", type=int, default=DEFAULTS["epochs"])
    a("--max-steps", type=int, default=DEFAULTS["max_steps"],
      help="stop after this many optimizer steps (overrides --epochs)")
    a("--global-seed", type=int, default=DEFAULTS["global_seed"])
    a("--lr", type=float, default=DEFAULTS["lr"],
      help=f"AdamW learning rate (default {DEFAULTS['lr']:g}); with --resume a different value is applied from "
      "the resumed step on and logged (the same value resumes bit-exactly)")
    a("--ema-decay", type=float, default=DEFAULTS["ema_decay"])
    a("--precision", choices=PRECISIONS, default=DEFAULTS["precision"],
      help="default: bf16 on GPU, fp32 on CPU; fp8 (opt-in, GPU): bf16 autocast with FP8 block matmuls")
    a("--compile", action=argparse.BooleanOptionalAction, default=DEFAULTS["compile"],
      help="torch.compile each DiT block (default: on for GPUs, off on CPU)")
    a("--grad-checkpointing", action="store_true", help="recompute block activations (less memory)")
    a("--grad-clip", type=float, default=DEFAULTS["grad_clip"],
      help="clip the gradient norm (0 = off, the paper's setting)")
    a("--log-every", type=int, default=DEFAULTS["log_every"])
    a("--ckpt-every", type=int, default=DEFAULTS["ckpt_every"])
    a("--keep-last", type=int, default=DEFAULTS["keep_last"],
      help="keep only the newest N checkpoints (0 = all), and the last good one a NaN would name")
    a("--sample-every", type=int, default=DEFAULTS["sample_every"],
      help="write an EMA sample grid every N steps (0 = off)")
    a("--eval-every", type=int, default=DEFAULTS["eval_every"], help="score EMA samples every N steps (digits data)")
    a("--results-dir", default=DEFAULTS["results_dir"], help="run folder (default results/<model>-<data>)")
    a("--resume", default=DEFAULTS["resume"],
      help="'auto' (newest checkpoint in the results folder) or a checkpoint folder")
    a("--num-workers", type=int, default=DEFAULTS["num_workers"])
    a("--conditioning", choices=CONDITIONINGS, default=DEFAULTS["conditioning"])
    a("--noise-schedule", choices=DiffusionProcess.SCHEDULES, default=DEFAULTS["noise_schedule"],
      help="beta schedule of the diffusion (stored in the checkpoint's recipe; sampling reads it from there)")
    a("--objective", choices=tuple(OBJECTIVES), default=DEFAULTS["objective"],
      help="; ".join(f"{e.name}: {e.help}" for e in OBJECTIVES.values()) + " (stored in the recipe)")
    a("--prediction", default=None,
      help="what the model predicts: diffusion epsilon (default) | x0 | v; flow velocity (default) | noise | score")
    a("--path-type", choices=FlowProcess.PATHS, default=None, help="flow: the interpolant (default Linear)")
    a("--loss-weight", choices=("velocity", "likelihood"), default=None,
      help="flow, noise/score predictions: SiT's loss weighting (default none)")
    a("--t-sampling", choices=FlowProcess.T_SAMPLINGS, default=None,
      help="flow: training times uniform (SiT, default) or logit-normal (SD3, LightningDiT)")
    a("--train-eps", type=float, default=None, help="flow: SiT's train_eps (default: SiT's rule)")
    a("--sample-eps", type=float, default=None, help="flow: SiT's sample_eps (default: SiT's rule)")
    a("--meanflow", default=None, help="meanflow: KEY=VALUE,... of its recipe (time_mu, time_sigma, ratio_r_neq_t, "
      "adaptive_p, adaptive_eps, omega, kappa, guidance_low, guidance_high; default the paper's, docs/meanflow.md)")
    a("--repa-encoder", default=None, help="REPA: frozen encoder, 'digits-mae' or a transformers folder / HF id "
      "(offline), e.g. facebook/dinov2-base")
    a("--repa-depth", type=int, default=DEFAULTS["repa_depth"], help="REPA: align the output of this block (1-based)")
    a("--repa-coeff", type=float, default=DEFAULTS["repa_coeff"], help="REPA: the alignment loss weight")
    a("--repa-projector-dim", type=int, default=DEFAULTS["repa_projector_dim"], help="REPA: the projector width")
    a("--tread-rate", type=float, default=DEFAULTS["tread_rate"],
      help="TREAD: fraction of tokens that skip blocks --tread-start..--tread-end in training (0 = off; paper 0.5)")
    a("--tread-start", type=int, default=DEFAULTS["tread_start"], help="TREAD: first routed block (0-based)")
    a("--tread-end", type=int, default=None, help="TREAD: last routed block (0-based; default depth − 4)")
    a("--skip-nonfinite", action="store_true", help="skip steps with a NaN/Inf loss instead of stopping")
    a("--exif-transpose", action="store_true",
      help="image folders: turn each image by its EXIF orientation tag first (default: as stored, as the authors)")
    a("--no-progress", action="store_true")
    a("--norm", choices=KNOB_CHOICES["norm"], default=DEFAULTS["norm"], help="block norm (LightningDiT: rmsnorm)")
    a("--qk-norm", nargs="?", const="rmsnorm", choices=KNOB_CHOICES["qk_norm"], default=DEFAULTS["qk_norm"],
      help="normalise q and k per head (bare flag: rmsnorm)")
    a("--rope", action="store_true", help="2D rotary position embedding on q and k (LightningDiT's axial RoPE)")
    a("--mlp", choices=KNOB_CHOICES["mlp"], default=DEFAULTS["mlp"], help="MLP (swiglu: LightningDiT's width rule)")
    a("--preset-model", choices=tuple(MODEL_PRESETS), default=None,
      help="lightningdit: --norm rmsnorm --rope --mlp swiglu (its released model's switches)")
    a("--t-mean", type=float, default=None, help="flow, --t-sampling lognormal: mean of the normal (default 0)")
    a("--t-std", type=float, default=None, help="flow, --t-sampling lognormal: std of the normal (default 1)")
    a("--loss-cosine-weight", type=float, default=None,
      help="flow, velocity: weight of the velocity-direction (1 − cos) loss term (LightningDiT: 1; default 0)")
    a("--sample-time-shift", type=float, default=None,
      help="flow: the timestep shift `ditkit sample` uses by default, recorded (SD3's; LightningDiT 0.3 = 3.333)")
    a("--latent-norm", action="store_true",
      help="latent stores: normalise each latent channel by the store's mean and std (LightningDiT's latent_norm)")
    a("--sample-guidance-interval", type=float, nargs=2, metavar=("T_LO", "T_HI"), default=None,
      help="the guidance interval `ditkit sample` uses by default, recorded in the recipe")


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """TrainOptions keyword arguments from parsed flags: every flag named like a field (no copy by hand)."""
    names = {f.name for f in fields(TrainOptions)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["progress"] = not args.no_progress
    return values
