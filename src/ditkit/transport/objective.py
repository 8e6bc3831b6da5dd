"""Flow matching for ditkit's training loop and `ditkit sample`: the pieces `ditkit.objectives` registers as "flow".

- `FlowTraining(transport)`: `training_losses(model, x_start, t, model_kwargs, noise)` with `num_timesteps`
  None, so the training step draws t as uniform floats in [0, 1) from its (seed, step) generator and this maps
  them to the transport's time distribution (uniform, or SD3's logit-normal by the inverse CDF);
- `sample(model, noise, transport=..., sampler=..., num_steps=...)`: one call for the CLI's flow samplers;
- `evaluations(sampler, num_steps, cfg_scale, interval)`: network evaluations per image.

The samplers by the names `ditkit sample --sampler` takes, and what `--num-steps N` means for each:
"euler" and "heun" take N fixed ODE steps (N and 2N evaluations); "dopri5" is adaptive (atol 1e-6, rtol 1e-3
as SiT; N is not used, the evaluations are counted as it runs); "sde-euler" / "sde-heun" are SiT's SDE samplers
with diffusion form "sigma" and last step "Mean" (the settings of SiT's sample.py) and SiT's num_steps = N:
N − 1 SDE steps and the last step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ditkit.objective import Objective
from ditkit.recipe import FlowProcess, Recipe
from ditkit.runtime.errors import UserError
from ditkit.transport.sampler import Sampler
from ditkit.transport.transport import Transport

# sampler name -> default --num-steps; the first is the default sampler (SiT's sample.py default: dopri5).
FLOW_SAMPLERS: dict[str, int] = {"dopri5": 50, "euler": 50, "heun": 25, "sde-euler": 250, "sde-heun": 250}
ADAPTIVE = ("dopri5",)


class FlowTraining:
    """The training-loss adapter: `num_timesteps` None marks continuous time for the step's draws."""

    num_timesteps = None

    def __init__(self, transport: Transport):
        self.transport = transport

    def training_losses(
        self, model: Callable[..., torch.Tensor], x_start: torch.Tensor, t: torch.Tensor,
        model_kwargs: dict | None = None, noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """{"loss", "mse"} per sample for data x_start, uniform draws t ∈ [0, 1) and noise (x0)."""
        times = self.transport.times_from_uniform(t.to(x_start.dtype))
        terms = self.transport.training_losses(model, x_start, model_kwargs, t=times, x0=noise)
        return {k: terms[k] for k in ("loss", "mse", "cos") if k in terms}


class _Counted:
    """A model wrapper that counts its calls (each call = one network evaluation of the batch)."""

    def __init__(self, model: Callable[..., torch.Tensor], bar: Any = None):
        self.model, self.bar, self.calls = model, bar, 0

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        if self.bar is not None:
            self.bar.update(1)
        return self.model(*args, **kwargs)


def check_steps(sampler: str, num_steps: int) -> None:
    if sampler not in FLOW_SAMPLERS:
        raise UserError(f"sampler {sampler!r} does not apply to a flow model; use one of: {', '.join(FLOW_SAMPLERS)}")
    least = 2 if sampler.startswith("sde") else 1
    if not isinstance(num_steps, int) or num_steps < least:
        raise UserError(f"--num-steps must be at least {least} for sampler {sampler}, got {num_steps}")


def sample_function(
    transport: Transport, sampler: str, num_steps: int, *, shift: float = 1.0, generator: torch.Generator | None = None,
    atol: float = 1e-6, rtol: float = 1e-3,
) -> Callable[..., Any]:
    """SiT's sampling function (z, model, **model_kwargs) → trajectory for a ditkit sampler name."""
    check_steps(sampler, num_steps)
    s = Sampler(transport)
    if sampler in ("euler", "heun"):
        return s.sample_ode(sampling_method=sampler, num_steps=num_steps + 1, shift=shift)
    if sampler == "dopri5":
        return s.sample_ode(sampling_method="dopri5", num_steps=2, atol=atol, rtol=rtol, shift=shift)
    method = "Euler" if sampler == "sde-euler" else "Heun"
    return s.sample_sde(sampling_method=method, diffusion_form="sigma", last_step="Mean", num_steps=num_steps,
                        shift=shift, generator=generator)


def sample(
    model: Callable[..., torch.Tensor], noise: torch.Tensor, *, transport: Transport, sampler: str = "dopri5",
    num_steps: int | None = None, model_kwargs: dict | None = None, generator: torch.Generator | None = None,
    progress: bool = False, shift: float = 1.0, eta: float = 0.0, clip_denoised: bool = False,
) -> torch.Tensor:
    """Samples (the trajectory's end) from noise z ~ N(0, I) at t = 0 with a named flow sampler.

    `model(x, t, **model_kwargs)` with t ∈ [0, 1]: a DiT, or a guided wrapper (guidance on the velocity).
    eta and clip_denoised are diffusion settings: eta must be 0; clipping is not applied (a velocity model has no
    x̂0 to clip along the way).
    """
    if eta:
        raise UserError(f"--eta is a DDIM setting and does not apply to a flow model (got {eta}); drop it")
    num_steps = FLOW_SAMPLERS.get(sampler, 0) if num_steps is None else num_steps
    fn = sample_function(transport, sampler, num_steps, shift=shift, generator=generator)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=None if sampler in ADAPTIVE else evaluations(sampler, num_steps), desc=f"flow {sampler}",
                   unit="eval", leave=False)
    counted = _Counted(model, bar)
    try:
        out = fn(noise, counted, **(model_kwargs or {}))
    finally:
        if bar is not None:
            bar.close()
    return out[-1]


