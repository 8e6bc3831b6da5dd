"""`ditkit train`: train a DiT on one CPU, one GPU, or many GPUs and nodes under torchrun (DDP or FSDP2).

The loop in one breath: each step takes the next global batch of a seeded per-epoch permutation, gives each
rank its slice, draws the timesteps, noise and label-dropout mask for the *global* batch from a generator seeded
by (seed, step) and keeps its slice, computes the hybrid loss (L_simple + L_vlb), steps AdamW, and updates the
EMA. Every random choice is a function of (seed, step), so a resumed run and a run on a different number of
processes see exactly the same batches and noise.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ditkit import distributed as dist_utils
from ditkit.errors import UserError
from ditkit.models.config import CONDITIONINGS, MODEL_NAMES, DiTConfig
from ditkit.models.dit import DiT
from ditkit.train_checkpoints import (
    OPTIMIZER_FORMAT,
    gather_model_state,
    gather_optimizer_state,
    list_checkpoints,
    load_optimizer_state,
    load_training_checkpoint,
    prune_checkpoints,
    remove_stale_temporaries,
    save_training_checkpoint,
)
from ditkit.train_step import TrainStep

PRECISIONS = ("fp32", "tf32", "bf16", "fp8")  # fp8: bf16 autocast + FP8 block GEMMs (CUDA)


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
    compile: bool | None = None  # default: on for GPUs (each block compiled, see ditkit.fast), off on CPU
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
    skip_nonfinite: bool = False
    progress: bool = True
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. depth/hidden_size for small demos


@dataclass
class TrainResult:
    step: int
    results_dir: Path
    losses: list[tuple[int, float]]  # (step, mean loss over the logging window)
    last_checkpoint: Path | None
    ema: DiT
    model: DiT  # the trained (non-EMA) weights
    stopped_by_signal: bool = False


# ----------------------------------------------------------------------------------------------- data


@dataclass
class _Data:
    dataset: Dataset
    num_classes: int
    in_channels: int
    input_size: int
    encoder: Any
    description: str
    labels: torch.Tensor | None


def open_data(opts: TrainOptions, seed: int) -> _Data:
    """The built-in digits, a latent store, or an image folder (encoded by a VAE on the fly when --vae)."""
    if opts.data_path == "digits":
        from ditkit.data.digits import NUM_CLASSES, load_digits_split

        size = opts.image_size or 16
        images, labels = load_digits_split(size, "train")
        return _Data(TensorDataset(images, labels), NUM_CLASSES, 1, size, None, f"digits {size}x{size}", labels)
    from ditkit.data import open_training_data

    data = open_training_data(opts.data_path, opts.image_size, opts.vae, seed)  # None: the store's own size
    labels = getattr(data, "labels", None)
    return _Data(
        data.dataset,
        data.num_classes,
        data.in_channels,
        data.input_size,
        data.encoder,
        data.describe(),
        torch.as_tensor(labels) if labels is not None else None,
    )


class _GlobalBatches:
    """Index lists of this rank's share of each global batch, from step `start` on, within one epoch."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, epoch: int, start: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        self.perm = torch.randperm(n, generator=g)
        self.global_batch, self.local = global_batch, global_batch // world
        self.rank, self.start = rank, start
        self.steps = n // global_batch

    def __iter__(self) -> Iterator[list[int]]:
        for s in range(self.start, self.steps):
            batch = self.perm[s * self.global_batch : (s + 1) * self.global_batch]
            yield batch[self.rank * self.local : (self.rank + 1) * self.local].tolist()

    def __len__(self) -> int:
        return self.steps - self.start


# ----------------------------------------------------------------------------------------------- helpers


def _run_config(opts: TrainOptions, config: DiTConfig, data: _Data) -> dict[str, Any]:
    """What identifies a run: a results folder holding another one is refused."""
    return {
        "model": config.to_dict(),
        "data": data.description,
        "global_batch_size": opts.global_batch_size,
        "noise_schedule": opts.noise_schedule,
        "global_seed": opts.global_seed,
    }


