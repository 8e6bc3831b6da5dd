"""guided-diffusion's less used entry points, kept as ditkit's compatibility surface (issue 14, defect 7):
`prior_bpd`, `ddim_reverse_sample`, classifier guidance (`cond_fn` in `p_sample`, `condition_score` in
`ddim_sample`) and `denoised_fn`. Each is checked against its closed form in float64 (tolerance 1e-12)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ditkit.diffusion import create_diffusion

TOL = dict(rtol=1e-12, atol=1e-12)


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 417, 998])
    diffusion = create_diffusion("", learn_sigma=False)  # fixed variance: the model outputs ε only
    return diffusion, x, eps, t


def _abar(diffusion, table: str, t: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(getattr(diffusion, table))[t].view(-1, 1, 1, 1)


def test_prior_bpd_is_the_kl_of_q_xT_to_the_standard_normal():
    diffusion, x, _, _ = _setup()
    abar = float(diffusion.alphas_cumprod[-1])
    mean, var = math.sqrt(abar) * x, 1.0 - abar
    kl = 0.5 * (-1.0 - math.log(var) + var + mean**2)  # nats per element
    want = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
    torch.testing.assert_close(diffusion.prior_bpd(x), want, **TOL)
    assert float(want.max()) < 1e-4  # x_T is nearly pure noise after 1000 linear steps


def test_ddim_reverse_sample_is_the_inverse_of_a_deterministic_ddim_step():
    diffusion, x, eps, t = _setup()
    t = t.clamp(max=diffusion.num_timesteps - 2)
    model = lambda x_t, t_, **_: eps  # noqa: E731 - a constant ε: inversion is then exact
    up = diffusion.ddim_reverse_sample(model, x, t, clip_denoised=False)["sample"]
    abar, abar_next = _abar(diffusion, "alphas_cumprod", t), _abar(diffusion, "alphas_cumprod_next", t)
    x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    torch.testing.assert_close(up, abar_next.sqrt() * x0 + (1 - abar_next).sqrt() * eps, **TOL)
    back = diffusion.ddim_sample(model, up, t + 1, clip_denoised=False, eta=0.0)["sample"]
    torch.testing.assert_close(back, x, rtol=1e-10, atol=1e-10)


def test_cond_fn_shifts_the_ancestral_mean_by_variance_times_gradient():
    diffusion, x, eps, t = _setup()
    grad = torch.full_like(x, 0.3)
    model = lambda x_t, t_, **_: eps  # noqa: E731
    seen = []

    def cond_fn(x_t, t_, **kwargs):
        seen.append((t_.clone(), kwargs))
        return grad

    plain = diffusion.p_sample(model, x, t, clip_denoised=False, generator=torch.Generator().manual_seed(1))
    guided = diffusion.p_sample(model, x, t, clip_denoised=False, cond_fn=cond_fn, model_kwargs={"y": 7},
                                generator=torch.Generator().manual_seed(1))
    variance = diffusion.p_mean_variance(model, x, t, clip_denoised=False)["variance"]
    nonzero = (t != 0).double().view(-1, 1, 1, 1)  # t = 0 adds no noise: the shift is all that differs there
    shift = guided["sample"] - plain["sample"]
    # The reference casts the mean to float32 before the shift (`mean.float()`): float32 round-off, not 1e-12.
    f32 = dict(rtol=0, atol=2e-6)
    torch.testing.assert_close(shift[0], (variance * grad)[0], **f32)
    torch.testing.assert_close(shift * nonzero, (variance * grad) * nonzero, **f32)
    assert float((variance * grad).abs().min()) > 1e-5  # the shift is far above that round-off
    assert torch.equal(seen[0][0], t) and seen[0][1] == {"y": 7}  # original timesteps and the model's kwargs


def test_condition_score_moves_epsilon_by_the_scaled_gradient_in_ddim():
    diffusion, x, eps, t = _setup()
    grad = torch.full_like(x, -0.2)
    abar = _abar(diffusion, "alphas_cumprod", t)
    shifted = eps - (1 - abar).sqrt() * grad  # ε' = ε − √(1 − ᾱ_t)·∇ log p(y | x_t)
    guided = diffusion.ddim_sample(lambda *a, **k: eps, x, t, clip_denoised=False, cond_fn=lambda *a, **k: grad)
    direct = diffusion.ddim_sample(lambda *a, **k: shifted, x, t, clip_denoised=False)
    torch.testing.assert_close(guided["sample"], direct["sample"], **TOL)
    torch.testing.assert_close(guided["pred_xstart"], direct["pred_xstart"], **TOL)


def test_denoised_fn_replaces_x0_before_clipping_and_the_posterior():
    diffusion, x, eps, t = _setup()
    out = diffusion.p_mean_variance(lambda *a, **k: eps, x, t, clip_denoised=True,
                                    denoised_fn=lambda x0: torch.full_like(x0, 1.7))
    assert torch.all(out["pred_xstart"] == 1.0)  # 1.7, then clipped to [-1, 1]
    c1, c2 = _abar(diffusion, "posterior_mean_coef1", t), _abar(diffusion, "posterior_mean_coef2", t)
    torch.testing.assert_close(out["mean"], c1 * 1.0 + c2 * x, **TOL)
    assert np.isfinite(out["log_variance"].numpy()).all()
