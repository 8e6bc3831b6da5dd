"""SiT's `Sampler`: ODE, SDE and likelihood sampling functions built from a `Transport`.

Each `sample_*` method returns a function `fn(z, model, **model_kwargs)`; `model` is called as
`model(x, t, **model_kwargs)` (a DiT, its `forward_with_cfg`, or a `ditkit.models.guidance.guided` wrapper:
guidance on the velocity is the same formula as on ε). What the function returns is SiT's trajectory:

- `sample_ode`: a tensor (num_steps, *z.shape), the solution at each of `num_steps` evenly spaced times, so
  fixed-step solvers take num_steps − 1 steps; the sample is `[-1]`;
- `sample_sde`: a list of num_steps tensors: num_steps − 1 SDE steps, then the last step; the sample is `[-1]`;
- `sample_ode_likelihood`: (log-likelihood of x in nats per sample, the latent z it maps to).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ditkit.runtime.errors import UserError
from ditkit.transport import integrators
from ditkit.transport.path import expand_t_like_x
from ditkit.transport.transport import ModelType, PathType, Transport, shifted_grid

SampleFn = Callable[..., Any]
LAST_STEPS = (None, "Mean", "Tweedie", "Euler")
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")


class Sampler:
    """Sampling functions for one transport: `Sampler(create_transport()).sample_ode()(z, model, y=y)[-1]`."""

    def __init__(self, transport: Transport):
        self.transport = transport
        self.drift = transport.get_drift()
        self.score = transport.get_score()

    # --- SDE

    def _sde_terms(self, diffusion_form: str, diffusion_norm: float) -> tuple[Callable, Callable]:
        """(drift v + w·score, w) of the SDE family dx = (v + w·∇log p)dt + √(2w)dW, whose marginals are p_t."""
        path = self.transport.path_sampler

        def diffusion(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return path.compute_diffusion(x, t, form=diffusion_form, norm=diffusion_norm)

        drift_and_score = self.transport.get_drift_and_score()

        def sde_drift(x: torch.Tensor, t: torch.Tensor, model: Any, **kw: Any) -> torch.Tensor:
            velocity, score = drift_and_score(x, t, model, **kw)  # one model evaluation, not SiT's two
            return velocity + diffusion(x, t) * score

        return sde_drift, diffusion

    def _last_step(self, sde_drift: Callable, last_step: str | None, last_step_size: float) -> Callable:
        """The step from t1 = 1 − last_step_size to the data end, by SiT's names.

        None: stop at t1; "Mean": one noise-free step of the SDE drift; "Euler": one step of the ODE drift;
        "Tweedie": E[x1 | x_t] = (x + σ²·score)/α, the denoised estimate.
        """
        path = self.transport.path_sampler
        if last_step is None:
            return lambda x, t, model, **kw: x
        if last_step == "Mean":
            return lambda x, t, model, **kw: x + sde_drift(x, t, model, **kw) * last_step_size
        if last_step == "Euler":
            return lambda x, t, model, **kw: x + self.drift(x, t, model, **kw) * last_step_size

        def tweedie(x: torch.Tensor, t: torch.Tensor, model: Any, **kw: Any) -> torch.Tensor:
            te = expand_t_like_x(t, x)
            alpha, sigma = path.compute_alpha_t(te)[0], path.compute_sigma_t(te)[0]
            return x / alpha + sigma**2 / alpha * self.score(x, t, model, **kw)

        return tweedie

    def sample_sde(
        self, *, sampling_method: str = "Euler", diffusion_form: str = "SBDM", diffusion_norm: float = 1.0,
        last_step: str | None = "Mean", last_step_size: float = 0.04, num_steps: int = 250, shift: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> SampleFn:
        """An SDE sampler: num_steps − 1 steps of `sampling_method` ("Euler" = Euler–Maruyama, "Heun") over
        [t0, 1 − last_step_size], then `last_step`. diffusion_form / diffusion_norm choose w_t (SiT's names).

        Refused (SiT returns NaN there): "SBDM" on the Linear/GVP path with a velocity model and sample_eps 0,
        whose w_t = (α'/α)σ² − σσ' is infinite at t = 0.
        """
        _check_sde_args(self.transport, sampling_method, diffusion_form, last_step, last_step_size, num_steps)
        if last_step is None:
            last_step_size = 0.0
        sde_drift, diffusion = self._sde_terms(diffusion_form, diffusion_norm)
        t0, t1 = self.transport.check_interval(
            self.transport.train_eps, self.transport.sample_eps, diffusion_form=diffusion_form, sde=True,
            eval=True, reverse=False, last_step_size=last_step_size,
        )
        if not t0 < t1:
            raise UserError(f"SDE sampling needs t0 < t1, got [{t0}, {t1}]; use a smaller last_step_size")
        step = integrators.SDE_STEPS[sampling_method]
        last_step_fn = self._last_step(sde_drift, last_step, last_step_size)

        def _sample(init: torch.Tensor, model: Any, **model_kwargs: Any) -> list[torch.Tensor]:
            ts = shifted_grid(t0, t1, num_steps, shift, dtype=init.dtype, device=init.device)
            xs = step(sde_drift, diffusion, init, ts, model, generator=generator, **model_kwargs)
            t_end = torch.full((init.shape[0],), t1, device=init.device, dtype=init.dtype)
            with torch.no_grad():
                xs.append(last_step_fn(xs[-1], t_end, model, **model_kwargs))
            return xs

        return _sample

    # --- ODE

    def sample_ode(
        self, *, sampling_method: str = "dopri5", num_steps: int = 50, atol: float = 1e-6, rtol: float = 1e-3,
        reverse: bool = False, shift: float = 1.0,
    ) -> SampleFn:
        """A probability-flow ODE sampler over [t0, t1] (noise → data; reverse: data → noise).

        sampling_method: "euler", "heun" (= torchdiffeq's "heun2") take num_steps − 1 fixed steps (1 and 2 model
        evaluations each); any other torchdiffeq method ("dopri5", adaptive with atol/rtol, SiT's default)
        chooses its own steps and reports the solution at the num_steps grid times (as SiT; for VP and for noise
        and score models it is made to land on the interval's end rather than step past it: see `_ode_fn`).
        shift (ditkit's addition): SD3's timestep shift of the grid (`shifted_grid`).
        """
        if not isinstance(num_steps, int) or num_steps < 2:
            raise UserError(f"num_steps must be an integer >= 2 (grid points, steps + 1), got {num_steps!r}")
        t0, t1 = self.transport.check_interval(
            self.transport.train_eps, self.transport.sample_eps, sde=False, eval=True, reverse=reverse,
            last_step_size=0.0,
        )
        return self._ode_fn(self.drift, t0, t1, sampling_method, num_steps, atol, rtol, shift)

    def _ode_fn(
        self, drift: Callable, t0: float, t1: float, method: str, num_steps: int, atol: float, rtol: float,
        shift: float,
    ) -> SampleFn:
        fixed = integrators.FIXED_ODE.get(method)
        # Where eps pulls the interval in (VP; noise and score models), the drift is undefined past its ends, so
        # the adaptive solver must land on the end rather than step beyond it (as SiT's does) and interpolate.
        transport = self.transport
        singular_ends = transport.path_type == PathType.VP or transport.model_type != ModelType.VELOCITY

        def _sample(x: Any, model: Any, **model_kwargs: Any) -> Any:
            first = x[0] if isinstance(x, tuple) else x
            ts = shifted_grid(t0, t1, num_steps, shift, dtype=first.dtype, device=first.device)
            if fixed is not None and not isinstance(x, tuple):
                solver = integrators.ode_euler if fixed == "euler" else integrators.ode_heun
                return solver(drift, x, ts, model, **model_kwargs)
            return integrators.ode_torchdiffeq(
                drift, x, ts, model, method=fixed or method, atol=atol, rtol=rtol, land_on_end=singular_ends,
                **model_kwargs,
            )

        return _sample

    def sample_ode_likelihood(
        self, *, sampling_method: str = "dopri5", num_steps: int = 50, atol: float = 1e-6, rtol: float = 1e-3,
    ) -> SampleFn:
        """log p(x) by the instantaneous change of variables: integrate data → noise with the divergence of the
        velocity, estimated by Hutchinson's trick with one Rademacher probe per evaluation (as SiT).

        Returns fn(x, model, **kw) → (logp (N,) in nats, z the noise x maps to). Unbiased; exact when the
        velocity is linear in x with a scalar Jacobian.
        """
        drift = self.drift
        t0, t1 = self.transport.check_interval(
            self.transport.train_eps, self.transport.sample_eps, sde=False, eval=True, reverse=False,
            last_step_size=0.0,
        )

        def likelihood_drift(state: tuple, s: torch.Tensor, model: Any, **kw: Any) -> tuple:
            x, _ = state
            # s runs t0 → t1 while the model's time runs t1 → t0 (data → noise). SiT takes t = 1 − s, the same
            # for the symmetric intervals, but for VP it would start at t = 1, where the path is singular.
            t = (t0 + t1) - s
            probe = torch.randint(2, x.size(), dtype=torch.float, device=x.device).to(x) * 2 - 1
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                v = drift(x, t, model, **kw)
                grad = torch.autograd.grad((v * probe).sum(), x)[0]
            divergence = (grad * probe).flatten(1).sum(dim=1)
            return -v.detach(), divergence.detach()

        solve = self._ode_fn(likelihood_drift, t0, t1, sampling_method, num_steps, atol, rtol, 1.0)

        def _sample(x: torch.Tensor, model: Any, **model_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            zs, delta = solve((x, torch.zeros(x.shape[0]).to(x)), model, **model_kwargs)
            z = zs[-1]
            return self.transport.prior_logp(z) - delta[-1], z

        return _sample


def _check_sde_args(
    transport: Transport, method: str, form: str, last_step: str | None, last_step_size: float, num_steps: int
) -> None:
    if method not in integrators.SDE_STEPS:
        raise UserError(f"unknown SDE sampling_method {method!r}; use one of: {', '.join(integrators.SDE_STEPS)}")
    if form not in DIFFUSION_FORMS and form != "inccreasing-decreasing":
        raise UserError(f"unknown diffusion_form {form!r}; use one of: {', '.join(DIFFUSION_FORMS)}")
    if last_step not in LAST_STEPS:
        raise UserError(f"unknown last_step {last_step!r}; use None, Mean, Tweedie or Euler")
    if not isinstance(num_steps, int) or num_steps < 2:
        raise UserError(f"num_steps must be an integer >= 2, got {num_steps!r}")
    if last_step is not None and not 0 < last_step_size < 1:
        raise UserError(f"last_step_size must be in (0, 1), got {last_step_size!r}")
    if (
        form == "SBDM" and transport.path_type != PathType.VP and transport.model_type == ModelType.VELOCITY
        and not transport.sample_eps
    ):
        raise UserError(
            "diffusion_form 'SBDM' is infinite at t=0 on the Linear/GVP path when sample_eps is 0 (the default "
            "for velocity models): give create_transport(sample_eps=1e-3) or use diffusion_form='sigma'"
        )
