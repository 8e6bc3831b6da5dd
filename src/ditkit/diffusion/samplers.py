"""Samplers: small functions from x_T noise and a denoiser to samples.

Each takes a (usually respaced) `GaussianDiffusion`, which turns the raw model output (ε, x₀ or v, with or
without learned variance channels, at the original timestep indices) into x̂₀ and p(x_{t-1} | x_t), and a
`model(x, t, **model_kwargs)`, e.g. a DiT or a guided one from `ditkit.models.guidance`.

- `ddpm`: ancestral sampling, the learned σ used as the step noise (DiT's default: 250 respaced steps).
- `ddim`: Song et al.'s DDIM; eta = 0 deterministic (the probability-flow ODE, first order).
- `dpm_solver`: DPM-Solver++(2M) (Lu et al. 2022), multistep second order in log-SNR on the data prediction,
  first order on the first and the last steps; good samples in 10–25 steps. Its steps are evenly spaced in t
  by default (as the respacing of the other samplers); `logsnr_timesteps` spaces them evenly in log-SNR,
  which is more accurate for few steps on pixel-space data.

All use one model evaluation per step: `num_steps` evaluations per sample (two images' worth when guided).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ditkit.runtime.errors import UserError

if TYPE_CHECKING:
    from ditkit.diffusion.gaussian import GaussianDiffusion

Model = Callable[..., torch.Tensor]


def _indices(num_steps: int, progress: bool, desc: str) -> Iterable[int]:
    """Step indices num_steps−1 … 0, with a tqdm bar when asked."""
    steps: Iterable[int] = range(num_steps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=desc, unit="step", leave=False)
    return steps


def _batch_t(i: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)


def _run(diffusion: GaussianDiffusion, noise: torch.Tensor, progress: bool, desc: str,
         step: Callable[[torch.Tensor, torch.Tensor], dict]) -> torch.Tensor:
    """x_T = noise through `step(x, t)["sample"]` for t = N−1 … 0."""
    x = noise
    for i in _indices(diffusion.num_timesteps, progress, desc):
        x = step(x, _batch_t(i, x))["sample"]
    return x


@torch.no_grad()
def ddpm(
    diffusion: GaussianDiffusion,
    model: Model,
    noise: torch.Tensor,
    *,
    model_kwargs: dict | None = None,
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
    eta: float = 0.0,
) -> torch.Tensor:
    """Ancestral sampling over every step of `diffusion` (respace it for fewer): x_{t-1} ~ p(x_{t-1} | x_t).

    `eta` is DDIM's and is not used (the step noise is the model's σ), as in the authors' sampler."""
    return _run(diffusion, noise, progress, "ddpm", lambda x, t: diffusion.p_sample(
        model, x, t, clip_denoised, model_kwargs=model_kwargs, generator=generator))


