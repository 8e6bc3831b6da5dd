"""One optimizer step of `ditkit train`: the (seed, step) draws, micro-batched loss and backward, AdamW, EMA.

Shared by the training loop and the benchmarks (`benchmarks/bench_speed.py`, `benchmarks/bench_ddp.py`), so
what is measured is what trains.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from ditkit.models.precision import Precision
from ditkit.runtime.errors import UserError
from ditkit.runtime.seeding import generator


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    return generator(seed, step + 1, device)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model over the trained parameters, in one fused foreach call."""
    # FSDP2: both modules are sharded alike, so each rank lerps its own local shards (no communication).
    ema_params = [_local(p) for p in ema.parameters() if p.requires_grad]
    params = [_local(p.detach()) for p in model.parameters() if p.requires_grad]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


class Float32Output(torch.nn.Module):
    """The network with its output in float32. An nn.Module (not a closure), so that a loss that switches the
    network's layers, MeanFlow's forward-mode pass (`forward_mode.plain`), finds them through it."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.network(*args, **kwargs).float()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 parameter); a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The precision's autocast context (kept for the benchmarks that time the step)."""
    return Precision(precision, device.type).autocast()


autocast_for = _autocast  # the same autocast for what runs beside the step (REPA's encoder)


def draw_step_randomness(
    seed: int, step: int, global_batch: int, item_shape: tuple[int, ...], num_timesteps: int | None,
    class_dropout_prob: float, device: torch.device, time_draws: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Timesteps, noise and label-dropout mask for the whole *global* batch of optimizer step `step`.

    Timesteps are integers 0…num_timesteps−1 (diffusion), or with `num_timesteps` None uniform floats in
    [0, 1) that a continuous-time objective maps to its own time (`time_draws` > 1: that many per row, N×k,
    e.g. MeanFlow's two times and its r ≠ t draw). Every rank and every micro-batch draws all
    of it and keeps its own rows, so the draws depend on (seed, step) only: not on the world size, the rank or
    the number of accumulation steps.
    """
    gen = _step_generator(seed, step, device)
    if num_timesteps is None:
        shape = (global_batch,) if time_draws == 1 else (global_batch, time_draws)
        t = torch.rand(shape, generator=gen, device=device)
    else:
        t = torch.randint(0, num_timesteps, (global_batch,), generator=gen, device=device)
    noise = torch.randn((global_batch, *item_shape), generator=gen, device=device)
    drop = (torch.rand(global_batch, generator=gen, device=device) < class_dropout_prob).long()
    return t, noise, drop


@dataclass
class StepOutput:
    """What one optimizer step reports: mean loss/mse/vb over this rank's rows, the gradient norm (when asked),
    whether loss and gradient were finite (a 0-dim bool tensor, not synced to the host) and whether AdamW ran."""

    terms: torch.Tensor  # (3,): loss, mse, vb
    grad_norm: torch.Tensor | None
    finite: torch.Tensor
    stepped: bool


class TrainStep:
    """One optimizer step of train.py: draws, micro-batched forward/backward, clipping, AdamW, EMA.

    `model` is the module whose parameters AdamW updates (plain, or FSDP-sharded in place); `forward` is what
    runs the batch (the DDP wrapper, or `model` itself); `loss` is the objective's training loss (an
    `Objective.training`: `num_timesteps` and `training_losses`, whatever the objective). Rank `rank` of `world`
    holds rows [rank·local, (rank+1)·local) of the global batch; with `accum` micro-steps its micro-batch k is rows
    [rank·local + k·micro, ... + micro). Each micro loss is scaled by 1/accum, so after the gradient average over
    ranks (DDP / FSDP reduce-scatter) the accumulated gradient is the mean over the whole global batch; gradient
    sync runs on the last micro-step only.
    """

    def __init__(
        self, model: torch.nn.Module, forward: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer,
        loss: Any, *, device: torch.device, precision: str, global_batch: int, rank: int = 0, world: int = 1,
        accum: int = 1, seed: int = 0, ema_decay: float = 0.9999, grad_clip: float = 0.0,
        class_dropout_prob: float = 0.1, methods: Any = None,
    ):
        if global_batch % (world * accum):
            raise UserError(
                f"--global-batch-size {global_batch} is not divisible by world size × --grad-accum-steps "
                f"({world} × {accum}); use a multiple of {world * accum}"
            )
        self.model, self.forward, self.ema, self.opt, self.loss = model, forward, ema, opt, loss
        self.fp32_output = Float32Output(forward)  # the loss is computed in fp32 even when the network runs in bf16
        self.device, self.precision = device, precision
        self.attention_chosen = False
        self.global_batch, self.rank, self.world, self.accum = global_batch, rank, world, accum
        self.local = global_batch // world
        self.micro = self.local // accum
        self.seed, self.ema_decay, self.grad_clip = seed, ema_decay, grad_clip
        self.class_dropout_prob = class_dropout_prob
        self.methods = methods if methods is not None and methods.active else None  # REPA / TREAD (train/methods)
        if self.methods is not None:
            self.methods.use(model)

    def _sync_context(self, last: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce / reduce-scatter on all but the last micro-step (it is what costs)."""
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if not last and hasattr(self.forward, "no_sync"):  # DDP
            return self.forward.no_sync()
        return contextlib.nullcontext()

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, step: int, *, want_grad_norm: bool = False,
        skip_nonfinite: bool = False, mask: torch.Tensor | None = None, targets: torch.Tensor | None = None,
    ) -> StepOutput:
        """Train on this rank's rows `x`, `y` (local batch) of the global batch of step `step` (0-based).

        Text models: y holds caption features (N×L×C) and `mask` their token mask (N×L). REPA: `targets` holds
        the frozen encoder's patch features of these rows (N×T×F); the loss reported includes its term.
        """
        if x.shape[0] != self.local:
            raise ValueError(f"expected this rank's {self.local} rows, got {x.shape[0]}")
        if not self.attention_chosen:  # measured once, here and not inside the model's forward
            self.attention_chosen = True
            choose = getattr(self.model, "choose_attention", None)
            if choose is not None:
                dtype = Precision(self.precision, self.device.type).compute_dtype
                choose(self.micro, dtype, self.device, training=True)
        t_all, noise_all, drop_all = draw_step_randomness(
            self.seed, step, self.global_batch, tuple(x.shape[1:]), self.loss.num_timesteps,
            self.class_dropout_prob, self.device, getattr(self.loss, "time_draws", 1),
        )

        self.opt.zero_grad(set_to_none=True)
        sums = torch.zeros(3, device=self.device)
        losses = []
        for k in range(self.accum):
            mine = slice(k * self.micro, (k + 1) * self.micro)
            rows = slice(self.rank * self.local + k * self.micro, self.rank * self.local + (k + 1) * self.micro)
            if self.methods is not None:
                self.methods.before_forward(self.seed, step, self.global_batch, rows,
                                            self.model.config.num_patches, self.device)
            with self._sync_context(k == self.accum - 1), _autocast(self.device, self.precision):
                terms = self.loss.training_losses(
                    self.fp32_output, x[mine], t_all[rows],
                    model_kwargs={"y": y[mine], "force_drop_ids": drop_all[rows],
                                  **({} if mask is None else {"mask": mask[mine]})},
                    noise=noise_all[rows],
                )
                loss = terms["loss"].mean()
                align = self.methods.alignment_loss(targets[mine] if targets is not None else None) \
                    if self.methods is not None else None
                if align is not None:
                    loss = loss + align
                # 1/accum: the sum over micro-steps is the mean over this rank's rows (1.0 exactly when accum=1)
                (loss / self.accum if self.accum > 1 else loss).backward()
            losses.append(loss.detach())
            vb = terms.get("vb", torch.zeros_like(terms["mse"]))
            sums += torch.stack([loss.detach(), terms["mse"].mean().detach(), vb.mean().detach()])
        grad_norm = None
        if self.grad_clip > 0 or want_grad_norm or skip_nonfinite:
            max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
                grad_norm = grad_norm.full_tensor()
        finite = torch.isfinite(torch.stack(losses)).all()
        if grad_norm is not None:
            finite = finite & torch.isfinite(grad_norm)
        stepped = not (skip_nonfinite and not bool(finite))
        if stepped:
            self.opt.step()
            update_ema(self.ema, self.model, self.ema_decay)
        return StepOutput(sums / self.accum, grad_norm, finite, stepped)