def _check_results_dir(results: Path, run_config: dict[str, Any], resuming: bool) -> None:
    stored = results / "config.json"
    if stored.exists():
        try:
            old = json.loads(stored.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{stored} is not valid JSON; choose another --results-dir") from None
        for key, value in run_config.items():
            if old.get(key) != value:
                raise UserError(
                    f"results folder {results} holds a run of another config ({key}: {old.get(key)!r} there, "
                    f"{value!r} now); choose another --results-dir"
                )
        if not resuming and list_checkpoints(results / "checkpoints"):
            raise UserError(
                f"results folder {results} already has checkpoints; pass --resume auto to continue that run "
                "or choose another --results-dir"
            )


def _default_results_dir(opts: TrainOptions, config: DiTConfig) -> Path:
    data = "digits" if opts.data_path == "digits" else Path(opts.data_path.rstrip("/")).name
    return Path("results") / f"{config.name.replace('/', '-')}-{data}"


class _StopFlag:
    """SIGTERM / SIGINT (what clusters send before preemption) ask the loop to checkpoint and exit cleanly."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------------------------- the loop


def _check_fp8(device: torch.device) -> None:
    """FP8 GEMMs need a CUDA GPU with FP8 matrix units (compute capability 8.9 or newer)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise UserError("--precision fp8 needs a CUDA GPU with FP8 matrix units (Ada/Hopper or newer); use bf16")


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
    if opts.grad_clip < 0:
        raise UserError(f"--grad-clip must be >= 0 (0 = off), got {opts.grad_clip}")
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
    if opts.vae and opts.data_path == "digits":
        raise UserError("--vae does not apply to --data-path digits (a pixel-space data set); drop --vae")


def train(opts: TrainOptions) -> TrainResult:
    """Run (or resume) training; returns the final state. Works alone or under torchrun."""
    info = dist_utils.init()
    try:
        return _train(opts, info)
    finally:
        dist_utils.cleanup()


def _train(opts: TrainOptions, info: dist_utils.DistInfo) -> TrainResult:  # noqa: C901 - the loop reads top-down
    from ditkit.diffusion import create_diffusion

    validate(opts, info.world_size)
    device = info.device
    # bf16 is allowed on CPU too (CPU autocast supports it: slower, but correct).
    precision = opts.precision or ("bf16" if device.type == "cuda" else "fp32")
    if precision == "fp8":
        _check_fp8(device)
    if device.type == "cuda":
        allow = precision in ("tf32", "bf16", "fp8")
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow

    data = open_data(opts, opts.global_seed)
    num_classes = opts.num_classes or data.num_classes
    if data.labels is not None and len(data.labels) and int(data.labels.max()) >= num_classes:
        raise UserError(
            f"the data has label {int(data.labels.max())} but --num-classes is {num_classes}; "
            f"labels must be in 0..{num_classes - 1}"
        )
    n = len(data.dataset)
    if n == 0:
        raise UserError(f"no training items found in {opts.data_path}")
    if n < opts.global_batch_size:
        raise UserError(
            f"the data has {n} items, fewer than --global-batch-size {opts.global_batch_size}; lower the batch size"
        )
    config = DiTConfig.from_name(
        opts.model,
        **{
            "input_size": data.input_size,
            "in_channels": data.in_channels,
            "num_classes": num_classes,
            "learn_sigma": opts.learn_sigma,
            "class_dropout_prob": opts.class_dropout_prob,
            "conditioning": opts.conditioning,
            **opts.model_overrides,
        },
    )
    results = Path(opts.results_dir) if opts.results_dir else _default_results_dir(opts, config)
    ckpt_dir = results / "checkpoints"
    run_config = _run_config(opts, config, data)
    if info.is_main:
        _check_results_dir(results, run_config, resuming=opts.resume is not None)
        remove_stale_temporaries(ckpt_dir)  # leftovers of a write that was killed
    dist_utils.barrier()

    torch.manual_seed(opts.global_seed)
    model = DiT(config)
    if opts.grad_checkpointing:
        model.set_grad_checkpointing(True)
    ema = DiT(config)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.requires_grad_(p.requires_grad)  # _foreach_lerp_ pairs the trained ones; no grads are kept

    step = 0
    resume_from = None
    if opts.resume == "auto":
        found = list_checkpoints(ckpt_dir)
        resume_from = found[-1] if found else None
    elif opts.resume:
        resume_from = Path(opts.resume)
        if not resume_from.exists():
            raise UserError(f"--resume {opts.resume}: no such checkpoint folder")
    # Every rank reads the full checkpoint on the CPU and loads it before wrapping / sharding, whatever world
    # size or strategy wrote it (the format is the same for all).
    ckpt = load_training_checkpoint(resume_from, model) if resume_from is not None else None
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
        ema.load_state_dict(ckpt.ema)
        step = ckpt.step
    model.to(device)
    ema.to(device).eval()

    diffusion = create_diffusion("", noise_schedule=opts.noise_schedule, learn_sigma=config.learn_sigma)
    compile_on = opts.compile if opts.compile is not None else device.type == "cuda"
    if precision == "fp8":
        from ditkit.models.kernels.fp8 import enable_fp8

        enable_fp8(model)  # the class swap keeps parameters and state_dict keys; the EMA copy stays plain
    fsdp = opts.strategy == "fsdp" and info.distributed  # one process: nothing to shard, train as is
    forward: torch.nn.Module = model
    if fsdp:
        if compile_on:  # compiled blocks first, then sharded: FSDP's hooks stay outside the compiled graphs
            from ditkit.fast import compile_blocks

            compile_blocks(model)
        dist_utils.shard_dit(model, bf16=precision in ("bf16", "fp8"))
        dist_utils.shard_dit(ema, bf16=False)  # the same layout, so update_ema lerps local shards
    else:
        if info.distributed:
            forward = dist_utils.wrap_ddp(model, device)
        if compile_on:
            from ditkit.fast import compile_blocks

            compile_blocks(model)  # in place, before any step; DDP's hooks are unaffected
    opt = torch.optim.AdamW(  # after sharding: FSDP2 replaces the parameters by DTensors
        [p for p in model.parameters() if p.requires_grad],
        lr=opts.lr,
        weight_decay=0.0,
        **({"fused": True} if device.type == "cuda" else {}),
    )
    if ckpt is not None:
        load_optimizer_state(model, opt, ckpt.state)  # moves the state to the parameters' device (and shards)
        if "torch_rng" in ckpt.state:
            torch.set_rng_state(ckpt.state["torch_rng"])
        del ckpt
    train_step = TrainStep(
        model, forward, ema, opt, diffusion, device=device, precision=precision,
        global_batch=opts.global_batch_size, rank=info.rank, world=info.world_size, accum=opts.grad_accum_steps,
        seed=opts.global_seed, ema_decay=opts.ema_decay, grad_clip=opts.grad_clip,
        class_dropout_prob=config.class_dropout_prob,
    )

    steps_per_epoch = n // opts.global_batch_size
    total_steps = opts.max_steps if opts.max_steps is not None else opts.epochs * steps_per_epoch
    writer = _Logger(results, opts, run_config, info.is_main)
    if info.is_main:
        where = f"resuming from {resume_from} at step {step}" if resume_from else "starting fresh"
        params = sum(p.numel() for p in model.parameters())
        writer.line(
            f"{config.name}: {params / 1e6:.2f}M params, {data.description}, {n} items, device {device}, "
            f"world {info.world_size} ({'fsdp' if fsdp else 'ddp'}), {precision}, "
            f"{opts.grad_accum_steps} micro-step(s) per step; {where}; results in {results}"
        )

    losses: list[tuple[int, float]] = []
    sums = torch.zeros(3, device=device)  # loss, mse, vb over the logging window
    window = 0
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    last_ckpt: Path | None = resume_from
    t_window = time.perf_counter()
    check_each_step = device.type == "cpu" or opts.skip_nonfinite
    skipped = 0

    saved_step = step if resume_from is not None else -1  # known on every rank (last_ckpt only on rank 0)

    def unsharded(module: torch.nn.Module) -> torch.nn.Module:
        """A plain DiT with the full weights of a sharded one, on rank 0 (every rank must call; others get
        `module` back). For sample grids and evaluation, which run on rank 0 alone."""
        weights = gather_model_state(module)
        if not info.is_main:
            return module
        plain = DiT(config)
        plain.load_state_dict(weights)
        return plain.to(device)

    def save(at_step: int) -> Path | None:
        nonlocal last_ckpt, saved_step
        _raise_if_nonfinite(first_bad, last_ckpt)
        saved_step = at_step
        # Gathered to full state dicts (collectives under FSDP: every rank takes part), written by rank 0.
        weights, ema_weights = gather_model_state(model), gather_model_state(ema)
        optimizer = gather_optimizer_state(model, opt)
        if info.is_main:
            state = {
                "step": at_step,
                "epoch": at_step // steps_per_epoch,
                "position": at_step % steps_per_epoch,
                "optimizer": optimizer,
                "optimizer_format": OPTIMIZER_FORMAT,
                "torch_rng": torch.get_rng_state(),
                "global_seed": opts.global_seed,
                "world_size": info.world_size,
                "strategy": "fsdp" if fsdp else "ddp",
            }
            last_ckpt = save_training_checkpoint(
                ckpt_dir, at_step, weights, ema_weights, state, json.dumps(config.to_dict())
            )
            prune_checkpoints(ckpt_dir, opts.keep_last)
            writer.line(f"step {at_step}: checkpoint {last_ckpt}")
        dist_utils.barrier()
        return last_ckpt

    bar = _progress(total_steps, step, info.is_main and opts.progress)
    stopped_by = None
    model.train()
    with _StopFlag() as stop:
        while step < total_steps:
            epoch, position = divmod(step, steps_per_epoch)
            if hasattr(data.dataset, "set_epoch"):
                data.dataset.set_epoch(epoch)
            batches = _GlobalBatches(n, opts.global_batch_size, info.rank, info.world_size, opts.global_seed,
                                     epoch, position)
            loader = DataLoader(
                data.dataset,
                batch_sampler=batches,
                num_workers=opts.num_workers if not isinstance(data.dataset, TensorDataset) else 0,
                pin_memory=device.type == "cuda",
                prefetch_factor=4 if opts.num_workers and not isinstance(data.dataset, TensorDataset) else None,
            )
            for x, y in loader:
                if y.numel() and (int(y.max()) >= num_classes or int(y.min()) < 0):
                    raise UserError(f"label {int(y.max())} out of range for --num-classes {num_classes}")
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if data.encoder is not None:
                    with torch.no_grad():
                        x = data.encoder(x)
                log_now = (step + 1) % opts.log_every == 0
                out = train_step(x, y, step, want_grad_norm=log_now, skip_nonfinite=opts.skip_nonfinite)
                grad_norm, finite = out.grad_norm, out.finite
                if not out.stepped:
                    skipped += 1
                    if info.is_main:
                        writer.line(f"step {step + 1}: non-finite loss or gradient, step skipped ({skipped} so far)")
                else:
                    first_bad = torch.where((first_bad < 0) & ~finite, step + 1, first_bad)
                step += 1
                if check_each_step:
                    _raise_if_nonfinite(first_bad, last_ckpt)
                sums += out.terms
                window += 1
                if bar is not None:
                    bar.update(1)
                if log_now:
                    _raise_if_nonfinite(first_bad, last_ckpt)
                    avg = dist_utils.all_reduce_mean(sums / window).tolist()
                    elapsed = time.perf_counter() - t_window
                    record = {
                        "step": step,
                        "loss": avg[0],
                        "mse": avg[1],
                        "vb": avg[2],
                        "grad_norm": float(grad_norm) if grad_norm is not None else None,
                        "lr": opt.param_groups[0]["lr"],
                        "images_per_sec": window * opts.global_batch_size / max(elapsed, 1e-9),
                        "epoch": epoch,
                    }
                    if device.type == "cuda":
                        record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    losses.append((step, avg[0]))
                    if info.is_main:
                        writer.metrics(record)
                        if bar is not None:
                            bar.set_postfix(loss=f"{avg[0]:.4f}", img_s=f"{record['images_per_sec']:.0f}")
                    sums.zero_()
                    window = 0
                    t_window = time.perf_counter()
                grid_now = bool(opts.sample_every) and step % opts.sample_every == 0
                eval_now = bool(opts.eval_every) and step % opts.eval_every == 0
                if grid_now or eval_now:
                    full_ema = unsharded(ema) if fsdp else ema  # collective under FSDP
                    if grid_now and info.is_main:
                        _sample_grid(full_ema, config, opts, results / "samples" / f"{step:07d}", device, precision)
                    if eval_now and info.is_main:
                        writer.metrics({"step": step, **_evaluate(full_ema, config, opts, device, precision)})
                stopping = stop.signal is not None
                if stopping and info.distributed:
                    flag = torch.tensor(1.0, device=device)
                    stopping = bool(dist_utils.all_reduce_mean(flag) > 0)
                if step % opts.ckpt_every == 0 or step == total_steps or stopping:
                    save(step)
                if stopping:
                    stopped_by = stop.signal
                    break
                if step >= total_steps:
                    break
            if stopped_by is not None:
                break
    if bar is not None:
        bar.close()
    if saved_step != step:
        save(step)
    if info.is_main:
        skipped_images = getattr(data.dataset, "num_skipped", None)
        if skipped_images:
            writer.line(f"{int(skipped_images)} unreadable image(s) were skipped (named above)")
        if stopped_by is not None:
            writer.line(f"stopped by signal {signal.Signals(stopped_by).name} at step {step}; "
                        f"resume with --resume auto --results-dir {results}")
        writer.close()
    if fsdp:  # gathered full copies (rank 0; the other ranks keep their shards)
        ema, model = unsharded(ema), unsharded(model)
    return TrainResult(step, results, losses, last_ckpt, ema.eval(), model.eval(),
                       stopped_by_signal=stopped_by is not None)


def _raise_if_nonfinite(first_bad: torch.Tensor, last_ckpt: Path | None) -> None:
    bad = int(first_bad)
    if bad >= 0:
        keep = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
        raise UserError(
            f"the loss or gradient became NaN/Inf at step {bad}; training stopped and {keep}. Resume from it with "
            "a lower --lr, --grad-clip 1.0, or --skip-nonfinite"
        )


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)


