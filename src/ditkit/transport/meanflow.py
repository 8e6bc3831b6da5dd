"""MeanFlow (Geng, Deng, Bai, Kolter, He 2025, arXiv 2505.13447): one-step generation trained from scratch.

The network predicts the average velocity u(z_t, r, t) = 1/(t − r)·∫_r^t v(z_s, s) ds on the linear path
z_t = (1 − t)·x + t·ε (t = 0 data, t = 1 noise; v = ε − x). Differentiating (t − r)·u = ∫_r^t v in t gives the
MeanFlow identity u = v − (t − r)·du/dt with du/dt = ∂_z u·v + ∂_t u, the Jacobian-vector product of the
network along (v, 0, 1) in its inputs (z, r, t). The loss regresses u on that target with a stop-gradient:

    Δ = u_θ(z_t, r, t) − sg(ṽ − (t − r)·J_uθ·(ṽ, 0, 1)),   loss = sg(w)·‖Δ‖²,   w = 1/(‖Δ‖² + c)^p

Guidance is folded into the target (the paper's eq. 19–21): for labelled rows with t in the guidance interval
ṽ = ω·v + κ·u_θ(z_t, t, t | c) + (1 − ω − κ)·u_θ(z_t, t, t | ∅) (no gradient), else ṽ = v; the class dropout is
the model's (dropped rows learn the unconditional field, target v). Sampling: z_r = z_t − (t − r)·u(z_t, r, t)
over k equal steps from t = 1; one step is x = ε − u(ε, 0, 1).

The recipe's `MeanFlowProcess` holds the settings; `ditkit train --objective meanflow --meanflow KEY=VALUE,...`
sets them (`process_from_flag`); the model gets a second timestep embedder of t − r (`DiTConfig.interval_time`).
The JVP runs without gradient and on the rows with r ≠ t only, through `models.dual` (a hand-written
dual-number forward of the adaLN DiT, its blocks compiled on a GPU) where that covers the model, else through
`models.forward_mode` (`torch.func.jvp`: plain attention, fused kernels off); the loss's own forward is a
separate ordinary pass (fast kernels, autograd), so the JVP costs no activation memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from ditkit.models import dual, forward_mode
from ditkit.objective import Objective
from ditkit.recipe import MeanFlowProcess, Recipe
from ditkit.runtime.errors import UserError

MEANFLOW_SAMPLERS: dict[str, int] = {"meanflow": 1}  # sampler name -> default --num-steps
FLAG_KEYS = {f.name for f in dataclasses.fields(MeanFlowProcess)}


# ----------------------------------------------------------------------------------------------- settings


def process_from_flag(value: str | None) -> MeanFlowProcess:
    """`--meanflow "omega=0.2,kappa=0.92,guidance_high=0.75"` → the process (paper defaults for the rest)."""
    settings: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in (value or "").split(","))):
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in FLAG_KEYS:
            raise UserError(f"--meanflow takes KEY=VALUE pairs with KEY one of {', '.join(sorted(FLAG_KEYS))}; "
                            f"got {item!r}")
        try:
            settings[key] = float(text)
        except ValueError:
            raise UserError(f"--meanflow {key}={text!r} is not a number") from None
    process = MeanFlowProcess(**settings)
    process.validate()
    return process


def process_from_options(opts: Any, other_flags: tuple[str, ...]) -> MeanFlowProcess:
    """The process of `ditkit train --objective meanflow` (train.options.TrainOptions): one line for a flag of
    another objective, or --meanflow without --objective meanflow."""
    if opts.objective != "meanflow":
        raise UserError("--meanflow sets a MeanFlow recipe; add --objective meanflow")
    given = [name for name in other_flags if getattr(opts, name) is not None]
    if given:
        raise UserError(f"--{given[0].replace('_', '-')} is a flow-matching setting; MeanFlow takes --meanflow")
    if opts.prediction not in (None, "velocity"):
        raise UserError(f"--prediction {opts.prediction!r}: a MeanFlow model predicts the average velocity; drop it")
    if opts.noise_schedule != "linear":
        raise UserError("--noise-schedule is a diffusion setting; MeanFlow uses the linear path; drop it")
    if opts.precision == "fp8":  # the FP8 linears are autograd Functions without a forward-mode rule
        raise UserError("--precision fp8 has no forward-mode (JVP) rule for MeanFlow's target; use bf16")
    return process_from_flag(opts.meanflow)


def check_model(recipe: Recipe) -> None:
    """A MeanFlow recipe needs the model's interval input (one line otherwise)."""
    if not recipe.model.interval_time:
        raise UserError("a MeanFlow model needs the interval embedder (model config interval_time true); "
                        "train it with ditkit train --objective meanflow")


