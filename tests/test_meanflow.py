"""MeanFlow (issue 27): the target against float64 finite differences, the (r, t) sampler's distribution, the
reduction to flow matching at r = t, few-step sampling on an analytic Gaussian, the model's JVP, the recipe."""

from __future__ import annotations

import math

import pytest
import torch

import ditkit
from ditkit.models import build_model, forward_mode
from ditkit.models.config import DiTConfig
from ditkit.objectives import objective_for
from ditkit.recipe import DiffusionProcess, MeanFlowProcess, Recipe
from ditkit.train.step import Float32Output
from ditkit.transport import create_transport
from ditkit.transport import meanflow as mf
from helpers.models import MEANFLOW_TINY, float64_meanflow_dit

TINY = MEANFLOW_TINY


_model = float64_meanflow_dit


def _inputs(n: int = 3, seed: int = 1, channels: int = 1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, channels, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.8 + 0.2
    r = t * torch.rand(n, generator=g, dtype=torch.float64)
    return z, r, t, torch.randn(z.shape, generator=g, dtype=torch.float64)


def test_target_matches_a_float64_finite_difference_rederivation():
    """u_tgt = v − (t − r)·du/dt with du/dt by central differences along (v, 0, 1), h = 1e-5, in float64."""
    model = _model()
    z, r, t, v = _inputs(n=4)
    r[2] = t[2]  # a row with r = t: the JVP runs on the other rows only, this one's target is v
    y = torch.tensor([0, 2, 1, 1])
    target = mf.meanflow_target(model, z, r, t, v, {"y": y})
    assert torch.equal(target[2], v[2])

    def u(zz, rr, tt):
        return model(zz, tt, y, r=rr)

    h = 1e-6  # central differences: O(h²) truncation, O(1e-16/h) rounding
    dudt = (u(z + h * v, r, t + h) - u(z - h * v, r, t - h)) / (2 * h)
    expected = v - (t - r).view(-1, 1, 1, 1) * dudt
    assert dudt.abs().max() > 0.1  # a real derivative, not zero
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-6 * float(dudt.abs().max()))


@pytest.mark.parametrize("overrides", [{}, {"conditioning": "in-context"},
                                       {"conditioning": "text", "caption_channels": 16, "max_tokens": 4}])
def test_model_jvp_matches_finite_differences_in_every_input(overrides):
    """The network's JVP in (z, r, t) along a random direction (forward_mode: explicit attention) against
    central differences in float64, and its primal output against the ordinary (SDPA) forward."""
    model = _model(**overrides)
    z, r, t, dz = _inputs()
    g = torch.Generator().manual_seed(5)
    dr, dt = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    if overrides.get("conditioning") == "text":
        y = torch.randn(3, 4, 16, generator=g, dtype=torch.float64)
        kwargs = {"mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])}
    else:
        y, kwargs = torch.tensor([0, 2, 3]), {}

    def u(zz, rr, tt):
        return model(zz, tt, y, r=rr, **kwargs)

    out, tangent = forward_mode.jvp(model, u, (z, r, t), (dz, dr, dt))
    h = 1e-6
    fd = (u(z + h * dz, r + h * dr, t + h * dt) - u(z - h * dz, r - h * dr, t - h * dt)) / (2 * h)
    torch.testing.assert_close(out, u(z, r, t), rtol=1e-12, atol=1e-12)
    assert fd.abs().max() > 0.01
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-6 * float(fd.abs().max()))


