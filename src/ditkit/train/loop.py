"""The training loop: train a DiT on one CPU, one GPU, or many GPUs and nodes under torchrun (DDP or FSDP2).

The loop in one breath: each step takes the next global batch of a seeded per-epoch permutation, gives each
rank its slice, draws the timesteps, noise and label-dropout mask for the *global* batch from a generator seeded
by (seed, step) and keeps its slice, computes the hybrid loss (L_simple + L_vlb), steps AdamW, and updates the
EMA. Every random choice is a function of (seed, step), so a resumed run and a run on a different number of
processes see exactly the same batches and noise.
"""

from __future__ import annotations

import json
import signal
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from ditkit import distributed as dist_utils
from ditkit.data.caption_store import unpack
from ditkit.data.workers import ignore_stop_signals, stop_signals_held
from ditkit.errors import UserError
from ditkit.folder_lock import FolderLock
from ditkit.models import build_model
from ditkit.models.config import DiTConfig
from ditkit.models.dit import DiT
from ditkit.models.kernels.fp8 import enable_fp8
from ditkit.train.batches import GlobalBatches, TrainData, open_data
from ditkit.train.checkpoint import (
    OPTIMIZER_FORMAT,
    gather_model_state,
    gather_optimizer_state,
    list_checkpoints,
    load_newest_complete,
    load_optimizer_state,
    load_training_checkpoint,
    prune_checkpoints,
    remove_stale_temporaries,
    save_training_checkpoint,
)
from ditkit.train.logging import RunLogger, progress_bar
from ditkit.train.options import TrainOptions, validate
from ditkit.train.step import TrainStep


@dataclass
class TrainResult:
    step: int
    results_dir: Path
    losses: list[tuple[int, float]]  # (step, mean loss over the logging window)
    last_checkpoint: Path | None
    ema: DiT
    model: DiT  # the trained (non-EMA) weights
    stopped_by_signal: bool = False


# ----------------------------------------------------------------------------------------------- helpers


def _run_config(opts: TrainOptions, config: DiTConfig, data: TrainData) -> dict[str, Any]:
    """What identifies a run: a results folder holding another one is refused. `classes`, the label map
    (label k's class name), is there when the data names its classes."""
    run = {
        "model": config.to_dict(),
        "data": data.description,
        "global_batch_size": opts.global_batch_size,
        "noise_schedule": opts.noise_schedule,
        "global_seed": opts.global_seed,
    }
    if data.classes:
        run["classes"] = list(data.classes)
    return run


_LATER_KEYS = ("classes",)  # recorded later than the others: a run folder written before has no such entry


def _label_map_change(old: list[str], new: list[str]) -> str:
    """The first difference between two label maps, in words."""
    for k, (a, b) in enumerate(zip(old, new)):
        if a != b:
            return f"label {k} is class {a!r} there, {b!r} now"
    return f"{len(old)} classes there, {len(new)} now"


