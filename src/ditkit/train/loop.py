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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from ditkit.data import TrainingData
from ditkit.data.caption_store import unpack
from ditkit.data.workers import ignore_stop_signals, stop_signals_held
from ditkit.models import build_model
from ditkit.models.config import DiTConfig
from ditkit.models.dit import DiT
from ditkit.models.precision import Precision, prepare
from ditkit.objectives import entry_for, objective_for
from ditkit.recipe import Conditioning, Recipe
from ditkit.runtime import distributed as dist_utils
from ditkit.runtime.errors import UserError
from ditkit.runtime.flag_checks import resumed_lr
from ditkit.runtime.folder_lock import FolderLock
from ditkit.runtime.path_guard import refuse_overlap
from ditkit.runtime.seeding import generator as seeded
from ditkit.runtime.validate import mapping
from ditkit.train.batches import GlobalBatches, open_data
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
from ditkit.train.health import GoodCheckpoints, all_finite, nonfinite_advice, supersede_newer
from ditkit.train.logging import RunLogger, progress_bar
from ditkit.train.methods import method_hooks
from ditkit.train.options import TrainOptions, model_knobs, process_of, sampling_of, validate
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
    recipe: Recipe | None = None  # how the model was made and must be sampled


# ----------------------------------------------------------------------------------------------- helpers


