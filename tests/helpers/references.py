"""Closed-form references for the samplers: Gaussian data whose exact denoiser / velocity / score is known.

Shared by the diffusion sampler tests (ε-prediction under the linear schedule) and the transport tests (the
SiT paths Linear, GVP and VP), so that a second implementation (diffusers, a toy objective) is checked against
the same formulas.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ditkit.diffusion import get_beta_schedule

F64 = torch.float64
# ----------------------------------------------------------------- diffusion: data x0 ~ N(MU, SIGMA) in 2-D
MU = torch.tensor([0.3, -0.2], dtype=F64)
SIGMA = torch.tensor([[0.25, 0.12], [0.12, 0.15]], dtype=F64)
ALPHA_BAR = np.cumprod(1.0 - get_beta_schedule("linear", 1000))


def gaussian_eps_model(x: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
    """The exact ε-predictor for data N(MU, SIGMA) in 2-D under the linear schedule.

    E[x0 | x_t] = μ + α·Σ·(α²Σ + σ²I)⁻¹·(x_t − α·μ); ε̂ = (x_t − α·E[x0 | x_t]) / σ. All samples share t.
    """
    ab = float(ALPHA_BAR[int(t[0])])
    a, s = math.sqrt(ab), math.sqrt(1 - ab)
    gain = a * SIGMA @ torch.linalg.inv(a * a * SIGMA + s * s * torch.eye(2, dtype=F64))
    x0 = MU + (x - a * MU) @ gain.T
    return (x - a * x0) / s


# ----------------------------------------------------------------- transport paths (SiT): x_t = α·x1 + σ·x0
B_MIN, B_MAX = 0.1, 20.0


def closed_form(path: str, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(α, σ, α', σ') of x_t = α·x1 + σ·x0 in float64, written from the SiT paper's definitions."""
    if path == "Linear":
        return t, 1 - t, np.ones_like(t), -np.ones_like(t)
    if path == "GVP":
        h = math.pi / 2
        return np.sin(h * t), np.cos(h * t), h * np.cos(h * t), -h * np.sin(h * t)
    s = 1 - t  # VP: ᾱ(s) = exp(−∫₀ˢ β), β(s) = β_min + s·(β_max − β_min); α = √ᾱ
    log_alpha = -0.25 * s**2 * (B_MAX - B_MIN) - 0.5 * s * B_MIN
    alpha = np.exp(log_alpha)
    d_alpha = alpha * 0.5 * (B_MIN + s * (B_MAX - B_MIN))
    sigma = np.sqrt(1 - alpha**2)
    return alpha, sigma, d_alpha, -alpha * d_alpha / sigma


# ------------------------------------------------------------------ the linear-Gaussian case: data x1 ~ N(0, s²I)
S = 0.5


def gaussian_model(path: str, prediction: str, s: float = S):
    """The exact minimiser of each loss for Gaussian data, from the closed forms (x_t ~ N(0, V), V = α²s² + σ²)."""

    def model(x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
        alpha, sigma, d_alpha, d_sigma = (
            torch.as_tensor(c, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            for c in closed_form(path, t.double().cpu().numpy())
        )
        var = alpha**2 * s**2 + sigma**2
        if prediction == "velocity":  # α'·E[x1|x] + σ'·E[x0|x]
            return (d_alpha * alpha * s**2 + d_sigma * sigma) / var * x
        if prediction == "noise":  # E[x0|x]
            return sigma / var * x
        return -x / var  # the score of N(0, V)

    return model


def exact_flow(path: str, t_from: float, t_to: float, s: float = S) -> float:
    """The probability-flow ODE is dx/dt = (V'/2V)·x, so x(t_to) = x(t_from)·√(V(t_to)/V(t_from))."""
    a, sg, _, _ = closed_form(path, np.array([t_from, t_to]))
    v = a**2 * s**2 + sg**2
    return float(np.sqrt(v[1] / v[0]))