def _check_results_dir(results: Path, run_config: dict[str, Any], resuming: bool) -> None:
    stored = results / "config.json"
    if stored.exists():
        try:
            old = json.loads(stored.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{stored} is not valid JSON; choose another --results-dir") from None
        for key, value in run_config.items():
            if key in _LATER_KEYS and key not in old:
                continue
            if key == "classes" and old[key] != value:
                raise UserError(
                    f"results folder {results} holds a run with another label map ({_label_map_change(old[key], value)}"
                    "); train on the same classes, or choose another --results-dir"
                )
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


def train(opts: TrainOptions) -> TrainResult:
    """Run (or resume) training; returns the final state. Works alone or under torchrun."""
    info = dist_utils.init()
    try:
        with ExitStack() as held:  # the results folder's lock, released when training ends
            return _train(opts, info, held)
    finally:
        dist_utils.cleanup()


def _text_overrides(data: TrainData, opts: TrainOptions) -> dict[str, Any]:
    """A captioned latent store trains a text model (PixArt-α's block) reading its stored caption features."""
    if data.captions is None:
        if opts.conditioning == "text":
            raise UserError("--conditioning text trains on captions: give a latent store made by ditkit extract "
                            "--text-encoder ENCODER from a captioned image folder")
        return {}
    return {"conditioning": "text", "caption_channels": int(data.captions["channels"]),
            "max_tokens": int(data.captions["max_tokens"])}


def _train(opts: TrainOptions, info: dist_utils.DistInfo, held: ExitStack) -> TrainResult:  # noqa: C901 - the loop reads top-down
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
            **_text_overrides(data, opts),
            **opts.model_overrides,
        },
    )
    results = Path(opts.results_dir) if opts.results_dir else _default_results_dir(opts, config)
    ckpt_dir = results / "checkpoints"
    run_config = _run_config(opts, config, data)
    if info.is_main:
        held.enter_context(FolderLock(results, "ditkit train", "--results-dir"))  # one writer per folder
        _check_results_dir(results, run_config, resuming=opts.resume is not None)
        remove_stale_temporaries(ckpt_dir)  # leftovers of a write that was killed
    dist_utils.barrier()

    torch.manual_seed(opts.global_seed)
    model = build_model(config)
    if opts.grad_checkpointing:
        model.set_grad_checkpointing(True)
    ema = build_model(config)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.requires_grad_(p.requires_grad)  # _foreach_lerp_ pairs the trained ones; no grads are kept

    step = 0
    resume_from = None
    notes: list[str] = []  # incomplete checkpoints passed over, logged once the log is open
    if opts.resume and opts.resume != "auto":
        resume_from = Path(opts.resume)
        if not resume_from.exists():
            raise UserError(f"--resume {opts.resume}: no such checkpoint folder")
    # Every rank reads the full checkpoint on the CPU and loads it before wrapping / sharding, whatever world
    # size or strategy wrote it (the format is the same for all).
    if opts.resume == "auto":
        ckpt = load_newest_complete(ckpt_dir, model, notes.append)
        resume_from = ckpt.path if ckpt is not None else None
    else:
        ckpt = load_training_checkpoint(resume_from, model) if resume_from is not None else None
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
        ema.load_state_dict(ckpt.ema)
        step = ckpt.step
    model.to(device)
    ema.to(device).eval()

    diffusion = create_diffusion("", noise_schedule=opts.noise_schedule, learn_sigma=config.learn_sigma)
    compile_on = opts.compile if opts.compile is not None else device.type == "cuda"
    if precision == "fp8":  # the class swap keeps parameters and state_dict keys; the EMA copy stays plain
        enable_fp8(model)
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
    writer = RunLogger(results, opts, run_config, info.is_main)
    if info.is_main:
        for line in notes:
            writer.line(line)
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
        plain = build_model(config)
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

    bar = progress_bar(total_steps, step, info.is_main and opts.progress)
    stopped_by = None
    model.train()
    with _StopFlag() as stop:
        while step < total_steps:
            epoch, position = divmod(step, steps_per_epoch)
            if hasattr(data.dataset, "set_epoch"):
                data.dataset.set_epoch(epoch)
            batches = GlobalBatches(n, opts.global_batch_size, info.rank, info.world_size, opts.global_seed,
                                     epoch, position)
            loader = DataLoader(
                data.dataset,
                batch_sampler=batches,
                num_workers=opts.num_workers if not isinstance(data.dataset, TensorDataset) else 0,
                pin_memory=device.type == "cuda",
                prefetch_factor=4 if opts.num_workers and not isinstance(data.dataset, TensorDataset) else None,
                worker_init_fn=ignore_stop_signals,  # a SIGTERM to the whole job must reach only this process
            )
            with stop_signals_held():  # workers start here; held until they ignore the stop signals
                batch_iter = iter(loader)
            for x, y in batch_iter:
                mask = None
                if config.is_text:  # packed captions (features + mask), not labels
                    y, mask = unpack(y.to(device, non_blocking=True))
                elif y.numel() and (int(y.max()) >= num_classes or int(y.min()) < 0):
                    raise UserError(f"label {int(y.max())} out of range for --num-classes {num_classes}")
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if data.encoder is not None:
                    with torch.no_grad():
                        x = data.encoder(x)
                log_now = (step + 1) % opts.log_every == 0
                out = train_step(x, y, step, want_grad_norm=log_now, skip_nonfinite=opts.skip_nonfinite, mask=mask)
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
                # Class-label grids and the digits yardstick; text models are sampled from prompts (ditkit sample).
                grid_now = bool(opts.sample_every) and step % opts.sample_every == 0 and not config.is_text
                eval_now = bool(opts.eval_every) and step % opts.eval_every == 0 and not config.is_text
                if grid_now or eval_now:
                    full_ema = unsharded(ema) if fsdp else ema  # collective under FSDP
                    if grid_now and info.is_main:
                        _sample_grid(full_ema, config, opts, results / "samples" / f"{step:07d}", device, precision)
                    if eval_now and info.is_main:
                        writer.metrics({"step": step, **_evaluate(full_ema, config, opts, device, precision)})
                # Every rank votes after every step: a signal that reached some ranks only, or reached them in
                # different steps, stops all of them after this same step (a vote by the signalled ranks alone
                # would be a collective that the others never join).
                voted = dist_utils.max_over_ranks(stop.signal or 0)
                stopping = voted > 0
                if step % opts.ckpt_every == 0 or step == total_steps or stopping:
                    save(step)
                if stopping:
                    stopped_by = voted
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