# ----------------------------------------------------------------------------------------------- training


def _col(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row values N as N×1×…×1, to broadcast over `like`'s item dimensions."""
    return t.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def sample_times(uniforms: torch.Tensor, process: MeanFlowProcess) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, t) from N×3 uniforms in [0, 1): two logit-normal(μ, σ) times by the inverse CDF, sorted so r <= t,
    and r = t on the rows whose third uniform is at least `ratio_r_neq_t` (the paper's sampler)."""
    normal = math.sqrt(2.0) * torch.erfinv(2.0 * uniforms[:, :2] - 1.0)
    times = torch.sigmoid(process.time_mu + process.time_sigma * normal)
    t = times.max(dim=1).values
    r = torch.where(uniforms[:, 2] < process.ratio_r_neq_t, times.min(dim=1).values, t)
    return r, t


def _fields(model: Callable[..., torch.Tensor], z: torch.Tensor, t: torch.Tensor, kwargs: dict[str, Any],
            conditional: bool) -> torch.Tensor:
    """u(z_t, t, t | c) or u(z_t, t, t | ∅) without gradient (the label dropped through force_drop_ids)."""
    drop = torch.full((z.shape[0],), 0 if conditional else 1, dtype=torch.long, device=z.device)
    with torch.no_grad():
        return model(z, t, r=t, **{**kwargs, "force_drop_ids": drop})[:, : z.shape[1]].to(z.dtype)


def _guided_velocity(model: Callable[..., torch.Tensor], z: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                     kwargs: dict[str, Any], process: MeanFlowProcess) -> torch.Tensor:
    """ṽ: the conditional velocity with guidance folded in (see the module doc); v where guidance is off."""
    if process.omega == 1.0 and process.kappa == 0.0:
        return v
    guided = process.omega * v + (1.0 - process.omega - process.kappa) * _fields(model, z, t, kwargs, False)
    if process.kappa != 0.0:  # the conditional field too (κ 0, the paper's first form: one unconditional pass)
        guided = guided + process.kappa * _fields(model, z, t, kwargs, True)
    dropped = kwargs.get("force_drop_ids")
    on = (t >= process.guidance_low) & (t <= process.guidance_high)
    if dropped is not None:
        on = on & (dropped != 1)
    return torch.where(_col(on, v).bool(), guided.to(v.dtype), v)


def meanflow_target(model: Callable[..., torch.Tensor], z: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                    v: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """v − (t − r)·du/dt with du/dt = J_u·(v, 0, 1) in (z, r, t) (no gradient).

    The JVP runs on the rows with r ≠ t only (the sampler's `ratio_r_neq_t`, 25 % by default): elsewhere
    (t − r)·du/dt is 0 and the target is v. The network treats rows independently, so this is the same target.
    It is the dual-number forward (`models.dual`, blocks compiled on a GPU) where that covers the network
    behind `model`, else `torch.func.jvp` on the forward-differentiable path."""
    channels, n = z.shape[1], z.shape[0]
    rows = (t != r).nonzero().squeeze(1)
    if rows.numel() == 0:
        return v
    sub = {k: a[rows] if torch.is_tensor(a) and a.shape[:1] == (n,) else a for k, a in kwargs.items()}
    z_in, r_in, t_in, v_in = z[rows], r[rows], t[rows], v[rows]
    network = dual.network_of(model)
    with torch.no_grad():
        if network is not None and dual.covers(network, sub):
            _, dudt = dual.forward(network, z_in, v_in, t_in, torch.ones_like(t_in), **sub, r=r_in,
                                   compiled=z.is_cuda)
            dudt = dudt[:, :channels]
        else:
            def u(z_: torch.Tensor, r_: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
                return model(z_, t_, r=r_, **sub)[:, :channels]

            tangents = (v_in, torch.zeros_like(r_in), torch.ones_like(t_in))
            _, dudt = forward_mode.jvp(model, u, (z_in, r_in, t_in), tangents)
    target = v.clone()
    target[rows] = v_in - _col(t_in - r_in, dudt) * dudt.to(v.dtype)
    return target


def adaptive_loss(delta: torch.Tensor, process: MeanFlowProcess) -> dict[str, torch.Tensor]:
    """{"loss": sg(w)·‖Δ‖² with w = 1/(‖Δ‖² + c)^p, "mse": mean Δ²} per row (‖·‖² summed over the item)."""
    squares = delta.pow(2).flatten(1)
    total = squares.sum(dim=1)
    weight = (total.detach() + process.adaptive_eps).pow(-process.adaptive_p)
    return {"loss": weight * total, "mse": squares.mean(dim=1).detach()}


class MeanFlowTraining:
    """The training-loss adapter for `ditkit.train.step`: continuous time, three uniforms per row."""

    num_timesteps = None
    time_draws = 3  # uniforms per row: two times, and whether r ≠ t

    def __init__(self, process: MeanFlowProcess):
        self.process = process

    def training_losses(
        self, model: Callable[..., torch.Tensor], x_start: torch.Tensor, t: torch.Tensor,
        model_kwargs: dict | None = None, noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """{"loss", "mse"} per row for data x_start, uniforms t (N×3) and noise ε."""
        if t.ndim != 2 or t.shape[1] != self.time_draws:
            raise ValueError(f"MeanFlow takes N×{self.time_draws} uniforms per step, got shape {tuple(t.shape)}")
        kwargs = dict(model_kwargs or {})
        noise = torch.randn_like(x_start) if noise is None else noise
        r, t = sample_times(t.to(x_start.dtype), self.process)
        z = (1.0 - _col(t, x_start)) * x_start + _col(t, x_start) * noise
        v = _guided_velocity(model, z, t, noise - x_start, kwargs, self.process)
        target = meanflow_target(model, z, r, t, v, kwargs)
        u = model(z, t, r=r, **kwargs)[:, : x_start.shape[1]]
        return adaptive_loss(u.to(target.dtype) - target, self.process)


# ----------------------------------------------------------------------------------------------- sampling


def check_steps(sampler: str, num_steps: int) -> None:
    if sampler not in MEANFLOW_SAMPLERS:
        raise UserError(f"sampler {sampler!r} does not apply to a meanflow model; use one of: "
                        f"{', '.join(MEANFLOW_SAMPLERS)}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise UserError(f"--num-steps must be at least 1 for sampler meanflow, got {num_steps}")


def sample(
    model: Callable[..., torch.Tensor], noise: torch.Tensor, *, sampler: str = "meanflow",
    num_steps: int | None = None, model_kwargs: dict | None = None, eta: float = 0.0, clip_denoised: bool = False,
    generator: torch.Generator | None = None, progress: bool = False,
) -> torch.Tensor:
    """x from ε in `num_steps` equal steps t = 1 → 0: z_r = z_t − (t − r)·u(z_t, r, t). Deterministic
    (generator unused); clip_denoised does not apply (no x̂₀ along the way); eta must be 0."""
    if eta:
        raise UserError(f"--eta is a DDIM setting and does not apply to a meanflow model (got {eta}); drop it")
    num_steps = MEANFLOW_SAMPLERS[sampler] if num_steps is None else num_steps
    check_steps(sampler, num_steps)
    grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()
    z, n, channels = noise, noise.shape[0], noise.shape[1]
    steps = range(num_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="meanflow", unit="step", leave=False)
    for i in steps:
        t = torch.full((n,), grid[i], device=noise.device, dtype=noise.dtype)
        r = torch.full((n,), grid[i + 1], device=noise.device, dtype=noise.dtype)
        u = model(z, t, r=r, **(model_kwargs or {}))[:, :channels]
        z = z - (grid[i] - grid[i + 1]) * u.to(z.dtype)
    return z


def evaluations(sampler: str, num_steps: int, cfg_scale: float = 1.0,
                interval: tuple[float, float] | None = None) -> int:
    """Network evaluations per image: one per step (two with sampling-time guidance on top)."""
    check_steps(sampler, num_steps)
    return num_steps * (2 if cfg_scale != 1.0 else 1)


def build(recipe: Recipe) -> Objective:
    """The MeanFlow objective of `recipe` (its model must have the interval input)."""
    check_model(recipe)
    return Objective(kind="meanflow", training=MeanFlowTraining(recipe.process), sample=sample,
                     default_steps=MEANFLOW_SAMPLERS, evaluations=evaluations)
