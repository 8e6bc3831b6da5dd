"""Samplers against closed forms: single steps written out in float64, DDIM's exact inversion, and
DPM-Solver++ / DDIM on a Gaussian data set whose exact denoiser is known."""

from __future__ import annotations

import math

import pytest
import torch

from ditkit.diffusion import create_diffusion, samplers
from ditkit.diffusion.respace import respace
from ditkit.runtime.errors import UserError
from helpers.references import ALPHA_BAR, MU, SIGMA, gaussian_eps_model

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def test_ddpm_step_matches_closed_form():
    d = create_diffusion("50")  # learned range, respaced
    kept = d.timestep_map
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 2, 2, dtype=F64, generator=g)
    eps = torch.randn(3, 2, 2, 2, dtype=F64, generator=g)
    v = torch.rand(3, 2, 2, 2, dtype=F64, generator=g) * 2 - 1
    i = 20
    ab, ab_prev = ALPHA_BAR[kept[i]], ALPHA_BAR[kept[i - 1]]
    beta = 1 - ab / ab_prev  # the respaced step's beta
    out = d.p_sample(
        lambda xx, tt: torch.cat([eps, v], 1),
        x,
        torch.full((3,), i),
        clip_denoised=False,
        generator=torch.Generator().manual_seed(5),
    )
    z = torch.randn(3, 2, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    beta_tilde = beta * (1 - ab_prev) / (1 - ab)
    mean = (math.sqrt(ab_prev) * beta * x0 + math.sqrt(1 - beta) * (1 - ab_prev) * x) / (1 - ab)
    logvar = (v + 1) / 2 * math.log(beta) + (1 - v) / 2 * math.log(beta_tilde)
    torch.testing.assert_close(out["sample"], mean + (0.5 * logvar).exp() * z, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["pred_xstart"], x0, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_closed_form(eta):
    d = create_diffusion("ddim25", learn_sigma=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 2, 2, dtype=F64, generator=g)
    eps = torch.randn(2, 3, 2, 2, dtype=F64, generator=g)
    i = 10
    ab, ab_prev = ALPHA_BAR[40 * i], ALPHA_BAR[40 * (i - 1)]  # ddim25: stride 40
    out = d.ddim_sample(
        lambda xx, tt: eps, x, torch.full((2,), i), False, eta=eta, generator=torch.Generator().manual_seed(2)
    )
    z = torch.randn(2, 3, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    # eta = 1: DDIM's σ is the posterior standard deviation √β̃ of the respaced step.
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    ref = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - sigma**2) * eps + sigma * z
    torch.testing.assert_close(out["sample"], ref, rtol=1e-10, atol=1e-12)


def test_ddim_inversion_round_trip():
    d = create_diffusion("ddim50", learn_sigma=False)
    x0 = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(3)) * 0.5
    # A model whose ε does not depend on x_t: each DDIM step is an affine map that the inverse step undoes
    # exactly, so the round trip is exact to float64 round-off.
    const = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    model = lambda x, t: const  # noqa: E731
    noise = samplers.ddim_invert(d, model, x0)
    torch.testing.assert_close(samplers.ddim(d, model, noise), x0, rtol=1e-9, atol=1e-9)
    # With the exact Gaussian denoiser the round trip is exact only in the ODE limit: the error shrinks with
    # the step count, and the inverted noise is close to N(0, I) distributed.
    x0 = (
        MU + torch.randn(400, 2, dtype=F64, generator=torch.Generator().manual_seed(5)) @ torch.linalg.cholesky(SIGMA).T
    )
    errors = []
    for steps in ("25", "100"):
        dd = create_diffusion(steps, learn_sigma=False)
        z = samplers.ddim_invert(dd, gaussian_eps_model, x0)
        errors.append((samplers.ddim(dd, gaussian_eps_model, z) - x0).abs().max().item())
    assert errors[1] < errors[0] / 3 and errors[1] < 0.1  # first order: 4× the steps, ~4× less error
    assert abs(z.std().item() - 1.0) < 0.1


def moment_errors(x: torch.Tensor) -> tuple[float, float]:
    return (x.mean(0) - MU).abs().max().item(), (torch.cov(x.T) - SIGMA).abs().max().item()


def test_dpm_solver_on_gaussian_data():
    n = 4000
    z = torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(6))
    # Standard error of the mean ≈ 0.5/√4000 = 0.008; of a covariance entry ≈ 0.25·√(2/4000) = 0.006.
    d20 = create_diffusion("20", learn_sigma=False)
    mean_err, cov_err = moment_errors(samplers.dpm_solver(d20, gaussian_eps_model, z))
    assert mean_err < 0.03 and cov_err < 0.03
    # Log-SNR spacing: 10 steps suffice.
    full = create_diffusion("", learn_sigma=False)
    d10 = respace(full, samplers.logsnr_timesteps(full.alphas_cumprod, 10))
    assert d10.num_timesteps == 10
    mean_err, cov_err = moment_errors(samplers.dpm_solver(d10, gaussian_eps_model, z))
    assert mean_err < 0.03 and cov_err < 0.03
    # Second order beats first order (DDIM) at the same number of model evaluations, sample by sample,
    # against a fine (250-step) DDIM solution of the same ODE from the same noise.
    fine = samplers.ddim(create_diffusion("250", learn_sigma=False), gaussian_eps_model, z[:500])
    err_dpm = (samplers.dpm_solver(d20, gaussian_eps_model, z[:500]) - fine).abs().mean().item()
    err_ddim = (samplers.ddim(d20, gaussian_eps_model, z[:500]) - fine).abs().mean().item()
    assert err_dpm < err_ddim


def test_ddpm_learned_minus_one_is_fixed_small_and_loop_compat():
    """v = −1 in the learned range is β̃ (fixed small); the loop equals the reference-style p_sample_loop."""
    z = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(7))
    learned = create_diffusion("10")
    small = create_diffusion("10", learn_sigma=False, sigma_small=True)

    def learned_model(x, t):
        return torch.cat([gaussian_eps_model(x, t), -torch.ones_like(x)], dim=1)

    a = samplers.ddpm(learned, learned_model, z, generator=torch.Generator().manual_seed(8))
    b = samplers.ddpm(small, gaussian_eps_model, z, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.manual_seed(9)
    c = small.p_sample_loop(gaussian_eps_model, z.shape, noise=z, clip_denoised=False)
    torch.manual_seed(9)
    e = samplers.ddpm(small, gaussian_eps_model, z)
    torch.testing.assert_close(c, e, rtol=0, atol=0)
    torch.manual_seed(10)
    c = small.ddim_sample_loop(gaussian_eps_model, z.shape, noise=z, clip_denoised=False, eta=0.5)
    torch.manual_seed(10)
    e = samplers.ddim(small, gaussian_eps_model, z, eta=0.5)
    torch.testing.assert_close(c, e, rtol=0, atol=0)


def test_sample_dispatch_and_errors():
    z = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(11))
    for name in samplers.SAMPLERS:
        out = samplers.sample(gaussian_eps_model, z, sampler=name, num_steps=5, learn_sigma=False)
        assert out.shape == z.shape and torch.isfinite(out).all()
    assert samplers.steps_for("ddim", 50) == "ddim50" and samplers.steps_for("ddim", 300) == "300"
    assert samplers.steps_for("ddpm", 250) == "250"
    with pytest.raises(UserError):
        samplers.steps_for("euler", 10)
    with pytest.raises(UserError):
        samplers.steps_for("ddpm", 1)