def evaluations(
    sampler: str, num_steps: int, cfg_scale: float = 1.0, interval: tuple[float, float] | None = None
) -> int:
    """Network evaluations per image (2 per guided evaluation; with an interval, counted as all guided, an upper
    bound). dopri5 is adaptive: its count is not known before it runs, and 0 is returned."""
    check_steps(sampler, num_steps)
    per = {"euler": num_steps, "heun": 2 * num_steps, "dopri5": 0, "sde-euler": num_steps,
           "sde-heun": 2 * (num_steps - 1) + 1}[sampler]
    return per * (2 if cfg_scale != 1.0 else 1)



# ----------------------------------------------------------------------------------------------- as an objective

# The `ditkit train` flags it owns (the last four: LightningDiT's recipe, docs/lightningdit.md).
FLAGS = ("path_type", "loss_weight", "t_sampling", "train_eps", "sample_eps", "t_mean", "t_std", "loss_cosine_weight",
         "sample_time_shift")


def process_from_flags(opts: Any) -> FlowProcess:
    """The process of `--objective flow` from `ditkit train`'s flags (checked: a prediction it has not, or a
    combination SiT's transport cannot train, e.g. noise with train_eps 0, is one line)."""
    if opts.prediction is not None and opts.prediction not in FlowProcess.PREDICTIONS:
        raise UserError(f"--prediction {opts.prediction!r} is not a flow prediction; use one of "
                        f"{', '.join(FlowProcess.PREDICTIONS)} (or --objective diffusion)")
    process = FlowProcess(path_type=opts.path_type or "Linear", prediction=opts.prediction or "velocity",
                          loss_weight=opts.loss_weight, train_eps=opts.train_eps, sample_eps=opts.sample_eps,
                          t_sampling=opts.t_sampling or "uniform", **_given(opts, t_mean="t_mean", t_std="t_std",
                                                                             cosine_weight="loss_cosine_weight"))
    process.validate()
    transport_of(process)  # the eps and weighting rules, checked once here
    return process


def _given(opts: Any, **fields_by_name: str) -> dict[str, float]:
    """{process field: float(option)} for the options given (not None)."""
    return {k: float(getattr(opts, v)) for k, v in fields_by_name.items() if getattr(opts, v, None) is not None}


def transport_of(process: FlowProcess) -> Transport:
    """SiT's `Transport` for a recipe's flow process."""
    from ditkit.transport import create_transport

    p = process
    return create_transport(p.path_type, p.prediction, p.loss_weight, p.train_eps, p.sample_eps, p.t_sampling,
                            t_mean=p.t_mean, t_std=p.t_std, cosine_weight=p.cosine_weight)


def build(recipe: Recipe) -> Objective:
    """The flow objective of `recipe`: its transport is built here, once, and shared by training and sampling."""
    transport = transport_of(recipe.process)

    def sample_with(denoiser: Any, noise: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return sample(denoiser, noise, transport=transport, **kwargs)

    return Objective(kind="flow", training=FlowTraining(transport), sample=sample_with,
                     default_steps=FLOW_SAMPLERS, evaluations=evaluations)
