"""Interpolation paths x_t = α_t·x1 + σ_t·x0 between noise x0 (t = 0) and data x1 (t = 1), SiT's convention.

Three paths, as in SiT (Ma et al. 2024, Table 1); the class names are SiT's so its scripts keep working:

- `ICPlan` ("Linear"): α_t = t, σ_t = 1 − t (rectified flow / flow matching with straight lines);
- `GVPCPlan` ("GVP"): α_t = sin(πt/2), σ_t = cos(πt/2) (variance preserving: α² + σ² = 1);
- `VPCPlan` ("VP"): the VP-SDE of score-based models with β(s) linear from β_min = 0.1 to β_max = 20 over
  s = 1 − t, α_t = exp(−¼(1−t)²(β_max−β_min) − ½(1−t)β_min), σ_t = √(1 − α_t²).

Every conversion between the three model parametrisations follows from x_t's Gaussian conditional:
E[x0 | x_t] = −σ_t·∇log p_t (the noise), E[x1 | x_t] = (x_t + σ_t²·∇log p_t)/α_t, and the velocity
v = α'_t·E[x1 | x_t] + σ'_t·E[x0 | x_t] = (α'/α)·x_t + ((α'/α)·σ² − σ·σ')·∇log p_t.
`compute_drift` returns the two coefficients of that last form, (−(α'/α)·x, (α'/α)·σ² − σ·σ'), which is how
SiT writes the probability-flow ODE and the SDE family around it.
"""

from __future__ import annotations

import math

import torch


