"""ditkit.transport against references written here: closed forms in float64, a linear-Gaussian case with exact
solutions, finite differences, and diffusers' FlowMatchEulerDiscreteScheduler as a second Euler implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ditkit.runtime.errors import UserError
from ditkit.transport import Sampler, create_transport, first_channels, shifted_grid
from ditkit.transport.integrators import ode_euler, ode_heun, ode_torchdiffeq
from helpers.references import S, closed_form, exact_flow, gaussian_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add contention

PATHS = ("Linear", "GVP", "VP")


T_INNER = np.linspace(0.02, 0.98, 25)


@pytest.mark.parametrize("path", PATHS)
def test_path_coefficients_match_closed_forms_and_finite_differences(path):
    plan = create_transport(path).path_sampler
    t = torch.tensor(T_INNER, dtype=torch.float64)
    alpha, d_alpha = plan.compute_alpha_t(t)
    sigma, d_sigma = plan.compute_sigma_t(t)
    ref = closed_form(path, T_INNER)
    for got, want in zip((alpha, sigma, d_alpha, d_sigma), ref):
        np.testing.assert_allclose(torch.as_tensor(got, dtype=torch.float64).expand_as(t).numpy(), want, rtol=1e-12)
    # the derivatives are derivatives: central differences of the closed form, error O(h²) ≈ 1e-8
    h = 1e-5
    for k in (0, 1):
        fd = (closed_form(path, T_INNER + h)[k] - closed_form(path, T_INNER - h)[k]) / (2 * h)
        np.testing.assert_allclose(ref[k + 2], fd, rtol=1e-6, atol=1e-7)
    ratio = plan.compute_d_alpha_alpha_ratio_t(t).numpy()
    np.testing.assert_allclose(ratio, ref[2] / ref[0], rtol=1e-10)
    # compute_drift's second term is the score coefficient of the velocity: (α'/α)σ² − σσ'
    x = torch.ones(len(T_INNER), 1, dtype=torch.float64)
    mean, var = plan.compute_drift(x, t)
    np.testing.assert_allclose(var.reshape(-1).numpy(), ref[2] / ref[0] * ref[1] ** 2 - ref[1] * ref[3], rtol=1e-10)
    np.testing.assert_allclose(mean.reshape(-1).numpy(), -ref[2] / ref[0], rtol=1e-10)


# ------------------------------------------------------------------ the linear-Gaussian case: data x1 ~ N(0, s²I)


def test_euler_on_linear_gaussian_is_the_exact_euler_recursion_and_converges():
    z = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = gaussian_model("Linear", "velocity")
    errors = []
    for n in (11, 21, 41, 81):
        out = Sampler(create_transport()).sample_ode(sampling_method="euler", num_steps=n)(z, model)
        assert out.shape == (n, *z.shape) and torch.equal(out[0], z)
        # Euler on dx/dt = a(t)·x multiplies by (1 + h·a(t_i)) per step; a(t) = (t·s² − (1 − t))/V(t)
        ts = np.linspace(0.0, 1.0, n)
        a = (ts[:-1] * S**2 - (1 - ts[:-1])) / (ts[:-1] ** 2 * S**2 + (1 - ts[:-1]) ** 2)
        factor = np.prod(1 + (ts[1] - ts[0]) * a)
        torch.testing.assert_close(out[-1], z * factor, rtol=1e-12, atol=1e-12)
        errors.append(abs(factor - exact_flow("Linear", 0.0, 1.0)))
    assert all(e2 < e1 * 0.6 for e1, e2 in zip(errors, errors[1:])), errors  # first order: halves with h
    assert errors[-1] < 0.01


@pytest.mark.parametrize("method, order", [("euler", 1), ("heun", 2)])
@pytest.mark.parametrize("path", PATHS)
def test_fixed_step_ode_converges_at_its_order_to_the_exact_flow(path, method, order):
    transport = create_transport(path)
    t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps, eval=True)
    exact = exact_flow(path, t0, t1)
    z = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    errors = []
    for n in (41, 81, 161):
        out = Sampler(transport).sample_ode(sampling_method=method, num_steps=n)(z, gaussian_model(path, "velocity"))
        errors.append(abs(out[-1, 0, 0, 0, 0].item() - exact))
    rates = [math.log2(e1 / e2) for e1, e2 in zip(errors, errors[1:])]
    assert min(rates) > order - 0.3, (errors, rates)


@pytest.mark.parametrize("path", PATHS)
def test_dopri5_reaches_the_exact_flow_within_its_tolerance(path):
    transport = create_transport(path)
    t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps, eval=True)
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fn = Sampler(transport).sample_ode(sampling_method="dopri5", num_steps=5, atol=1e-9, rtol=1e-9)
    out = fn(z, gaussian_model(path, "velocity"))
    torch.testing.assert_close(out[-1], z * exact_flow(path, t0, t1), rtol=1e-6, atol=1e-7)
    # reverse integrates data → noise over the same interval
    back = Sampler(transport).sample_ode(sampling_method="dopri5", num_steps=3, atol=1e-9, rtol=1e-9, reverse=True)
    torch.testing.assert_close(back(z, gaussian_model(path, "velocity"))[-1], z * exact_flow(path, t1, t0),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("path", PATHS)
def test_the_three_predictions_give_one_drift_and_the_conversions_invert(path):
    """The exact noise, score and velocity models of the Gaussian case must give the same ODE drift, and the
    path's conversions must map one to the other."""
    t = torch.tensor([0.1, 0.35, 0.6, 0.9], dtype=torch.float64)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    drifts = {}
    for prediction in ("velocity", "noise", "score"):
        transport = create_transport(path, prediction)
        drifts[prediction] = transport.get_drift()(x, t, gaussian_model(path, prediction))
        score = transport.get_score()(x, t, gaussian_model(path, prediction))
        torch.testing.assert_close(score, gaussian_model(path, "score")(x, t), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(drifts["noise"], drifts["velocity"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(drifts["score"], drifts["velocity"], rtol=1e-10, atol=1e-12)
    plan = create_transport(path).path_sampler
    v, eps, sc = (gaussian_model(path, p)(x, t) for p in ("velocity", "noise", "score"))
    torch.testing.assert_close(plan.get_score_from_velocity(v, x, t), sc, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(plan.get_noise_from_velocity(v, x, t), eps, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(plan.get_velocity_from_score(sc, x, t), v, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ the loss


def toy_model(x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
    """Any smooth function of (x, t) serves: the loss must match its re-derivation for whatever it predicts."""
    return 0.7 * torch.tanh(x) + t.reshape(-1, 1, 1, 1) * 0.3 - 0.1


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction, weight", [
    ("velocity", None), ("noise", None), ("noise", "velocity"), ("noise", "likelihood"),
    ("score", None), ("score", "velocity"), ("score", "likelihood"),
])
def test_training_loss_matches_a_float64_rederivation(path, prediction, weight):
    gen = torch.Generator().manual_seed(3)
    x1 = torch.randn(6, 2, 4, 4, dtype=torch.float64, generator=gen)
    x0 = torch.randn(6, 2, 4, 4, dtype=torch.float64, generator=gen)
    t = torch.tensor([0.01, 0.2, 0.45, 0.5, 0.77, 0.99], dtype=torch.float64)
    transport = create_transport(path, prediction, weight)
    got = transport.training_losses(toy_model, x1, {}, t=t, x0=x0)
    a, s, da, ds = (torch.tensor(c).reshape(-1, 1, 1, 1) for c in closed_form(path, t.numpy()))
    xt = a * x1 + s * x0
    pred = toy_model(xt, t)
    w_score = da / a * s**2 - s * ds  # the score's coefficient in the velocity
    weight_value = {None: 1.0, "velocity": (w_score / s) ** 2, "likelihood": w_score / s**2}[weight]
    if prediction == "velocity":
        err = pred - (da * x1 + ds * x0)
    elif prediction == "noise":
        err = pred - x0
    else:  # the score of x_t given x0 is −x0/σ: the loss compares σ·ŝ with −x0
        err = pred * s + x0
    want = (weight_value * err**2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got["loss"], want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["pred"], pred)


def test_training_loss_and_drift_use_the_first_channels_of_a_learned_sigma_output():
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0.3, 0.6])

    def doubled(x, t, **_):
        return torch.cat([toy_model(x, t), torch.full_like(x, 123.0)], dim=1)

    transport = create_transport()
    got = transport.training_losses(doubled, x, t=t, x0=torch.zeros_like(x))["loss"]
    want = transport.training_losses(toy_model, x, t=t, x0=torch.zeros_like(x))["loss"]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(transport.get_drift()(x, t, doubled), toy_model(x, t))
    with pytest.raises(ValueError, match="does not fit"):
        first_channels(torch.zeros(2, 5, 8, 8), x)


def test_training_times_stay_in_the_interval_and_lognormal_is_logit_normal():
    from scipy import stats

    gen = torch.Generator().manual_seed(5)
    t = create_transport("VP").sample_t(4000, generator=gen)
    assert t.min() >= 0 and t.max() <= 1 - 1e-5
    t = create_transport(t_sampling="lognormal").sample_t(4000, generator=gen).double()
    logit = torch.log(t / (1 - t)).numpy()
    assert stats.kstest(logit, "norm").pvalue > 1e-3  # a false failure once in a thousand seeds; seed fixed
    t_noise = create_transport("Linear", "noise").sample_t(4000, generator=gen)
    assert t_noise.min() >= 1e-3 and t_noise.max() <= 1 - 1e-3


# ------------------------------------------------------------------ SDE, likelihood, grids


@pytest.mark.parametrize("method", ["Euler", "Heun"])
def test_sde_sampler_reaches_the_data_distribution(method):
    """With the exact Gaussian score, SDE samples from noise have the data variance s² (up to discretisation and
    sampling error: 20000 draws give a standard error of 1% on a variance)."""
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(20000, 1, 1, 1, dtype=torch.float64, generator=gen)
    sampler = Sampler(create_transport())
    fn = sampler.sample_sde(sampling_method=method, diffusion_form="sigma", num_steps=100, generator=gen)
    xs = fn(z, gaussian_model("Linear", "velocity"))
    assert len(xs) == 100
    assert abs(xs[-1].var().item() / S**2 - 1) < 0.05
    assert abs(xs[-1].mean().item()) < 0.02


def test_sde_last_steps_and_sde_trajectory_shape():
    z = torch.randn(3000, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    sampler = Sampler(create_transport("GVP", sample_eps=None))
    for last in ("Mean", "Tweedie", "Euler", None):
        gen = torch.Generator().manual_seed(8)
        xs = sampler.sample_sde(diffusion_form="sigma", last_step=last, num_steps=40, generator=gen)(
            z, gaussian_model("GVP", "velocity"))
        assert len(xs) == 40
        assert abs(xs[-1].var().item() / S**2 - 1) < 0.1, last


@pytest.mark.parametrize("path", ["Linear", "VP"])
def test_likelihood_of_gaussian_data_is_the_closed_form(path):
    """Hutchinson's estimate is exact here (the velocity's Jacobian is a multiple of I), so the ODE likelihood must
    equal the density of the distribution that the flow maps onto N(0, I): N(0, s²·V(t0)/V(t1)...) — computed from
    the exact flow factor between the interval's ends."""
    transport = create_transport(path)
    t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps, eval=True)
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    fn = Sampler(transport).sample_ode_likelihood(num_steps=3, atol=1e-9, rtol=1e-9)
    logp, z = fn(x, gaussian_model(path, "velocity"))
    k = exact_flow(path, t1, t0)  # x at t1 maps to z = k·x at t0
    torch.testing.assert_close(z, x * k, rtol=1e-6, atol=1e-7)
    d = x[0].numel()
    want = -d / 2 * math.log(2 * math.pi) - (k * x).flatten(1).pow(2).sum(1) / 2 + d * math.log(k)
    torch.testing.assert_close(logp, want, rtol=1e-6, atol=1e-6)


def test_shifted_grid_is_sd3_shift_and_keeps_the_ends():
    g = shifted_grid(0.0, 1.0, 6, 3.0, dtype=torch.float64)
    s = 1 - np.linspace(0, 1, 6)
    np.testing.assert_allclose(g.numpy(), 1 - 3 * s / (1 + 2 * s), atol=1e-15)
    g = shifted_grid(0.0, 0.96, 5, 2.0)
    assert g[0] == 0.0 and abs(g[-1].item() - 0.96) < 1e-7 and bool((g.diff() > 0).all())
    back = shifted_grid(1.0, 0.0, 6, 3.0, dtype=torch.float64)
    np.testing.assert_allclose(back.numpy(), np.flip(shifted_grid(0.0, 1.0, 6, 3.0, dtype=torch.float64).numpy()),
                               atol=1e-15)
    torch.testing.assert_close(shifted_grid(0.1, 0.9, 7), torch.linspace(0.1, 0.9, 7), rtol=0, atol=0)


# ------------------------------------------------------------------ second implementations


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_matches_diffusers_flow_match_euler_scheduler(shift):
    """diffusers' scheduler runs σ = 1 − t from 1 to 0 with x ← x + (σ_next − σ)·v_d, v_d = noise − data = −v."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    n = 12
    model = gaussian_model("Linear", "velocity")
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(10))
    ours = Sampler(create_transport()).sample_ode(sampling_method="euler", num_steps=n + 1, shift=shift)(z, model)[-1]
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n).tolist())  # diffusers appends σ = 0
    x = z.clone()
    for timestep in sched.timesteps:
        sigma = timestep / sched.config.num_train_timesteps
        v_d = -model(x, torch.full((x.shape[0],), 1.0 - float(sigma)))
        x = sched.step(v_d, timestep, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)  # float32, 12 steps


def test_fixed_step_solvers_match_torchdiffeq():
    ts = torch.linspace(0.0, 1.0, 9, dtype=torch.float64)
    z = torch.randn(2, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    drift = create_transport("GVP").get_drift()
    model = gaussian_model("GVP", "velocity")
    for ours, theirs in ((ode_euler, "euler"), (ode_heun, "heun2")):
        torch.testing.assert_close(ours(drift, z, ts, model), ode_torchdiffeq(drift, z, ts, model, method=theirs),
                                   rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ bad input: one line each


@pytest.mark.parametrize("kwargs, match", [
    (dict(path_type="Straight"), "unknown path_type"),
    (dict(prediction="eps"), "unknown prediction"),
    (dict(loss_weight="snr"), "unknown loss_weight"),
    (dict(loss_weight="likelihood"), "noise or score predictions only"),
    (dict(prediction="noise", train_eps=0.0), "train_eps 0.0: path Linear with prediction noise is singular"),
    (dict(prediction="score", path_type="GVP", sample_eps=0), "sample_eps 0"),
    (dict(path_type="VP", train_eps=0), "path VP with prediction velocity is singular"),
    (dict(t_sampling="beta"), "unknown t_sampling"),
])
def test_bad_transport_settings_get_one_line(kwargs, match):
    with pytest.raises(UserError, match=match) as err:
        create_transport(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_sampler_settings_get_one_line():
    sampler = Sampler(create_transport())
    with pytest.raises(UserError, match="SBDM' is infinite at t=0") as err:
        sampler.sample_sde()  # SiT's defaults: NaN samples there; refused here
    assert "\n" not in str(err.value)
    Sampler(create_transport(sample_eps=1e-3, prediction="noise")).sample_sde()  # with an eps it is fine
    for kwargs, match in ((dict(sampling_method="RK"), "unknown SDE"), (dict(diffusion_form="x"), "diffusion_form"),
                          (dict(last_step="Last"), "last_step"), (dict(num_steps=1), "num_steps")):
        with pytest.raises(UserError, match=match):
            sampler.sample_sde(**{"diffusion_form": "sigma", **kwargs})
    with pytest.raises(UserError, match="num_steps"):
        sampler.sample_ode(num_steps=1)
    with pytest.raises(UserError, match="timestep shift"):
        sampler.sample_ode(sampling_method="euler", shift=-1.0)(torch.zeros(1, 1, 2, 2), toy_model)
