"""Our samplers against a second implementation: diffusers' schedulers, stepped over the same timesteps.

diffusers keeps ᾱ in float32, so agreement is to about 1e-5, not float64 round-off.
"""

from __future__ import annotations

import pytest
import torch

from ditkit.diffusion import create_diffusion, samplers
from helpers.references import gaussian_eps_model

pytestmark = pytest.mark.usefixtures("one_thread")

diffusers = pytest.importorskip("diffusers")
F64 = torch.float64


def test_dpm_solver_pp_2m_matches_diffusers():
    d = create_diffusion("12", learn_sigma=False)
    z = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    ours = samplers.dpm_solver(d, gaussian_eps_model, z, lower_order_final=False)
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon", final_sigmas_type="zero",
        lower_order_final=True,
    )  # fmt: skip
    sched.set_timesteps(timesteps=[int(t) for t in d.timestep_map[::-1]])
    x = z
    for t in sched.timesteps:
        eps = gaussian_eps_model(x, torch.full((len(x),), int(t)))
        x = sched.step(eps, t, x).prev_sample
    torch.testing.assert_close(ours, x.to(F64), rtol=1e-4, atol=1e-4)
    # Our default (first order into t_0) differs from that only in the last steps.
    assert not torch.allclose(samplers.dpm_solver(d, gaussian_eps_model, z), ours, atol=1e-4)


def test_ddpm_learned_range_matches_diffusers():
    d = create_diffusion("20")  # learned range, respaced

    def model(x, t):
        eps = gaussian_eps_model(x, t)
        return torch.cat([eps, torch.tanh(x + t.to(F64).view(-1, 1) / 500)], dim=1)  # some variance values

    z = torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    ours = samplers.ddpm(d, model, z, generator=torch.Generator().manual_seed(2))
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        variance_type="learned_range", clip_sample=False, prediction_type="epsilon",
    )  # fmt: skip
    sched.set_timesteps(timesteps=[int(t) for t in d.timestep_map[::-1]])
    g = torch.Generator().manual_seed(2)  # the same noise sequence: both draw once per step with t > 0
    x = z
    for t in sched.timesteps:
        x = sched.step(model(x, torch.full((len(x),), int(t))), t, x, generator=g).prev_sample
    torch.testing.assert_close(ours, x.to(F64), rtol=1e-4, atol=1e-4)