class _Logger:
    """Rank-0 logs: a text log, metrics.jsonl, and TensorBoard scalars when tensorboard is installed."""

    def __init__(self, results: Path, opts: TrainOptions, run_config: dict[str, Any], enabled: bool):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        results.mkdir(parents=True, exist_ok=True)
        (results / "config.json").write_text(json.dumps(run_config, indent=2))
        (results / "options.json").write_text(json.dumps(asdict(opts), indent=2, default=str))
        self.log = open(results / "log.txt", "a")
        self.jsonl = open(results / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(results / "tensorboard"))
        except ImportError:
            self.tb = None

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr)
            self.log.write(text + "\n")
            self.log.flush()

    def metrics(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.log.close()
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


def _ema_sampler(ema: DiT, config: DiTConfig, opts: TrainOptions, device: torch.device, precision: str):
    """DPM-Solver++ (20 steps) with guidance on every ε channel: cheap enough to run inside training."""
    from ditkit.sample import Sampler

    vae = None
    if config.in_channels != 1 and opts.vae:
        from ditkit.autoencoder import load_vae

        vae = load_vae(opts.vae, device=device)
    return Sampler(model=ema, vae=vae, sampler="dpm-solver", num_steps=20,
                   cfg_scale=4.0 if config.num_classes > 1 else 1.0, guide_channels="all", device=device,
                   precision="bf16" if precision == "fp8" else precision)  # the EMA copy has no FP8 linears


def _sample_grid(ema: DiT, config: DiTConfig, opts: TrainOptions, folder: Path, device: torch.device,
                 precision: str) -> None:
    """A guided EMA sample grid: one row per class (at most 10), 8 columns, into RESULTS/samples/STEP/."""
    from ditkit.sample import sample_grid

    sampler = _ema_sampler(ema, config, opts, device, precision)
    sample_grid(sampler, list(range(min(config.num_classes, 10))), 8, seed=0, out=folder, save_images=False)


def _evaluate(ema: DiT, config: DiTConfig, opts: TrainOptions, device: torch.device, precision: str) -> dict:
    """The digits yardstick on `eval_samples` class-balanced EMA samples."""
    from ditkit.metrics.digits_classifier import digits_metrics

    labels = torch.arange(opts.eval_samples) % config.num_classes
    sampler = _ema_sampler(ema, config, opts, device, precision)
    images = sampler.images(labels, torch.Generator(device=device).manual_seed(0))
    pixels = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return {f"eval_{k}": v for k, v in digits_metrics(pixels, labels, verbose=False).items()}


# ----------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", default="DiT-XL/2", choices=MODEL_NAMES)
    a("--data-path", required=True, help="'digits' (built in), an image folder, or a latent store from ditkit extract")
    a("--image-size", type=int, default=None, help="image side (default 256; 16 for digits)")
    a("--num-classes", type=int, default=None, help="default: number of classes in the data")
    a("--vae", default=None, help="SD-VAE folder or Hugging Face id, to train on an image folder in latent space")
    a("--global-batch-size", type=int, default=256)
    a("--grad-accum-steps", type=int, default=1,
      help="split each process's share of the global batch into N micro-batches (same result, less memory)")
    a("--strategy", choices=dist_utils.STRATEGIES, default="ddp",
      help="ddp: replicate the model on every GPU; fsdp: shard parameters, gradients and AdamW state (FSDP2)")
    a("--epochs", type=int, default=1400)
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps (overrides --epochs)")
    a("--global-seed", type=int, default=0)
    a("--lr", type=float, default=1e-4)
    a("--ema-decay", type=float, default=0.9999)
    a("--precision", choices=PRECISIONS, default=None,
      help="default: bf16 on GPU, fp32 on CPU; fp8 (opt-in, GPU): bf16 autocast with FP8 block matmuls")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile each DiT block (default: on for GPUs, off on CPU)")
    a("--grad-checkpointing", action="store_true", help="recompute block activations (less memory)")
    a("--grad-clip", type=float, default=0.0, help="clip the gradient norm (0 = off, the paper's setting)")
    a("--log-every", type=int, default=100)
    a("--ckpt-every", type=int, default=50_000)
    a("--keep-last", type=int, default=0, help="keep only the newest N checkpoints (0 = all)")
    a("--sample-every", type=int, default=0, help="write an EMA sample grid every N steps (0 = off)")
    a("--eval-every", type=int, default=0, help="score EMA samples every N steps (digits data)")
    a("--results-dir", default=None, help="run folder (default results/<model>-<data>)")
    a("--resume", default=None, help="'auto' (newest checkpoint in the results folder) or a checkpoint folder")
    a("--num-workers", type=int, default=4)
    a("--conditioning", choices=CONDITIONINGS, default="adaln-zero")
    a("--skip-nonfinite", action="store_true", help="skip steps with a NaN/Inf loss instead of stopping")
    a("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    opts = TrainOptions(
        data_path=args.data_path,
        model=args.model,
        image_size=args.image_size,
        num_classes=args.num_classes,
        vae=args.vae,
        global_batch_size=args.global_batch_size,
        grad_accum_steps=args.grad_accum_steps,
        strategy=args.strategy,
        epochs=args.epochs,
        max_steps=args.max_steps,
        global_seed=args.global_seed,
        lr=args.lr,
        ema_decay=args.ema_decay,
        precision=args.precision,
        compile=args.compile,
        grad_checkpointing=args.grad_checkpointing,
        grad_clip=args.grad_clip,
        log_every=args.log_every,
        ckpt_every=args.ckpt_every,
        keep_last=args.keep_last,
        sample_every=args.sample_every,
        eval_every=args.eval_every,
        results_dir=args.results_dir,
        resume=args.resume,
        num_workers=args.num_workers,
        conditioning=args.conditioning,
        skip_nonfinite=args.skip_nonfinite,
        progress=not args.no_progress,
    )
    result = train(opts)
    if result.stopped_by_signal:
        print(f"checkpoint written at step {result.step}; exiting cleanly", file=sys.stderr)
    return 0