def _run_config(opts: TrainOptions, config: DiTConfig, data: TrainingData) -> dict[str, Any]:
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
        mapping(old, "the run config", str(stored))  # a list or string there would end in a TypeError
        for key, value in run_config.items():
            if key in _LATER_KEYS and key not in old:
                continue
            if key == "classes" and old[key] != value:
                raise UserError(
                    f"results folder {results} holds a run with another label map ({_label_map_change(old[key], value)}"
                    "); train on the same classes, or choose another --results-dir"
                )
            if key == "data" and old.get(key) != value:
                raise UserError(
                    f"results folder {results} holds a run on other data ({old.get(key)!r} there, {value!r} now); "
                    "a run cannot continue on changed data (images added or removed): start a new run with "
                    "another --results-dir, or resume with the data as it was"
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


def train(opts: TrainOptions) -> TrainResult:
    """Run (or resume) training; returns the final state. Works alone or under torchrun."""
    # The stop signals are caught from here to the return, set-up and the last checkpoint included: a SIGTERM
    # that lands outside the step loop (a scheduler does not know where the loop is) would otherwise kill a
    # process that has already done its work, or is about to start it, with exit -15.
    with _StopFlag() as stop:
        info = dist_utils.init()
        try:
            with ExitStack() as held:  # the results folder's lock, released when training ends
                return _train(opts, info, held, stop)
        finally:
            dist_utils.cleanup()


def _text_overrides(data: TrainingData, opts: TrainOptions) -> dict[str, Any]:
    """A captioned latent store trains a text model (PixArt-α's block) reading its stored caption features."""
    if data.captions is None:
        if opts.conditioning == "text":
            raise UserError("--conditioning text trains on captions: give a latent store made by ditkit extract "
                            "--text-encoder ENCODER from a captioned image folder")
        return {}
    return {"conditioning": "text", "caption_channels": int(data.captions["channels"]),
            "max_tokens": int(data.captions["max_tokens"])}


def _train(opts: TrainOptions, info: dist_utils.DistInfo, held: ExitStack, stop: _StopFlag) -> TrainResult:
    """The run top-down: set up (data, recipe, models, resume, parallel wrappers, AdamW), train epoch by epoch
    until the step budget or a stop signal, write the last checkpoint, report."""
    validate(opts, info.world_size)
    precision = _set_precision(opts, info.device)
    data = open_data(opts, opts.global_seed)
    config = _model_config(opts, data)
    hooks = method_hooks(opts, config, data, info.device)  # REPA / TREAD (train/methods.py)
    recipe = build_recipe(opts, config, data).replace(training=hooks.methods)  # built once; read below
    results = Path(opts.results_dir) if opts.results_dir else _default_results_dir(opts, config)
    run_config = _run_config(opts, config, data)
    if opts.data_path != "digits":  # checkpoints and grids written into the images would be read back as data
        refuse_overlap({"--data-path": opts.data_path}, results, "--results-dir", allow=("contains",))
    if info.is_main:
        held.enter_context(FolderLock(results, "ditkit train", "--results-dir"))  # one writer per folder
        _check_results_dir(results, run_config, resuming=opts.resume is not None)
        remove_stale_temporaries(results / "checkpoints")  # leftovers of a write that was killed
    dist_utils.barrier()

    torch.manual_seed(opts.global_seed)
    model, ema = _new_models(config, opts.grad_checkpointing, hooks.attach)
    notes: list[str] = []  # incomplete checkpoints passed over, logged once the log is open
    ckpt = _resume(opts, results / "checkpoints", model, notes)
    resume_from = ckpt.path if ckpt is not None else None
    if ckpt is not None:
        check_resumed_recipe(ckpt.recipe_json, recipe, resume_from)
        model.load_state_dict(ckpt.model)
        ema.load_state_dict(ckpt.ema)
    model.to(info.device)
    ema.to(info.device).eval()
    forward, fsdp = _parallelize(model, ema, opts, info, precision)
    opt = _optimizer(model, opts, info.device)  # after sharding: FSDP2 replaces the parameters by DTensors
    if ckpt is not None:
        load_optimizer_state(model, opt, ckpt.state)  # moves the state to the parameters' device (and shards)
        notes.extend(filter(None, [resumed_lr(opt, opts.lr)]))  # the checkpoint's rate would win silently
        if opts.resume != "auto" and info.is_main:  # an earlier checkpoint: later ones must not be resumed again
            ckpt_dir = results / "checkpoints"
            notes.extend(filter(None, [supersede_newer(ckpt_dir, ckpt.step, list_checkpoints(ckpt_dir))]))
        if "torch_rng" in ckpt.state:
            torch.set_rng_state(ckpt.state["torch_rng"])
    step_fn = TrainStep(
        model, forward, ema, opt, objective_for(recipe).training, device=info.device, precision=precision,
        global_batch=opts.global_batch_size, rank=info.rank, world=info.world_size, accum=opts.grad_accum_steps,
        seed=opts.global_seed, ema_decay=opts.ema_decay, grad_clip=opts.grad_clip,
        class_dropout_prob=config.class_dropout_prob, methods=hooks,
    )
    writer = RunLogger(results, opts, run_config, info.is_main)
    held.callback(writer.close)  # also when the run ends by an error: no log file or TensorBoard thread left open
    run = Run(opts, info, data, recipe, results, model, ema, opt, step_fn, fsdp, precision, writer,
              step=ckpt.step if ckpt else 0, last_ckpt=resume_from, saved_step=ckpt.step if ckpt else -1,
              good=GoodCheckpoints(resume_from))
    del ckpt
    run.announce(resume_from, notes)
    stopped_by = run.train_until_done(stop)
    return run.finish(stopped_by)


def _set_precision(opts: TrainOptions, device: torch.device) -> str:
    """The run's precision (default bf16 on GPU, fp32 on CPU) and the TF32 switches that go with it."""
    # bf16 is allowed on CPU too (CPU autocast supports it: slower, but correct).
    precision = Precision.resolve(opts.precision, device)
    precision.set_tf32()
    return precision.name


def _model_config(opts: TrainOptions, data: TrainingData) -> DiTConfig:
    """The model config from the flags and the data (channels, side, classes), after checking the data fits."""
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
    return DiTConfig.from_name(
        opts.model,
        **{
            "input_size": data.input_size,
            "in_channels": data.in_channels,
            "num_classes": num_classes,
            "learn_sigma": opts.learn_sigma,
            "class_dropout_prob": opts.class_dropout_prob,
            "conditioning": opts.conditioning,
            **_text_overrides(data, opts),
            **model_knobs(opts),
            **entry_for(opts.objective).model_config,  # e.g. MeanFlow's interval embedder
            **opts.model_overrides,
        },
    )


def _new_models(config: DiTConfig, grad_checkpointing: bool, attach: Any = None) -> tuple[DiT, DiT]:
    """The model (seeded by the caller) and its EMA copy, which holds no gradients. `attach` adds the training
    methods' parts (REPA's projector) to both."""
    attach = attach or (lambda net: net)
    model = attach(build_model(config))
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    ema = attach(build_model(config))
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.requires_grad_(p.requires_grad)  # _foreach_lerp_ pairs the trained ones; no grads are kept
    return model, ema


def _resume(opts: TrainOptions, ckpt_dir: Path, model: torch.nn.Module, notes: list[str]) -> Any:
    """The checkpoint to continue from, read on the CPU: --resume auto takes the newest complete one (an
    incomplete one is passed over with a note), a folder that one; None for a fresh run. Every rank reads the
    full checkpoint and loads it before wrapping / sharding, whatever world size or strategy wrote it."""
    if opts.resume == "auto":
        return load_newest_complete(ckpt_dir, model, notes.append)
    if opts.resume:
        path = Path(opts.resume)
        if not path.exists():
            raise UserError(f"--resume {opts.resume}: no such checkpoint folder")
        return load_training_checkpoint(path, model)
    return None


def _parallelize(model: DiT, ema: DiT, opts: TrainOptions, info: dist_utils.DistInfo,
                 precision: str) -> tuple[torch.nn.Module, bool]:
    """(what runs the batch, whether sharded): DDP-wrapped or FSDP2-sharded over the processes, blocks compiled
    on GPUs by default."""
    compile_on = opts.compile if opts.compile is not None else info.device.type == "cuda"
    # FP8 and compiled blocks first, then sharded or wrapped: FSDP's and DDP's hooks stay outside the compiled
    # graphs. The EMA copy stays plain (it is only read, in float32).
    prepare(model, Precision(precision, info.device.type), training=True, compile=compile_on)
    fsdp = opts.strategy == "fsdp" and info.distributed  # one process: nothing to shard, train as is
    forward: torch.nn.Module = model
    if fsdp:
        dist_utils.shard_dit(model, bf16=Precision(precision).low)
        dist_utils.shard_dit(ema, bf16=False)  # the same layout, so update_ema lerps local shards
        return forward, True
    if info.distributed:
        forward = dist_utils.wrap_ddp(model, info.device)
    return forward, False


def _optimizer(model: torch.nn.Module, opts: TrainOptions, device: torch.device) -> torch.optim.Optimizer:
    """The paper's AdamW: no weight decay, constant learning rate (fused on GPUs)."""
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=opts.lr,
        weight_decay=0.0,
        **({"fused": True} if device.type == "cuda" else {}),
    )