def test_time_sampler_distribution():
    """r <= t; the fraction with r ≠ t; logit(t) ~ max and logit(r | r ≠ t) ~ min of two N(μ, σ²) (exact CDFs)."""
    process = MeanFlowProcess()
    u = torch.rand(200_000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r, t = mf.sample_times(u, process)
    assert bool((r <= t).all())
    differ = r < t
    assert abs(differ.double().mean().item() - process.ratio_r_neq_t) < 0.005  # ±5 sd of a binomial mean
    grid = torch.linspace(-3.5, 2.5, 61, dtype=torch.float64)
    phi = 0.5 * (1 + torch.erf((grid - process.time_mu) / (process.time_sigma * math.sqrt(2))))

    def ecdf(values):
        return (torch.logit(values)[:, None] <= grid[None]).double().mean(0)

    assert (ecdf(t) - phi**2).abs().max() < 0.01
    assert (ecdf(r[differ]) - (1 - (1 - phi) ** 2)).abs().max() < 0.01
    assert torch.equal(r[~differ], t[~differ])


def test_r_equal_t_reduces_to_flow_matching():
    """With r = t (and adaptive p = 0) the MeanFlow loss is flow matching's on the linear path: SiT's transport
    with its time s = 1 − t and velocity x − ε = −v, summed over the item instead of averaged."""
    model = _model()
    x, _, _, noise = _inputs(n=4, seed=3)
    y = torch.tensor([0, 1, 2, 1])
    u = torch.rand(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u[:, 2] = 0.9  # every row r = t
    process = MeanFlowProcess(adaptive_p=0.0)
    kwargs = {"y": y, "force_drop_ids": torch.zeros(4, dtype=torch.long)}
    terms = mf.MeanFlowTraining(process).training_losses(model, x, u, kwargs, noise)
    _, t = mf.sample_times(u, process)

    def flow_model(xs, s, **kw):
        return -model(xs, 1 - s, r=1 - s, **kw)

    flow = create_transport("Linear", "velocity").training_losses(flow_model, x, kwargs, t=1 - t, x0=noise)
    torch.testing.assert_close(terms["loss"], flow["loss"] * x[0].numel(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(terms["mse"], flow["mse"], rtol=1e-10, atol=1e-12)


def test_adaptive_weight_and_folded_guidance():
    """loss = sg(w)·‖Δ‖² with w = (‖Δ‖² + c)^−p; ṽ = ω·v + κ·u(c) + (1 − ω − κ)·u(∅) on kept rows in the
    interval, v on dropped rows and outside it."""
    process = MeanFlowProcess(omega=0.6, kappa=0.3, guidance_low=0.1, guidance_high=0.7, adaptive_p=0.5)
    delta = torch.randn(3, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    loss = mf.adaptive_loss(delta, process)["loss"]
    total = delta.detach().pow(2).sum((1, 2, 3))
    torch.testing.assert_close(loss.detach(), total / (total + 1e-3).sqrt())

    def toy(z, t, y, force_drop_ids, r):  # conditional and unconditional "fields" that differ
        return z * (1 + y.view(-1, 1, 1, 1)) * (1 - force_drop_ids.view(-1, 1, 1, 1)) + t.view(-1, 1, 1, 1)

    z = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    v = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.5, 0.5, 0.9, 0.3], dtype=torch.float64)
    y, drop = torch.tensor([1, 2, 1, 0]), torch.tensor([0, 1, 0, 0])
    got = mf._guided_velocity(toy, z, t, v, {"y": y, "force_drop_ids": drop}, process)
    col = t.view(-1, 1, 1, 1)
    want = 0.6 * v + 0.3 * (z * (1 + y.view(-1, 1, 1, 1)) + col) + 0.1 * col
    for row, guided in enumerate([True, False, False, True]):
        torch.testing.assert_close(got[row], want[row] if guided else v[row])


class GaussianMeanVelocity:
    """The exact average velocity of the linear path for data N(μ, diag s²): along the ODE z_t = (1 − t)·μ + σ_t·ε
    with σ_t = √((1 − t)²s² + t²), u(z_t, r, t) = (z_t − z_r)/(t − r) (the instantaneous velocity at r = t)."""

    def __init__(self, mu: torch.Tensor, s: torch.Tensor):
        self.mu, self.s = mu, s

    def sigma(self, t):
        return torch.sqrt((1 - t) ** 2 * self.s**2 + t**2)

    def __call__(self, z, t, y=None, r=None):
        t, r = t.view(-1, 1), (t if r is None else r).view(-1, 1)
        eps = (z - (1 - t) * self.mu) / self.sigma(t)
        same = (t - r).abs() < 1e-12
        gap = torch.where(same, torch.ones_like(t), t - r)
        mean = ((r - t) * self.mu + (self.sigma(t) - self.sigma(r)) * eps) / gap
        dsigma = (t - (1 - t) * self.s**2) / self.sigma(t)
        return torch.where(same, -self.mu + dsigma * eps, mean)


def test_few_step_sampling_on_an_analytic_gaussian_matches_its_closed_form():
    """With the exact average velocity, 1 and 3 MeanFlow steps map ε to μ + s·ε exactly (the closed-form ODE
    map), where one Euler step of the instantaneous velocity does not; and the exact u satisfies the MeanFlow
    identity u = v − (t − r)·du/dt along the marginal velocity v (the target's JVP direction and sign)."""
    g = torch.Generator().manual_seed(0)
    mu, s = torch.randn(6, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64) + 0.2
    field = GaussianMeanVelocity(mu, s)
    eps = torch.randn(5, 6, generator=g, dtype=torch.float64)
    for steps in (1, 3):
        out = mf.sample(field, eps, num_steps=steps, model_kwargs={})
        torch.testing.assert_close(out, mu + s * eps, rtol=1e-12, atol=1e-12)
    euler = eps - field(eps, torch.ones(5, dtype=torch.float64))
    assert (euler - (mu + s * eps)).abs().max() > 0.05
    t = torch.full((5,), 0.8, dtype=torch.float64)
    r = torch.full((5,), 0.3, dtype=torch.float64)
    z = (1 - t.view(-1, 1)) * mu + field.sigma(t.view(-1, 1)) * eps
    v = field(z, t)  # the marginal velocity at (z, t)
    target = mf.meanflow_target(field, z, r, t, v, {})
    torch.testing.assert_close(target, field(z, t, r=r), rtol=1e-10, atol=1e-10)


def test_recipe_checkpoint_keys_and_refusals():
    """The interval embedder exists only on MeanFlow models (other configs store what they did); samplers of
    one objective are refused on the other with one line; the flag's bad keys get one line."""
    plain = DiTConfig(**{**TINY, "interval_time": False})
    assert "interval_time" not in plain.to_dict()
    assert not any(k.startswith("r_embedder") for k in build_model(plain).state_dict())
    assert any(k.startswith("r_embedder.") for k in build_model(DiTConfig(**TINY)).state_dict())
    recipe = Recipe(model=DiTConfig(**TINY), process=MeanFlowProcess(omega=0.5))
    assert Recipe.from_json(recipe.to_json()) == recipe
    assert Recipe.from_dict({k: v for k, v in recipe.to_dict().items()}).process.omega == 0.5
    with pytest.raises(ditkit.UserError, match="does not apply to a diffusion model"):
        objective_for(Recipe(model=plain, process=DiffusionProcess())).check_sampler("meanflow", 1)
    with pytest.raises(ditkit.UserError, match="does not apply to a meanflow model"):
        objective_for(recipe).check_sampler("dpm-solver", 20)
    with pytest.raises(ditkit.UserError, match="interval embedder"):
        objective_for(Recipe(model=plain, process=MeanFlowProcess()))
    with pytest.raises(ditkit.UserError, match="KEY=VALUE"):
        mf.process_from_flag("omega=1,bogus=2")
    with pytest.raises(ditkit.UserError, match="ratio_r_neq_t"):
        mf.process_from_flag("ratio_r_neq_t=1.5")
    from ditkit.weights.convert import diffusers_config

    with pytest.raises(ditkit.UserError, match="no diffusers DiT equivalent"):
        diffusers_config(DiTConfig(**{**TINY, "learn_sigma": True}))
    with pytest.raises(ditkit.UserError, match="no second time input"):
        build_model(plain)(torch.zeros(1, 1, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long), r=torch.zeros(1))


def test_sample_cli_and_train_flags(tmp_path, capsys):
    """`ditkit sample --sampler meanflow` on a MeanFlow file (unguided by default), another objective's sampler
    refused in one line with exit 2; `--meanflow` without `--objective meanflow` refused by the train checks."""
    from ditkit.cli import main
    from ditkit.train.options import TrainOptions, validate
    from ditkit.weights.checkpoints import save_model

    torch.manual_seed(0)
    model = build_model(DiTConfig(**TINY))
    ckpt = tmp_path / "mf.safetensors"
    save_model(model, ckpt, recipe=Recipe(model=model.config, process=MeanFlowProcess()))
    code = main(["sample", "--ckpt", str(ckpt), "--class-labels", "0", "2", "--per-label", "2", "--sampler",
                 "meanflow", "--num-steps", "2", "--out", str(tmp_path / "a"), "--no-progress"])
    out = capsys.readouterr()
    assert code == 0 and (tmp_path / "a" / "grid.png").stat().st_size > 0
    assert "no cfg: 2 model evaluations per image" in out.out + out.err
    code = main(["sample", "--ckpt", str(ckpt), "--sampler", "dpm-solver", "--out", str(tmp_path / "b"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "does not apply to a meanflow model" in err and err.strip().count("\n") == 0
    with pytest.raises(ditkit.UserError, match="add --objective meanflow"):
        validate(TrainOptions(data_path="digits", objective="flow", meanflow="omega=2"), 1)
    with pytest.raises(ditkit.UserError, match="is a flow setting"):
        validate(TrainOptions(data_path="digits", objective="meanflow", path_type="GVP"), 1)


def test_a_text_model_trains_a_meanflow_step():
    """One `TrainStep` of a tiny PixArt-α text model with MeanFlow and folded guidance (κ ≠ 0: both fields):
    captions and their mask reach every pass, the loss is finite and the interval embedder gets a gradient."""
    import copy

    from ditkit.train.step import TrainStep

    config = DiTConfig(**{**TINY, "conditioning": "text", "caption_channels": 16, "max_tokens": 4})
    torch.manual_seed(0)
    model = build_model(config)
    recipe = Recipe(model=config, process=MeanFlowProcess(omega=0.5, kappa=0.3, ratio_r_neq_t=0.5))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = TrainStep(model, model, copy.deepcopy(model), opt, objective_for(recipe).training,
                     device=torch.device("cpu"), precision="fp32", global_batch=4)
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]])
    before = model.r_embedder.mlp[0].weight.detach().clone()
    out = step(torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 4, 16, generator=g), 0, mask=mask)
    assert bool(out.finite) and out.stepped
    assert not torch.equal(model.r_embedder.mlp[0].weight, before)


def test_plain_sets_the_forward_differentiable_path_and_gives_each_layer_its_own_back():
    """Inside `forward_mode.plain` every attention module computes explicit math attention and no layer takes
    the fused kernels, also through the training step's fp32 wrapper; afterwards each layer has its own setting
    again (an instance value, or its class's default), even when the body raised."""
    model = _model()
    model.blocks[0].attn.backend = "cudnn"  # as a measured choice would be stored
    model.blocks[1].fused = False
    z, r, t, _ = _inputs()
    y = torch.tensor([0, 2, 3])
    fast = model(z, t, y, r=r)
    with pytest.raises(RuntimeError, match="inside"), forward_mode.plain(Float32Output(model)):
        assert {b.attn.backend for b in model.blocks} == {"math"}
        assert not any(m.fused for m in model.modules() if hasattr(m, "fused"))
        # float64 on the CPU: explicit attention against SDPA's to rounding
        torch.testing.assert_close(model(z, t, y, r=r), fast, rtol=1e-12, atol=1e-12)
        raise RuntimeError("inside")
    assert [b.attn.backend for b in model.blocks] == ["cudnn", "default"]
    assert "fused" not in vars(model.blocks[0]) and model.blocks[0].fused is True
    assert vars(model.blocks[1])["fused"] is False and model.final_layer.fused is True
