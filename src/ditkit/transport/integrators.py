"""Integrators for the transport's ODE and SDE: small functions over a drift `f(x, t, model, **kw)` and a grid.

All take the time grid `ts` (1-D, increasing or decreasing) and return the trajectory at every grid point,
as SiT's do: the ODE solvers a tensor of shape (len(ts), *x.shape) starting with x itself (torchdiffeq's
`odeint` layout); the SDE solvers a list of the len(ts) − 1 states after each step.

- `ode_euler`, `ode_heun`: fixed steps on the grid (1 and 2 model evaluations per step); the same update rules as
  torchdiffeq's "euler" and "heun2", which the tests use as the second implementation;
- `ode_torchdiffeq`: any torchdiffeq method (adaptive "dopri5" with atol/rtol, as SiT samples by default);
  the grid then only says where the solution is reported;
- `sde_euler`, `sde_heun`: SiT's Euler–Maruyama and stochastic Heun steps for dx = drift·dt + √(2w)·dW.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ditkit.runtime.errors import UserError

Drift = Callable[..., Any]
FIXED_ODE = {"euler": "euler", "heun": "heun2", "heun2": "heun2"}


def _batch(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The scalar time t as one entry per sample of x, in x's dtype (SiT's `ones(N) * t`)."""
    return torch.ones(x.shape[0], device=x.device, dtype=x.dtype) * t


@torch.no_grad()
def ode_euler(drift: Drift, x: torch.Tensor, ts: torch.Tensor, model: Any, **model_kwargs: Any) -> torch.Tensor:
    """x_{i+1} = x_i + (t_{i+1} − t_i)·f(x_i, t_i)."""
    out = [x]
    for t0, t1 in zip(ts[:-1], ts[1:]):
        x = x + (t1 - t0) * drift(x, _batch(t0, x), model, **model_kwargs)
        out.append(x)
    return torch.stack(out)


@torch.no_grad()
def ode_heun(drift: Drift, x: torch.Tensor, ts: torch.Tensor, model: Any, **model_kwargs: Any) -> torch.Tensor:
    """Heun's (explicit trapezoidal) method: k1 = f(x, t0), k2 = f(x + h·k1, t1), x ← x + h·(k1 + k2)/2."""
    out = [x]
    for t0, t1 in zip(ts[:-1], ts[1:]):
        h = t1 - t0
        k1 = drift(x, _batch(t0, x), model, **model_kwargs)
        k2 = drift(x + h * k1, _batch(t1, x), model, **model_kwargs)
        x = x + h * (k1 + k2) / 2
        out.append(x)
    return torch.stack(out)


def _torchdiffeq_odeint() -> Callable[..., Any]:
    try:
        from torchdiffeq import odeint
    except ImportError:
        raise UserError(
            "adaptive ODE sampling needs torchdiffeq (a ditkit dependency): pip install torchdiffeq; "
            "or use --sampler euler / heun"
        ) from None
    return odeint


ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


def ode_torchdiffeq(
    drift: Drift, x: Any, ts: torch.Tensor, model: Any, *, method: str = "dopri5", atol: float = 1e-6,
    rtol: float = 1e-3, land_on_end: bool = False, **model_kwargs: Any,
) -> Any:
    """torchdiffeq's `odeint` with `method`; x may be a tensor or a tuple of tensors (the likelihood ODE).

    An adaptive solver steps past the last time and interpolates back; `land_on_end` makes it stop there
    instead, for drifts that are undefined beyond the interval (VP beyond t = 1, σ-divisions near it).
    """
    odeint = _torchdiffeq_odeint()
    options = {"step_t": ts[-1:]} if land_on_end and method in ADAPTIVE else None
    first = x[0] if isinstance(x, tuple) else x

    def f(t: torch.Tensor, state: Any) -> Any:
        return drift(state, _batch(t, first), model, **model_kwargs)

    n = len(x) if isinstance(x, tuple) else 1
    return odeint(f, x, ts.to(first.device), method=method, atol=[atol] * n, rtol=[rtol] * n, options=options)


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn(x.size()).to(x)  # SiT's draw: global CPU generator, then moved
    return torch.randn(x.shape, generator=generator, device=generator.device).to(x)


def _sde_steps(
    step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
    ts: torch.Tensor, generator: torch.Generator | None,
) -> list[torch.Tensor]:
    """Walk the grid `ts`: each step draws its Brownian increment dW = √h·ξ first, then `step(x, t, h, dW)`."""
    out = []
    for t0, t1 in zip(ts[:-1], ts[1:]):
        h = t1 - t0
        dw = _noise_like(x, generator) * torch.sqrt(h)
        x = step(x, _batch(t0, x), h, dw)
        out.append(x)
    return out


@torch.no_grad()
def sde_euler(
    drift: Drift, diffusion: Callable[..., Any], x: torch.Tensor, ts: torch.Tensor, model: Any, *,
    generator: torch.Generator | None = None, **model_kwargs: Any,
) -> list[torch.Tensor]:
    """Euler–Maruyama: x ← x + f(x, t)·h + √(2·w(x, t))·√h·ξ, ξ ~ N(0, I)."""

    def step(x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
        return x + drift(x, t, model, **model_kwargs) * h + torch.sqrt(2 * diffusion(x, t)) * dw

    return _sde_steps(step, x, ts, generator)


@torch.no_grad()
def sde_heun(
    drift: Drift, diffusion: Callable[..., Any], x: torch.Tensor, ts: torch.Tensor, model: Any, *,
    generator: torch.Generator | None = None, **model_kwargs: Any,
) -> list[torch.Tensor]:
    """SiT's stochastic Heun: add the step's noise first (x̂ = x + √(2w)·dW), then one Heun step of the drift."""

    def step(x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
        x_hat = x + torch.sqrt(2 * diffusion(x, t)) * dw
        k1 = drift(x_hat, t, model, **model_kwargs)
        k2 = drift(x_hat + h * k1, t + h, model, **model_kwargs)
        return x_hat + 0.5 * h * (k1 + k2)

    return _sde_steps(step, x, ts, generator)


SDE_STEPS = {"Euler": sde_euler, "Heun": sde_heun}
