"""Classifier-free guidance: the formulas on a stub model, the interval, and DiT's own forward_with_cfg."""

from __future__ import annotations

import pytest
import torch

import ditkit
from ditkit.diffusion.guidance import guided
from ditkit.runtime.errors import UserError

F64 = torch.float64
NULL = 10


pytestmark = pytest.mark.usefixtures("one_thread")


class Stub:
    """A model whose output depends on the label in a known way; records batch sizes and labels."""

    def __init__(self):
        self.calls: list[tuple[int, list[int]]] = []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], y.tolist()))
        return self.formula(x, t, y)

    @staticmethod
    def formula(x, t, y):
        """4 ε channels + 4 variance channels: ε = x·(1 + y/10) + t/1000, var = −y/20 (label-dependent)."""
        yy = y.to(F64).view(-1, 1, 1, 1)
        tt = t.to(F64).view(-1, 1, 1, 1)
        return torch.cat([x * (1 + yy / 10) + tt / 1000, -yy / 20 * torch.ones_like(x)], dim=1)


@pytest.mark.parametrize("channels, guided_count", [(3, 3), ("all", 4)])
def test_guidance_formula_three_and_all_channels(channels, guided_count):
    x = torch.randn(2, 4, 3, 3, dtype=F64)
    t = torch.tensor([500, 500])
    y = torch.tensor([2, 7])
    stub = Stub()
    out = guided(stub, 4.0, NULL, channels=channels)(x, t, y)
    assert stub.calls == [(4, [2, 7, NULL, NULL])]  # one batched forward, [cond; uncond]
    cond = Stub.formula(x, t, y)
    uncond = Stub.formula(x, t, torch.full_like(y, NULL))
    expected = cond.clone()
    expected[:, :guided_count] = uncond[:, :guided_count] + 4.0 * (cond[:, :guided_count] - uncond[:, :guided_count])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out.shape == (2, 8, 3, 3)
    if channels == 3:  # the 4th ε channel and the variance channels are the conditional ones
        torch.testing.assert_close(out[:, 3:], cond[:, 3:], rtol=0, atol=0)


def test_guidance_interval_and_unit_scale():
    x = torch.randn(3, 4, 2, 2, dtype=F64)
    y = torch.tensor([0, 1, 2])
    stub = Stub()
    model = guided(stub, 3.0, NULL, channels="all", interval=(100, 600))
    # Outside the interval: scale 1, and only the conditional half is evaluated.
    out = model(x, torch.full((3,), 800), y)
    assert stub.calls[-1] == (3, [0, 1, 2])
    torch.testing.assert_close(out, Stub.formula(x, torch.full((3,), 800), y), rtol=0, atol=0)
    # Inside: guided, one forward of 2N.
    out = model(x, torch.full((3,), 600), y)
    assert stub.calls[-1][0] == 6
    cond = Stub.formula(x, torch.full((3,), 600), y)
    uncond = Stub.formula(x, torch.full((3,), 600), torch.full_like(y, NULL))
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + 3.0 * (cond[:, :4] - uncond[:, :4]), rtol=1e-12, atol=1e-12)
    # Mixed timesteps in one batch: each sample guided or not by its own t.
    t = torch.tensor([50, 300, 900])
    out = model(x, t, y)
    cond = Stub.formula(x, t, y)
    uncond = Stub.formula(x, t, torch.full_like(y, NULL))
    torch.testing.assert_close(out[0], cond[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[1, :4], uncond[1, :4] + 3.0 * (cond[1, :4] - uncond[1, :4]), rtol=1e-12, atol=1e-12)
    # Scale 1 is no guidance at all: a single conditional forward.
    stub2 = Stub()
    guided(stub2, 1.0, NULL)(x, torch.full((3,), 600), y)
    assert stub2.calls == [(3, [0, 1, 2])]
    with pytest.raises(UserError):
        guided(stub, 2.0, NULL, channels=0)
    with pytest.raises(UserError):
        guided(stub, 2.0, NULL, interval=(600, 100))


@pytest.mark.parametrize("channels", [3, "all"])
def test_matches_dit_forward_with_cfg(channels):
    torch.manual_seed(0)
    model = ditkit.create_model("DiT-S/8", input_size=8, num_classes=NULL, depth=2, hidden_size=64, num_heads=2)
    # The official init zeroes the output layers; give them values so that the comparison means something.
    for p in model.parameters():
        if p.abs().sum() == 0 and p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    model.eval()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([999, 999])
    y = torch.tensor([3, 5])
    with torch.no_grad():
        ours = guided(model, 1.5, NULL, channels=channels)(x, t, y)
        theirs = model.forward_with_cfg(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL)]), 1.5, guide_channels=channels
        )
    torch.testing.assert_close(ours, theirs[:2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, steps", [("ddpm", 25), ("ddim", 10), ("dpm-solver", 8)])
def test_model_evaluation_count(name, steps):
    """The closed-form count of network evaluations per image equals the rows actually run."""
    from ditkit.diffusion import create_diffusion, samplers

    stub = Stub()
    model = guided(stub, 2.0, NULL, interval=(0, 500))
    x = torch.randn(3, 4, 2, 2, dtype=F64)
    samplers.sample(model, x, sampler=name, num_steps=steps, model_kwargs={"y": torch.tensor([1, 2, 3])})
    rows = sum(n for n, _ in stub.calls)
    d = create_diffusion(samplers.steps_for(name, steps))
    assert rows == 3 * samplers.model_evaluations(d, 2.0, (0, 500))
    assert samplers.model_evaluations(d, 2.0) == 2 * steps and samplers.model_evaluations(d) == steps
    assert steps < rows / 3 < 2 * steps  # the interval saves the unconditional half on its other steps


def test_official_script_workflow_matches_guided_sampler():
    """The authors' sample.py: ddim_sample_loop(model.forward_with_cfg, ...) on [z; z] with labels [y; null];
    its first half equals our guided DDIM (deterministic, eta = 0) from z."""
    from ditkit.diffusion import create_diffusion, samplers

    torch.manual_seed(1)
    model = ditkit.create_model("DiT-S/8", input_size=8, num_classes=NULL, depth=2, hidden_size=64, num_heads=2)
    for p in model.parameters():
        if p.abs().sum() == 0 and p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    model.eval()
    diffusion = create_diffusion("ddim5")
    z = torch.randn(2, 4, 8, 8)
    y = torch.tensor([1, 8])
    z2, y2 = torch.cat([z, z]), torch.cat([y, torch.full_like(y, NULL)])
    official = diffusion.ddim_sample_loop(
        model.forward_with_cfg, z2.shape, z2, clip_denoised=False, model_kwargs=dict(y=y2, cfg_scale=4.0),
        progress=False, device="cpu",
    )  # fmt: skip
    ours = samplers.ddim(diffusion, guided(model, 4.0, NULL), z, model_kwargs={"y": y})
    torch.testing.assert_close(ours, official[:2], rtol=1e-4, atol=1e-5)