@dataclass
class Run:
    """The state of a training run between steps, and what the loop does with it."""

    opts: TrainOptions
    info: dist_utils.DistInfo
    data: TrainingData
    recipe: Recipe
    results: Path
    model: DiT
    ema: DiT
    opt: torch.optim.Optimizer
    step_fn: TrainStep
    fsdp: bool
    precision: str
    writer: RunLogger
    step: int = 0
    last_ckpt: Path | None = None
    saved_step: int = -1  # known on every rank (last_ckpt only on rank 0)
    skipped: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    good: GoodCheckpoints = field(default_factory=GoodCheckpoints)  # which checkpoint the NaN advice names

    def __post_init__(self) -> None:
        device = self.info.device
        self.n = len(self.data.dataset)
        self.steps_per_epoch = self.n // self.opts.global_batch_size
        self.total_steps = self.opts.max_steps if self.opts.max_steps is not None else \
            self.opts.epochs * self.steps_per_epoch
        self.sums = torch.zeros(3, device=device)  # loss, mse, vb over the logging window
        self.window = 0
        self.t_window = time.perf_counter()
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)
        self.check_each_step = device.type == "cpu" or self.opts.skip_nonfinite
        self.bar = None

    def announce(self, resume_from: Path | None, notes: list[str]) -> None:
        if self.info.is_main:
            for line in notes:
                self.writer.line(line)
            where = f"resuming from {resume_from} at step {self.step}" if resume_from else "starting fresh"
            params = sum(p.numel() for p in self.model.parameters())
            self.writer.line(
                f"{self.recipe.model.name}: {params / 1e6:.2f}M params, {self.data.description}, {self.n} items, "
                f"device {self.info.device}, world {self.info.world_size} ({'fsdp' if self.fsdp else 'ddp'}), "
                f"{self.precision}, {self.opts.grad_accum_steps} micro-step(s) per step; {where}; "
                f"results in {self.results}"
            )

    def train_until_done(self, stop: _StopFlag) -> int | None:
        """Epochs until the step budget; the signal that stopped the run, or None. A signal that came during
        set-up stops the run after its first step (all ranks vote after every step)."""
        self.bar = progress_bar(self.total_steps, self.step, self.info.is_main and self.opts.progress)
        self.model.train()
        stopped_by = None
        while self.step < self.total_steps and stopped_by is None:
            stopped_by = self.train_epoch(stop)
        if self.bar is not None:
            self.bar.close()
        return stopped_by

    def loader(self, epoch: int, position: int) -> Any:
        """An iterator over this rank's share of the global batches of `epoch`, from batch `position` on."""
        if hasattr(self.data.dataset, "set_epoch"):
            self.data.dataset.set_epoch(epoch)
        opts, tensors = self.opts, isinstance(self.data.dataset, TensorDataset)
        batches = GlobalBatches(self.n, opts.global_batch_size, self.info.rank, self.info.world_size,
                                opts.global_seed, epoch, position)
        loader = DataLoader(
            self.data.dataset,
            batch_sampler=batches,
            num_workers=opts.num_workers if not tensors else 0,
            pin_memory=self.info.device.type == "cuda",
            prefetch_factor=4 if opts.num_workers and not tensors else None,
            collate_fn=getattr(self.data.dataset, "collate", None),  # None: torch's default; REPA's stored batch
            worker_init_fn=ignore_stop_signals,  # a SIGTERM to the whole job must reach only this process
            # Each DataLoader iterator draws its workers' base seed from this generator, not from the global RNG:
            # a resumed run starts one more iterator than an uninterrupted one, which would otherwise leave a
            # different global RNG state in its checkpoints (and give its workers other seeds).
            generator=seeded(opts.global_seed, epoch),
        )
        with stop_signals_held():  # workers start here; held until they ignore the stop signals
            return iter(loader)

    def train_epoch(self, stop: _StopFlag) -> int | None:
        """The rest of the current epoch, step by step; the stop signal if one came, else None."""
        epoch, position = divmod(self.step, self.steps_per_epoch)
        for x, y, *stored in self.loader(epoch, position):  # stored: REPA's features from the store, if any
            self.train_one(x, y, epoch, stored[0] if stored else None)
            self.monitor()
            # Every rank votes after every step: a signal that reached some ranks only, or reached them in
            # different steps, stops all of them after this same step (a vote by the signalled ranks alone
            # would be a collective that the others never join).
            voted = dist_utils.max_over_ranks(stop.signal or 0)
            stopping = voted > 0
            if self.step % self.opts.ckpt_every == 0 or self.step == self.total_steps or stopping:
                self.save()
            if stopping:
                return voted
            if self.step >= self.total_steps:
                break
        return None

    def train_one(self, x: torch.Tensor, y: torch.Tensor, epoch: int, stored: torch.Tensor | None = None) -> None:
        """One optimizer step on this rank's rows, the non-finite bookkeeping, and the logging window. `stored`:
        REPA's targets read from a latent store with the batch (float16 N×T×F), else computed here."""
        num_classes, device, opts = self.recipe.model.num_classes, self.info.device, self.opts
        mask = None
        if self.recipe.model.is_text:  # packed captions (features + mask), not labels
            y, mask = unpack(y.to(device, non_blocking=True))
        elif y.numel() and (int(y.max()) >= num_classes or int(y.min()) < 0):
            raise UserError(f"label {int(y.max())} out of range for --num-classes {num_classes}")
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        targets = None
        if stored is not None:
            targets = self.step_fn.methods.stored_targets(stored.to(device, non_blocking=True),
                                                          self.recipe.model.grid_size)
        elif self.step_fn.methods is not None:  # REPA's encoder sees the images, before any VAE
            with Precision(self.precision, device.type).autocast():
                targets = self.step_fn.methods.targets(x, self.recipe.model.grid_size)
        if self.data.encoder is not None:
            with torch.no_grad():
                x = self.data.encoder(x)
        log_now = (self.step + 1) % opts.log_every == 0
        out = self.step_fn(x, y, self.step, want_grad_norm=log_now, skip_nonfinite=opts.skip_nonfinite, mask=mask,
                           targets=targets)
        if not out.stepped:
            self.skipped += 1
            if self.info.is_main:
                self.writer.line(f"step {self.step + 1}: non-finite loss or gradient, step skipped "
                                 f"({self.skipped} so far)")
        else:
            self.first_bad = torch.where((self.first_bad < 0) & ~out.finite, self.step + 1, self.first_bad)
        self.step += 1
        if self.check_each_step:
            self.raise_if_nonfinite()
        self.sums += out.terms
        self.window += 1
        if self.bar is not None:
            self.bar.update(1)
        if log_now:
            self.log(out.grad_norm, epoch)

    def log(self, grad_norm: torch.Tensor | None, epoch: int) -> None:
        """Means over the logging window (all ranks), into metrics.jsonl / TensorBoard and the progress bar."""
        self.raise_if_nonfinite()
        avg = dist_utils.all_reduce_mean(self.sums / self.window).tolist()
        elapsed = time.perf_counter() - self.t_window
        record = {
            "step": self.step,
            "loss": avg[0],
            "mse": avg[1],
            "vb": avg[2],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "lr": self.opt.param_groups[0]["lr"],
            "images_per_sec": self.window * self.opts.global_batch_size / max(elapsed, 1e-9),
            "epoch": epoch,
        }
        if self.info.device.type == "cuda":
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.info.device) / 2**30
        self.losses.append((self.step, avg[0]))
        self.good.logged(self.step, avg[0])
        if self.info.is_main:
            self.writer.metrics(record)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{avg[0]:.4f}", img_s=f"{record['images_per_sec']:.0f}")
        self.sums.zero_()
        self.window = 0
        self.t_window = time.perf_counter()

    def monitor(self) -> None:
        """EMA sample grids (--sample-every) and digits scores (--eval-every), on rank 0."""
        opts, step, text = self.opts, self.step, self.recipe.model.is_text
        # Class-label grids and the digits yardstick; text models are sampled from prompts (ditkit sample).
        grid_now = bool(opts.sample_every) and step % opts.sample_every == 0 and not text
        eval_now = bool(opts.eval_every) and step % opts.eval_every == 0 and not text
        if not (grid_now or eval_now):
            return
        full_ema = self.unsharded(self.ema) if self.fsdp else self.ema  # collective under FSDP
        device, precision = self.info.device, self.precision
        if grid_now and self.info.is_main:
            _sample_grid(full_ema, self.recipe, self.results / "samples" / f"{step:07d}", device, precision)
        if eval_now and self.info.is_main:
            self.writer.metrics({"step": step, **_evaluate(full_ema, self.recipe, opts, device, precision)})

    def unsharded(self, module: torch.nn.Module) -> torch.nn.Module:
        """A plain DiT with the full weights of a sharded one, on rank 0 (every rank must call; others get
        `module` back). For sample grids and evaluation, which run on rank 0 alone."""
        weights = gather_model_state(module)
        if not self.info.is_main:
            return module
        plain = build_model(self.recipe.model)
        if self.step_fn.methods is not None:
            self.step_fn.methods.attach(plain)  # REPA's projector is in the weights
        plain.load_state_dict(weights)
        return plain.to(self.info.device)

    def raise_if_nonfinite(self) -> None:
        """After a NaN/Inf loss or gradient: stop, naming the last good checkpoint (train/health.py's rule)."""
        bad = int(self.first_bad)
        if bad >= 0:
            raise nonfinite_advice(bad, self.good.last_good, self.opt.param_groups[0]["lr"], self.results)

    def save(self) -> Path | None:
        """Checkpoint the current step: gathered to full state dicts (collectives under FSDP: every rank takes
        part), written by rank 0 with the run's recipe."""
        self.raise_if_nonfinite()
        at_step = self.saved_step = self.step
        weights, ema_weights = gather_model_state(self.model), gather_model_state(self.ema)
        optimizer = gather_optimizer_state(self.model, self.opt)
        if self.info.is_main:
            state = {
                "step": at_step,
                "epoch": at_step // self.steps_per_epoch,
                "position": at_step % self.steps_per_epoch,
                "optimizer": optimizer,
                "optimizer_format": OPTIMIZER_FORMAT,
                "torch_rng": torch.get_rng_state(),
                "global_seed": self.opts.global_seed,
                "world_size": self.info.world_size,
                "strategy": "fsdp" if self.fsdp else "ddp",
            }
            ckpt_dir = self.results / "checkpoints"
            self.last_ckpt = save_training_checkpoint(ckpt_dir, at_step, weights, ema_weights, state,
                                                      json.dumps(self.recipe.model.to_dict()), self.recipe.to_json())
            self.good.saved(at_step, self.last_ckpt, all_finite(weights, ema_weights, optimizer))
            prune_checkpoints(ckpt_dir, self.opts.keep_last, keep=self.good.protected())
            self.writer.line(f"step {at_step}: checkpoint {self.last_ckpt}")
        dist_utils.barrier()
        return self.last_ckpt

    def finish(self, stopped_by: int | None) -> TrainResult:
        """The last checkpoint (if the current step has none), closing lines, and the result."""
        if self.saved_step != self.step:
            self.save()
        if self.info.is_main:
            skipped_images = getattr(self.data.dataset, "num_skipped", None)
            if skipped_images:
                self.writer.line(f"{int(skipped_images)} unreadable image(s) were skipped (named above)")
            if stopped_by is not None:
                self.writer.line(f"stopped by signal {signal.Signals(stopped_by).name} at step {self.step}; "
                                 f"resume with --resume auto --results-dir {self.results}")
            self.writer.close()
        ema, model = self.ema, self.model
        if self.fsdp:  # gathered full copies (rank 0; the other ranks keep their shards)
            ema, model = self.unsharded(ema), self.unsharded(model)
        return TrainResult(self.step, self.results, self.losses, self.last_ckpt, ema.eval(), model.eval(),
                           stopped_by_signal=stopped_by is not None, recipe=self.recipe)