def expand_t_like_x(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample t of shape (N,) as (N, 1, …, 1) so that it broadcasts against x of shape (N, …)."""
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


class ICPlan:
    """The linear path: α_t = t, σ_t = 1 − t. Also the base class: the others override α, σ and their ratio."""

    def __init__(self, sigma: float = 0.0):
        self.sigma = sigma  # kept for SiT's signature; the paths here are deterministic couplings

    # --- the coefficients (t of any shape; returns (value, derivative))

    def compute_alpha_t(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        return t, 1

    def compute_sigma_t(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        return 1 - t, -1

    def compute_d_alpha_alpha_ratio_t(self, t: torch.Tensor) -> torch.Tensor:
        """α'_t / α_t, written so that it is accurate near t = 0 (where α → 0)."""
        return 1 / t

    # --- the ODE/SDE coefficients, on x-shaped tensors

    def compute_drift(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(−(α'/α)·x, (α'/α)·σ² − σ·σ'): velocity = −first + second·score (see the module doc)."""
        t = expand_t_like_x(t, x)
        ratio = self.compute_d_alpha_alpha_ratio_t(t)
        sigma, d_sigma = self.compute_sigma_t(t)
        return -ratio * x, ratio * sigma**2 - sigma * d_sigma

    def compute_diffusion(self, x: torch.Tensor, t: torch.Tensor, form: str = "constant", norm: float = 1.0):
        """The SDE's diffusion coefficient w_t (the SDE is dx = (v + w·score)dt + √(2w) dW), by SiT's form names."""
        t = expand_t_like_x(t, x)
        if form == "constant":
            return norm * torch.ones_like(t)  # a tensor (SiT returns the bare float, which √ then rejects)
        if form == "SBDM":  # the choice that makes the SDE the reverse of the path's forward diffusion
            return norm * self.compute_drift(x, t)[1]
        if form == "sigma":
            return norm * self.compute_sigma_t(t)[0]
        if form == "linear":
            return norm * (1 - t)
        if form == "decreasing":
            return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
        if form in ("increasing-decreasing", "inccreasing-decreasing"):  # the second is SiT's own spelling
            return norm * torch.sin(math.pi * t) ** 2
        raise NotImplementedError(f"Diffusion form {form} not implemented")

    # --- conversions between the model parametrisations (x, t as the model sees them)

    def get_score_from_velocity(self, velocity: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """∇log p_t = ((α/α')·v − x) / (σ² − (α/α')·σ·σ'), the velocity identity solved for the score."""
        t = expand_t_like_x(t, x)
        alpha, d_alpha = self.compute_alpha_t(t)
        sigma, d_sigma = self.compute_sigma_t(t)
        inv_ratio = alpha / d_alpha  # α/α' is finite at t = 0 on every path, unlike α'/α
        return (inv_ratio * velocity - x) / (sigma**2 - inv_ratio * d_sigma * sigma)

    def get_noise_from_velocity(self, velocity: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t] = −σ·score, in the same form: ((α/α')·v − x) / ((α/α')·σ' − σ)."""
        t = expand_t_like_x(t, x)
        alpha, d_alpha = self.compute_alpha_t(t)
        sigma, d_sigma = self.compute_sigma_t(t)
        inv_ratio = alpha / d_alpha
        return (inv_ratio * velocity - x) / (inv_ratio * d_sigma - sigma)

    def get_velocity_from_score(self, score: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        drift_mean, drift_var = self.compute_drift(x, t)
        return drift_var * score - drift_mean

    # --- the training pair

    def compute_mu_t(self, t: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        t = expand_t_like_x(t, x1)
        return self.compute_alpha_t(t)[0] * x1 + self.compute_sigma_t(t)[0] * x0

    def compute_xt(self, t: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        return self.compute_mu_t(t, x0, x1)

    def compute_ut(self, t: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        """The conditional velocity d x_t / dt = α'·x1 + σ'·x0 (the regression target)."""
        t = expand_t_like_x(t, x1)
        return self.compute_alpha_t(t)[1] * x1 + self.compute_sigma_t(t)[1] * x0

    def plan(self, t: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor):
        """(t, x_t, u_t) for noise x0, data x1 and times t (N,)."""
        xt = self.compute_xt(t, x0, x1)
        return t, xt, self.compute_ut(t, x0, x1, xt)


class GVPCPlan(ICPlan):
    """The generalised variance-preserving path: α_t = sin(πt/2), σ_t = cos(πt/2)."""

    def compute_alpha_t(self, t):
        return torch.sin(t * (math.pi / 2)), (math.pi / 2) * torch.cos(t * (math.pi / 2))

    def compute_sigma_t(self, t):
        return torch.cos(t * (math.pi / 2)), -(math.pi / 2) * torch.sin(t * (math.pi / 2))

    def compute_d_alpha_alpha_ratio_t(self, t):
        return (math.pi / 2) / torch.tan(t * (math.pi / 2))


class VPCPlan(ICPlan):
    """The VP-SDE path with a linear β over s = 1 − t (score SDE's β_min = 0.1, β_max = 20)."""

    def __init__(self, sigma_min: float = 0.1, sigma_max: float = 20.0):
        super().__init__()
        self.sigma_min, self.sigma_max = sigma_min, sigma_max  # SiT's names for β_min, β_max

    def _log_alpha(self, t):
        s = 1 - t
        return -0.25 * s**2 * (self.sigma_max - self.sigma_min) - 0.5 * s * self.sigma_min

    def _beta(self, t):
        return self.sigma_min + (1 - t) * (self.sigma_max - self.sigma_min)

    def compute_alpha_t(self, t):
        alpha = torch.exp(self._log_alpha(t))
        return alpha, alpha * self.compute_d_alpha_alpha_ratio_t(t)

    def compute_sigma_t(self, t):
        alpha_sq = torch.exp(2 * self._log_alpha(t))
        sigma = torch.sqrt(1 - alpha_sq)
        # σ' = −α·α'/σ = −α²·(α'/α)/σ
        return sigma, -alpha_sq * self.compute_d_alpha_alpha_ratio_t(t) / sigma

    def compute_d_alpha_alpha_ratio_t(self, t):
        """d log α / dt = β(1 − t)/2."""
        return 0.5 * self._beta(t)

    def compute_drift(self, x, t):
        # α'/α = β/2 and α² + σ² = 1 make the general form collapse to (−β/2·x, β/2): the VP-SDE itself.
        beta = self._beta(expand_t_like_x(t, x))
        return -0.5 * beta * x, beta / 2
