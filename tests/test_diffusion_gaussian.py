"""The Gaussian process, its training losses and respacing, against float64 closed forms written here.

The references are derived independently (Bayes' rule for the posterior, the Gaussian KL formula, the exact
normal CDF for the discretized likelihood) rather than transcribed from the implementation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from ditkit.diffusion import create_diffusion, get_beta_schedule, space_timesteps
from ditkit.diffusion.gaussian import GaussianDiffusion
from ditkit.runtime.errors import UserError

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def alpha_bar(betas: np.ndarray, t: int) -> float:
    """ᾱ_t = Π_{s ≤ t} (1 − β_s) by an explicit product (ᾱ_{-1} = 1)."""
    return math.prod(1.0 - float(b) for b in betas[: t + 1])


class StubModel:
    """Returns fixed ε and variance values; records the timesteps it is called with."""

    def __init__(self, eps: torch.Tensor, var_values: torch.Tensor | None = None):
        self.eps, self.var_values, self.seen = eps, var_values, []

    def __call__(self, x, t, **kwargs):
        self.seen.append(t.clone())
        if self.var_values is None:
            return self.eps
        return torch.cat([self.eps, self.var_values], dim=1)


def test_linear_and_cosine_schedules():
    lin = get_beta_schedule("linear", 1000)
    assert lin.dtype == np.float64 and lin.shape == (1000,)
    assert lin[0] == pytest.approx(1e-4, abs=1e-15) and lin[-1] == pytest.approx(0.02, abs=1e-15)
    np.testing.assert_allclose(np.diff(lin), (0.02 - 1e-4) / 999, rtol=1e-9)
    # T = 500: both ends scale by 1000/T, as the reference extends Ho et al.'s schedule.
    assert get_beta_schedule("linear", 500)[-1] == pytest.approx(0.04)
    cos = get_beta_schedule("cosine", 1000)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for i in (0, 1, 500, 998):
        assert cos[i] == pytest.approx(1 - f((i + 1) / 1000) / f(i / 1000), rel=1e-12)
    assert cos[-1] == pytest.approx(0.999)  # capped
    # ᾱ of the cosine schedule is the continuous one at the grid points.
    assert alpha_bar(cos, 499) == pytest.approx(f(0.5) / f(0.0), rel=1e-9)
    with pytest.raises(UserError):
        get_beta_schedule("quadratic", 1000)


def test_q_sample_exact_and_moments():
    d = create_diffusion("", noise_schedule="linear")
    betas = get_beta_schedule("linear", 1000)
    x0 = torch.linspace(-1, 1, 12, dtype=F64).view(3, 1, 2, 2)
    t = torch.tensor([0, 499, 999])
    noise = torch.randn(3, 1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    got = d.q_sample(x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        ab = alpha_bar(betas, ti)
        torch.testing.assert_close(got[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i], rtol=1e-12, atol=1e-12)
    # Moments from many draws: mean √ᾱ·x0, variance 1 − ᾱ (tolerance: 5 standard errors).
    n = 20000
    xs = x0[1:2].expand(n, 1, 2, 2)
    samples = d.q_sample(xs, torch.full((n,), 300), torch.randn(n, 1, 2, 2, dtype=F64))
    ab = alpha_bar(betas, 300)
    se = math.sqrt((1 - ab) / n)
    assert (samples.mean(0) - math.sqrt(ab) * x0[1]).abs().max() < 5 * se
    assert (samples.var(0) - (1 - ab)).abs().max() < 5 * (1 - ab) * math.sqrt(2 / n)
    mean, var, logvar = d.q_mean_variance(x0, t)
    torch.testing.assert_close(var[2], torch.full_like(var[2], 1 - alpha_bar(betas, 999)), rtol=1e-12, atol=0)
    torch.testing.assert_close(logvar, var.log(), rtol=1e-12, atol=1e-12)


def bayes_posterior(betas: np.ndarray, t: int, x0: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, float]:
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), both Gaussian: product of Gaussians."""
    ab_prev = alpha_bar(betas, t - 1)
    beta = float(betas[t])
    precision = 1.0 / (1.0 - ab_prev) + (1.0 - beta) / beta
    var = 1.0 / precision
    mean = var * (math.sqrt(ab_prev) * x0 / (1.0 - ab_prev) + math.sqrt(1.0 - beta) * xt / beta)
    return mean, var


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_mean_variance(schedule):
    d = create_diffusion("", noise_schedule=schedule)
    betas = get_beta_schedule(schedule, 1000)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 2, 3, 3, dtype=F64, generator=g)
    xt = torch.randn(4, 2, 3, 3, dtype=F64, generator=g)
    t = torch.tensor([1, 10, 500, 999])
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        ref_mean, ref_var = bayes_posterior(betas, ti, x0[i], xt[i])
        torch.testing.assert_close(mean[i], ref_mean, rtol=1e-10, atol=1e-12)
        assert var[i].flatten()[0].item() == pytest.approx(ref_var, rel=1e-10)
        assert logvar[i].flatten()[0].item() == pytest.approx(math.log(ref_var), rel=1e-10)
    # t = 0: the posterior is the point x0; the log-variance is clipped to that of t = 1.
    mean0, var0, logvar0 = d.q_posterior_mean_variance(x0, xt, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(mean0, x0, rtol=0, atol=1e-12)
    assert var0.abs().max().item() == 0.0
    assert logvar0.flatten()[0].item() == pytest.approx(math.log(bayes_posterior(betas, 1, x0, xt)[1]), rel=1e-10)


def learned_log_variance(betas: np.ndarray, t: int, v: torch.Tensor) -> torch.Tensor:
    """Improved DDPM: log σ² interpolates log β_t (v = 1) and log β̃_t (v = −1), β̃_0 replaced by β̃_1."""
    beta_tilde = bayes_posterior(betas, max(t, 1), torch.zeros(()), torch.zeros(()))[1]
    frac = (v + 1) / 2
    return frac * math.log(betas[t]) + (1 - frac) * math.log(beta_tilde)


def reference_vb_bits(betas, t, x0, xt, eps, v):
    """L_t in bits per dim, computed from the formulas: Gaussian KL (t > 0) or discretized NLL (t = 0)."""
    ab = alpha_bar(betas, t)
    x0_hat = (xt - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    logvar_p = learned_log_variance(betas, t, v)
    if t > 0:
        mean_q, var_q = bayes_posterior(betas, t, x0, xt)
        mean_p, _ = bayes_posterior(betas, t, x0_hat, xt)
        var_p = logvar_p.exp()
        kl = 0.5 * torch.log(var_p / var_q) + (var_q + (mean_q - mean_p) ** 2) / (2 * var_p) - 0.5
        return kl.mean().item() / math.log(2)
    # t = 0: p(x_0 | x_1) = N(mean, σ²) integrated over the 8-bit bin of x_0 (edge bins open-ended).
    mean_p = x0_hat  # the posterior at t = 0 is x̂_0 itself
    sd = (0.5 * logvar_p).exp().numpy()
    x, m = x0.numpy(), mean_p.numpy()
    upper = np.where(x > 0.999, np.inf, (x + 1 / 255 - m) / sd)
    lower = np.where(x < -0.999, -np.inf, (x - 1 / 255 - m) / sd)
    prob = norm.cdf(upper) - norm.cdf(lower)
    return float(-np.log(prob).mean() / math.log(2))


@pytest.mark.parametrize("t", [0, 1, 37, 999])
def test_vb_term_matches_gaussian_kl_and_discretized_nll(t):
    d = create_diffusion("")
    betas = get_beta_schedule("linear", 1000)
    g = torch.Generator().manual_seed(2 + t)
    # 8-bit data including the two edge values, so both edge bins are exercised at t = 0.
    x0 = torch.randint(0, 256, (1, 2, 4, 4), generator=g).to(F64) / 127.5 - 1.0
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = -1.0, 1.0
    noise = torch.randn(1, 2, 4, 4, dtype=F64, generator=g)
    tt = torch.tensor([t])
    xt = d.q_sample(x0, tt, noise)
    # A stub that is close to right (so the t = 0 likelihood is not at its 1e-12 floor) but not exact.
    eps = noise + 0.05 * torch.randn(1, 2, 4, 4, dtype=F64, generator=g)
    v = torch.rand(1, 2, 4, 4, dtype=F64, generator=g) * 2 - 1
    out = d.vb_terms_bpd(StubModel(eps, v), x0, xt, tt, clip_denoised=False)["output"]
    ref = reference_vb_bits(betas, t, x0[0], xt[0], eps[0], v[0])
    # t > 0: exact formulas, float64 round-off. t = 0: the reference's tanh approximation of Φ (|error| < 3e-4
    # per CDF) against scipy's exact Φ, so a looser relative tolerance.
    assert out.item() == pytest.approx(ref, rel=1e-9 if t > 0 else 5e-3)


def test_training_losses_hybrid_and_stop_gradient():
    d = create_diffusion("")
    betas = get_beta_schedule("linear", 1000)
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(3, 2, 4, 4, dtype=F64, generator=g) * 2 - 1
    noise = torch.randn(3, 2, 4, 4, dtype=F64, generator=g)
    t = torch.tensor([0, 5, 800])
    a = torch.tensor(0.3, dtype=F64, requires_grad=True)
    b = torch.tensor(0.2, dtype=F64, requires_grad=True)

    def model(x, tt, y):
        assert y.tolist() == [1, 2, 3]
        return torch.cat([a * x, b * torch.ones_like(x)], dim=1)

    terms = d.training_losses(model, x0, t, model_kwargs={"y": torch.tensor([1, 2, 3])}, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"} and all(v.shape == (3,) for v in terms.values())
    xt = d.q_sample(x0, t, noise)
    ref_mse = ((noise - 0.3 * xt) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["mse"], ref_mse, rtol=1e-12, atol=1e-12)
    for i, ti in enumerate(t.tolist()):
        ref_vb = reference_vb_bits(betas, ti, x0[i], xt[i], 0.3 * xt[i], torch.full_like(x0[i], 0.2))
        assert terms["vb"][i].item() == pytest.approx(ref_vb, rel=1e-9 if ti > 0 else 5e-3)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    # L_vlb sees a stop-gradient mean: it moves only the variance parameter b.
    terms["vb"].sum().backward()
    assert a.grad is None or a.grad.item() == 0.0
    assert b.grad is not None and b.grad.item() != 0.0


def test_rescaled_mse_scales_vb_by_T_over_1000():
    x0 = torch.rand(2, 1, 2, 2, dtype=F64) * 2 - 1
    noise = torch.randn(2, 1, 2, 2, dtype=F64)
    t = torch.tensor([3, 200])
    model = StubModel(0.5 * noise, torch.zeros_like(noise))
    plain = create_diffusion("", diffusion_steps=500).training_losses(model, x0, t, noise=noise)
    scaled = create_diffusion("", diffusion_steps=500, rescale_learned_sigmas=True).training_losses(
        model, x0, t, noise=noise
    )
    torch.testing.assert_close(scaled["vb"], plain["vb"] * 0.5, rtol=1e-12, atol=0)
    torch.testing.assert_close(scaled["mse"], plain["mse"], rtol=0, atol=0)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_x0_and_v_prediction(prediction):
    d = create_diffusion("", learn_sigma=False, prediction=prediction)
    betas = get_beta_schedule("linear", 1000)
    x0 = torch.rand(2, 1, 3, 3, dtype=F64) * 2 - 1
    noise = torch.randn(2, 1, 3, 3, dtype=F64)
    t = torch.tensor([10, 700])
    xt = d.q_sample(x0, t, noise)
    abs_ = torch.tensor([alpha_bar(betas, 10), alpha_bar(betas, 700)], dtype=F64).view(2, 1, 1, 1)
    target = x0 if prediction == "x0" else abs_.sqrt() * noise - (1 - abs_).sqrt() * x0
    # The exact target as model output: zero MSE and a perfect x̂_0.
    terms = d.training_losses(StubModel(target), x0, t, noise=noise)
    assert set(terms) == {"loss", "mse"} and terms["mse"].abs().max().item() < 1e-24
    out = d.p_mean_variance(StubModel(target), xt, t, clip_denoised=False)
    torch.testing.assert_close(out["pred_xstart"], x0, rtol=1e-10, atol=1e-10)
    # Fixed large variance: β_t.
    assert out["variance"][1].flatten()[0].item() == pytest.approx(betas[700], rel=1e-12)


def test_space_timesteps_and_respaced_betas():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    steps = sorted(space_timesteps(1000, "250"))
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    # Sections: 300 steps in three sections of 100 strided to 10, 15, 20; each section keeps its ends.
    steps = sorted(space_timesteps(300, "10,15,20"))
    assert len(steps) == 45
    for lo, hi, count in ((0, 99, 10), (100, 199, 15), (200, 299, 20)):
        inside = [s for s in steps if lo <= s <= hi]
        assert len(inside) == count and inside[0] == lo and inside[-1] == hi
        gaps = np.diff(inside)
        assert gaps.max() - gaps.min() <= 1  # an even stride up to rounding
    assert space_timesteps(300, [10, 15, 20]) == space_timesteps(300, "10,15,20")
    for bad in ("ddim7x", "abc", "2000", "ddim999"):
        with pytest.raises(UserError):
            space_timesteps(1000, bad)

    base = get_beta_schedule("linear", 1000)
    d = create_diffusion("25")
    kept = list(d.timestep_map)
    assert d.num_timesteps == 25 and kept == sorted(space_timesteps(1000, "25"))
    # The respaced process keeps ᾱ at the kept steps: Π(1 − β'_k) over k ≤ j equals the original ᾱ_{kept[j]}.
    for j in (0, 7, 24):
        assert alpha_bar(d.betas, j) == pytest.approx(alpha_bar(base, kept[j]), rel=1e-12)
    # And the model sees the original indices.
    stub = StubModel(torch.zeros(2, 1, 2, 2, dtype=F64), torch.zeros(2, 1, 2, 2, dtype=F64))
    d.p_mean_variance(stub, torch.zeros(2, 1, 2, 2, dtype=F64), torch.tensor([0, 24]))
    assert stub.seen[-1].tolist() == [kept[0], kept[24]] == [0, 999]


def test_create_diffusion_defaults_and_float32_path():
    d = create_diffusion("")
    assert isinstance(d, GaussianDiffusion) and d.num_timesteps == 1000
    assert (d.mean_type, d.var_type, d.loss_type) == ("epsilon", "learned_range", "mse")
    assert create_diffusion("", use_kl=True).loss_type == "rescaled_kl"
    assert create_diffusion(None, learn_sigma=False, sigma_small=True).var_type == "fixed_small"
    # float32 input: coefficients meet it in float32 (as the reference); agrees with float64 to float32 precision.
    x0 = torch.rand(2, 2, 4, 4, dtype=F64) * 2 - 1
    noise = torch.randn(2, 2, 4, 4, dtype=F64)
    t = torch.tensor([1, 900])
    model = StubModel(0.9 * noise, torch.full_like(noise, 0.1))
    t64 = d.training_losses(model, x0, t, noise=noise)
    model32 = StubModel((0.9 * noise).float(), torch.full_like(noise, 0.1).float())
    t32 = d.training_losses(model32, x0.float(), t, noise=noise.float())
    assert t32["loss"].dtype == torch.float32
    torch.testing.assert_close(t32["loss"].double(), t64["loss"], rtol=1e-4, atol=1e-5)