def build_recipe(opts: TrainOptions, config: DiTConfig, data: TrainingData) -> Recipe:
    """The run's recipe, from the flags (model, process) and the data (its latent space and label map)."""
    if config.is_text:
        conditioning = Conditioning(kind="text", text_encoder=(data.captions or {}).get("text_encoder"),
                                    max_tokens=config.max_tokens)
    else:
        classes = data.classes if data.classes and len(data.classes) <= config.num_classes else None
        conditioning = Conditioning(classes=tuple(classes) if classes else None)
    return Recipe(
        model=config,
        process=process_of(opts),
        latents=data.latents,
        conditioning=conditioning,
        sampling=sampling_of(opts),
    )


def check_resumed_recipe(stored_json: str | None, recipe: Recipe, path: Path | None) -> None:
    """A checkpoint made with another process (schedule, objective...) does not continue this run."""
    if stored_json is None:
        return  # written before recipes existed: the results folder's config.json was checked instead
    stored = Recipe.from_json(stored_json, where=str(path))
    if stored.process != recipe.process:
        raise UserError(
            f"{path} was trained with process {stored.to_dict()['process']} but this run asks for "
            f"{recipe.to_dict()['process']}; pass the same flags (e.g. --noise-schedule) or another --results-dir"
        )
    for what, old, new in (("model switches", stored.model.knobs, recipe.model.knobs),
                           ("sampling defaults", stored.sampling, recipe.sampling),
                           ("latent channel means", stored.latents.mean, recipe.latents.mean)):
        if old != new:
            raise UserError(f"{path} was trained with {what} {old} but this run asks for {new}; pass the same flags "
                            "(--norm, --qk-norm, --rope, --mlp, --sample-*, --latent-norm) or another --results-dir")
    if stored.training != recipe.training:  # REPA / TREAD settings (recipe.training)
        raise UserError(f"{path} was trained with {stored.training.to_dict()} but this run asks for "
                        f"{recipe.training.to_dict()}; pass the same --repa-* / --tread-* flags or another "
                        "--results-dir")


