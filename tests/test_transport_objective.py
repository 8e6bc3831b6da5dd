"""The flow objective's pieces for train and sample: time mapping, named samplers, evaluation counts, bad input."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from ditkit.runtime.errors import UserError
from ditkit.transport import create_transport
from ditkit.transport.objective import FLOW_SAMPLERS, FlowTraining, evaluations, sample
from helpers.references import S, exact_flow, gaussian_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_flow_training_maps_uniform_draws_to_the_transport_times():
    u = (torch.arange(2000, dtype=torch.float64) + 0.5) / 2000  # an even spread of uniform draws
    seen = {}

    def spy(x, t, **_):
        seen["t"] = t
        return torch.zeros_like(x)

    x1 = torch.zeros(2000, 1, 1, 1, dtype=torch.float64)
    FlowTraining(create_transport("Linear", "noise")).training_losses(spy, x1, u, noise=torch.ones_like(x1))
    torch.testing.assert_close(seen["t"], 1e-3 + (1 - 2e-3) * u)  # [eps, 1 − eps] for a noise model
    FlowTraining(create_transport(t_sampling="lognormal")).training_losses(spy, x1, u, noise=torch.ones_like(x1))
    logit = torch.log(seen["t"] / (1 - seen["t"])).numpy()
    assert stats.kstest(logit, "norm").statistic < 0.01  # inverse-CDF quantiles: near-exact normal


def test_flow_training_terms_are_the_transport_loss():
    gen = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(4, 2, 3, 3, generator=gen), torch.randn(4, 2, 3, 3, generator=gen)
    u = torch.tensor([0.1, 0.4, 0.5, 0.9])
    model = gaussian_model("GVP", "score")
    transport = create_transport("GVP", "score", "likelihood")
    terms = FlowTraining(transport).training_losses(model, x1, u, {}, noise=x0)
    ref = transport.training_losses(model, x1, {}, t=transport.times_from_uniform(u), x0=x0)
    torch.testing.assert_close(terms["loss"], ref["loss"])
    assert not torch.allclose(terms["mse"], terms["loss"])  # the weight applies to the loss, not the mse


@pytest.mark.parametrize("sampler", list(FLOW_SAMPLERS))
def test_named_samplers_reach_the_exact_flow_and_count_their_evaluations(sampler):
    z = torch.randn(4000 if sampler.startswith("sde") else 4, 1, 1, 1, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    calls = []

    def model(x, t, **kw):
        calls.append(1)
        return gaussian_model("Linear", "velocity")(x, t, **kw)

    steps = {"dopri5": 0, "euler": 100, "heun": 20, "sde-euler": 100, "sde-heun": 60}[sampler]
    x = sample(model, z, transport=create_transport(), sampler=sampler, num_steps=steps or None,
               generator=torch.Generator().manual_seed(2))
    if sampler.startswith("sde"):
        assert abs(x.var().item() / S**2 - 1) < 0.1
    else:
        tol = {"euler": 2e-2, "heun": 1e-3, "dopri5": 0.1}[sampler]  # SiT's rtol 1e-3: 5% here, 14 evaluations
        torch.testing.assert_close(x, z * exact_flow("Linear", 0.0, 1.0), rtol=tol, atol=tol)
    if sampler != "dopri5":
        assert len(calls) == evaluations(sampler, steps)
        assert evaluations(sampler, steps, cfg_scale=4.0) == 2 * len(calls)


def test_flow_sampler_bad_input_gets_one_line():
    transport = create_transport()
    model = gaussian_model("Linear", "velocity")
    z = torch.zeros(1, 1, 2, 2)
    for kwargs, match in ((dict(sampler="ddpm"), "does not apply to a flow model"),
                          (dict(sampler="sde-euler", num_steps=1), "at least 2"),
                          (dict(sampler="euler", eta=0.5), "--eta")):
        with pytest.raises(UserError, match=match) as err:
            sample(model, z, transport=transport, **kwargs)
        assert "\n" not in str(err.value)