@torch.no_grad()
def ddim(
    diffusion: GaussianDiffusion,
    model: Model,
    noise: torch.Tensor,
    *,
    eta: float = 0.0,
    model_kwargs: dict | None = None,
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM over every step of `diffusion`; eta ∈ [0, 1] scales the fresh noise (0: deterministic)."""
    return _run(diffusion, noise, progress, "ddim", lambda x, t: diffusion.ddim_sample(
        model, x, t, clip_denoised, model_kwargs=model_kwargs, eta=eta, generator=generator))


@torch.no_grad()
def ddim_invert(
    diffusion: GaussianDiffusion,
    model: Model,
    x_start: torch.Tensor,
    *,
    model_kwargs: dict | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """The noise x_{N−1} that deterministic `ddim` maps back to `x_start` (DDIM inversion), N model calls.

    Step k undoes DDIM's step k (ᾱ_k → ᾱ_{k−1}, ᾱ_{−1} = 1) using ε̂ evaluated at the current, less noisy
    state and timestep k: exact when ε̂ does not change along the path, first-order accurate otherwise.
    """
    x = x_start
    steps: Iterable[int] = range(diffusion.num_timesteps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="ddim-invert", unit="step", leave=False)
    for i in steps:
        t = _batch_t(i, x)
        pred = diffusion.p_mean_variance(model, x, t, clip_denoised=False, model_kwargs=model_kwargs)
        eps = diffusion.predict_eps_from_xstart(x, t, pred["pred_xstart"])
        ab_from = float(diffusion.alphas_cumprod_prev[i])
        ab_to = float(diffusion.alphas_cumprod[i])
        x0 = (x - math.sqrt(1.0 - ab_from) * eps) / math.sqrt(ab_from)
        x = math.sqrt(ab_to) * x0 + math.sqrt(1.0 - ab_to) * eps
    return x


def _log_snr_terms(diffusion: GaussianDiffusion, i: int) -> tuple[float, float, float]:
    """(α_i, σ_i, λ_i = log α_i/σ_i) at step i, in float64."""
    alpha_bar = float(diffusion.alphas_cumprod[i])
    alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    return alpha, sigma, math.log(alpha) - math.log(sigma)


@torch.no_grad()
def dpm_solver(
    diffusion: GaussianDiffusion,
    model: Model,
    noise: torch.Tensor,
    *,
    model_kwargs: dict | None = None,
    clip_denoised: bool = False,
    progress: bool = False,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    lower_order_final: bool = True,
) -> torch.Tensor:
    """DPM-Solver++(2M) over the steps of `diffusion`, from step N−1 to clean data; N model evaluations.

    With data predictions D_i = x̂₀(x_i, t_i), h = λ_{i-1} − λ_i and r = h_prev / h, one step is
    x_{i-1} = (σ_{i-1}/σ_i)·x_i − α_{i-1}·(e^{−h} − 1)·D, where D = (1 + 1/2r)·D_i − (1/2r)·D_{i+1}
    (second order), or D = D_i on the first step and the step into t_0. The final step goes to σ = 0, where
    the update is x̂₀ itself.
    The learned variance, if any, is not used: the solver follows the probability-flow ODE.
    `lower_order_final=False` makes the step into t_0 second order too (as diffusers' scheduler does).
    `generator` and `eta` are not used (the solver is deterministic); they keep the samplers' one signature.
    """
    x = noise
    prev_denoised: torch.Tensor | None = None
    prev_h: float | None = None
    for i in _indices(diffusion.num_timesteps, progress, "dpm-solver++"):
        denoised = diffusion.p_mean_variance(
            model, x, _batch_t(i, x), clip_denoised=clip_denoised, model_kwargs=model_kwargs
        )["pred_xstart"]
        if i == 0:
            return denoised  # σ_next = 0, α_next = 1: the (first-order) final step lands on x̂₀
        alpha_i, sigma_i, lam_i = _log_snr_terms(diffusion, i)
        alpha_n, sigma_n, lam_n = _log_snr_terms(diffusion, i - 1)
        h = lam_n - lam_i
        if prev_denoised is None or (i == 1 and lower_order_final):
            # First order on the first step (no history) and on the step into t_0: there the log-SNR step is
            # much longer than the previous one (r ≪ 1) and the 2M extrapolation overshoots (diffusers'
            # "lower_order_final" for the same reason).
            d = denoised
        else:
            r = prev_h / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * prev_denoised
        x = (sigma_n / sigma_i) * x - (alpha_n * math.expm1(-h)) * d
        prev_denoised, prev_h = denoised, h
    return x


def logsnr_timesteps(alphas_cumprod: np.ndarray, num_steps: int) -> list[int]:
    """About `num_steps` original timesteps evenly spaced in log-SNR λ = ½·log(ᾱ/(1 − ᾱ)), first and last included.

    Pass them to `SpacedDiffusion(steps, betas=...)`; duplicates after rounding to integers are merged.
    """
    lam = 0.5 * np.log(alphas_cumprod / (1.0 - alphas_cumprod))
    targets = np.linspace(lam[0], lam[-1], num_steps)
    # λ decreases with t, so search on the reversed (increasing) array.
    idx = len(lam) - 1 - np.searchsorted(lam[::-1], targets)
    idx = np.clip(idx, 0, len(lam) - 1)
    return sorted({int(i) for i in idx} | {0, len(lam) - 1})


def steps_for(sampler: str, num_steps: int, diffusion_steps: int = 1000) -> str:
    """The respacing string a sampler uses for `num_steps`: DDIM's integer stride when it exists, else even."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; use one of: {', '.join(SAMPLERS)}")
    if not 2 <= num_steps <= diffusion_steps:
        raise UserError(f"--num-steps must be between 2 and {diffusion_steps}, got {num_steps}")
    if sampler == "ddim" and any(len(range(0, diffusion_steps, k)) == num_steps for k in range(1, diffusion_steps)):
        return f"ddim{num_steps}"
    return str(num_steps)


def sample(
    model: Model,
    noise: torch.Tensor,
    *,
    sampler: str = "ddpm",
    num_steps: int = 250,
    model_kwargs: dict | None = None,
    eta: float = 0.0,
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
    spacing: str = "time",
    **diffusion_kwargs: Any,
) -> torch.Tensor:
    """Sample with a named sampler ("ddpm", "ddim", "dpm-solver") in `num_steps` steps from x_T = `noise`.

    `spacing`: "time" (the reference's respacing, evenly in t) or "logsnr" (evenly in log-SNR).
    `diffusion_kwargs` go to `create_diffusion` (noise_schedule, learn_sigma, prediction, diffusion_steps).
    """
    from ditkit.diffusion import create_diffusion

    respacing = steps_for(sampler, num_steps, diffusion_kwargs.get("diffusion_steps", 1000))
    if spacing == "logsnr":
        from ditkit.diffusion.respace import respace

        full = create_diffusion("", **diffusion_kwargs)
        diffusion = respace(full, logsnr_timesteps(full.alphas_cumprod, num_steps))
    elif spacing == "time":
        diffusion = create_diffusion(respacing, **diffusion_kwargs)
    else:
        raise UserError(f"unknown step spacing {spacing!r}; use 'time' or 'logsnr'")
    return SAMPLERS[sampler].run(diffusion, model, noise, model_kwargs=model_kwargs, clip_denoised=clip_denoised,
                                 generator=generator, progress=progress, eta=eta)


def model_evaluations(
    diffusion: GaussianDiffusion, cfg_scale: float = 1.0, interval: tuple[float, float] | None = None
) -> int:
    """Network evaluations per image for one sampling run over `diffusion`'s steps (ddpm, ddim, dpm-solver
    and inversion all call the model once per step): 2 per guided step (cond + uncond rows), 1 otherwise."""
    guided_steps = 0
    if cfg_scale != 1.0:
        guided_steps = sum(1 for t in iterate_steps(diffusion) if interval is None or interval[0] <= t <= interval[1])
    return diffusion.num_timesteps + guided_steps


def iterate_steps(diffusion: GaussianDiffusion) -> Iterator[int]:
    """The original timestep indices a sampler visits, in sampling order (for logging and step counts)."""
    yield from (int(diffusion.timestep_map[i]) for i in range(diffusion.num_timesteps - 1, -1, -1))


# ----------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class DiffusionSampler:
    """A named sampler: `run(diffusion, model, noise, *, model_kwargs, clip_denoised, generator, progress, eta)`
    over every step of a (respaced) diffusion, and the step count `ditkit sample` uses when none is given."""

    run: Callable[..., torch.Tensor]
    default_steps: int


# name -> sampler; the first is the diffusion objective's default (`--sampler`'s choices and help follow).
SAMPLERS: dict[str, DiffusionSampler] = {
    "ddpm": DiffusionSampler(ddpm, 250),
    "ddim": DiffusionSampler(ddim, 50),
    "dpm-solver": DiffusionSampler(dpm_solver, 20),
}


def register_sampler(name: str, run: Callable[..., torch.Tensor], default_steps: int) -> None:
    """Add a diffusion sampler: `run` takes the one signature above and calls the model once per step."""
    if not name or name in SAMPLERS:
        raise ValueError(f"a diffusion sampler named {name!r} exists already or the name is empty")
    SAMPLERS[name] = DiffusionSampler(run, default_steps)