def _ema_sampler(ema: DiT, recipe: Recipe, device: torch.device, precision: str):
    """20 evaluations (see below) with guidance on every output channel: cheap enough to run inside training. The VAE
    that decodes the grid is the recipe's (a latent store's own, or --vae for an image folder)."""
    from ditkit.sample import SamplingPipeline

    vae = None
    if not recipe.latents.is_pixels:
        from ditkit.encoders.autoencoder import load_vae

        vae = load_vae(recipe.latents.vae, device=device)
    # About 20 model evaluations: the objective's preview sampler (DPM-Solver++ 20 steps, Heun 10 steps, MeanFlow
    # 2 steps); an objective that trains its guidance in (MeanFlow) is sampled unguided.
    entry = entry_for(recipe.process.kind)
    sampler, steps = entry.preview
    guided = recipe.model.num_classes > 1 and not entry.folds_guidance
    return SamplingPipeline(model=ema, vae=vae, sampler=sampler, num_steps=steps, cfg_scale=4.0 if guided else 1.0,
                            guide_channels="all", device=device,
                            precision=Precision(precision).without_fp8().name,  # the EMA copy has no FP8 linears
                            recipe=recipe, time_shift=recipe.sampling.time_shift,
                            interval=recipe.sampling.guidance_interval)


def _sample_grid(ema: DiT, recipe: Recipe, folder: Path, device: torch.device, precision: str) -> None:
    """A guided EMA sample grid: one row per class (at most 10), 8 columns, into RESULTS/samples/STEP/."""
    from ditkit.sample import sample_grid

    sampler = _ema_sampler(ema, recipe, device, precision)
    sample_grid(sampler, list(range(min(recipe.model.num_classes, 10))), 8, seed=0, out=folder, save_images=False)


def _evaluate(ema: DiT, recipe: Recipe, opts: TrainOptions, device: torch.device, precision: str) -> dict:
    """The digits yardstick on `eval_samples` class-balanced EMA samples."""
    from ditkit.metrics.digits_classifier import score_sampler

    scores = score_sampler(_ema_sampler(ema, recipe, device, precision), opts.eval_samples, seed=0)
    return {f"eval_{k}": v for k, v in scores.items()}
