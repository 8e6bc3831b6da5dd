"""Feature caching (`ditkit sample --cache`, ditkit.sample.cache): a setting that caches nothing is bit-identical
to no cache, the reuse and forecast formulas, the evaluation counts, and SIGKILL-resume of a cached run."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

import ditkit
from ditkit.models.config import DiTConfig
from ditkit.objectives import objective_for
from ditkit.recipe import FlowProcess, infer_recipe
from ditkit.runtime.errors import UserError
from ditkit.sample import Sampler
from ditkit.sample import cache as sc

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    for p in model.parameters():  # random zero-initialised layers, so that every block changes the tokens
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def class_model() -> ditkit.DiT:
    torch.manual_seed(0)
    return _randomised(ditkit.create_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, depth=3,
                                           hidden_size=32, num_heads=2))


def text_model() -> torch.nn.Module:
    from ditkit.models import build_model

    torch.manual_seed(0)
    config = DiTConfig(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=3,
                       conditioning="text", caption_channels=16, max_tokens=5)
    return _randomised(build_model(config))


class Counter:
    def __init__(self, net):
        self.calls = self.full = 0
        net.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))
        net.blocks[0].register_forward_pre_hook(lambda *_: setattr(self, "full", self.full + 1))


def _images(model, cache, text=False, **kw):
    recipe = kw.pop("recipe", None)
    sampler = Sampler(model=model, vae=None, cache=cache, recipe=recipe, **kw)
    gen = torch.Generator().manual_seed(5)
    if text:
        feats = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(1))
        mask = torch.ones(4, 5, dtype=torch.bool)
        mask[1, 3:] = False
        return sampler.images(feats, gen, mask)
    return sampler.images(torch.tensor([1, 4, 7, 9]), gen)


@pytest.mark.parametrize("kind", ["diffusion", "flow", "text"])
def test_a_setting_that_caches_nothing_is_bit_identical_and_caching_counts(kind):
    text = kind == "text"
    model = text_model() if text else class_model()
    settings = dict(sampler="ddpm", num_steps=12, cfg_scale=2.0, guide_channels="all")
    if kind == "flow":
        settings = dict(sampler="heun", num_steps=6, cfg_scale=2.0, guide_channels="all",
                        recipe=infer_recipe(model.config).replace(process=FlowProcess()))
    plain = _images(model, None, text, **settings)
    assert torch.equal(_images(model, "fora-1", text, **settings), plain)  # every evaluation full, same hook
    counter = Counter(model)
    cached = _images(model, "taylor2-3", text, **settings)
    calls = counter.calls
    assert calls == 12  # DDPM 12 steps, or Heun 6 steps of 2 evaluations
    assert counter.full == sc.parse("taylor2-3").full_evaluations(calls) < calls
    assert not torch.equal(cached, plain)
    assert model.block_cache is None  # detached after the batch


def test_reuse_and_forecast_formulas_on_a_known_residual():
    """A one-block 'stack' whose residual is linear in the evaluation index: reuse returns the last residual,
    the first-order forecast extrapolates it exactly (the backward difference of a line is its slope)."""
    index = [0]
    slope, offset = torch.tensor([0.5, -2.0]), torch.tensor([1.0, 3.0])

    def block(x):
        return x + offset + slope * index[0]

    for name, exact in (("fora-3", False), ("taylor1-3", True), ("taylor2-3", True)):
        state = sc.StackCache(sc.parse(name), depth=1)
        last_full = None
        for i in range(12):
            index[0] = i
            x = torch.full((2,), float(i * i))  # any input: the residual is added to it
            out = state.run(block, (x,))
            if sc.parse(name).is_full(i):
                last_full = i
                assert torch.equal(out, block(x))
            elif exact:
                assert torch.allclose(out, block(x), atol=1e-5), (name, i)
            else:
                assert torch.allclose(out, x + offset + slope * last_full), (name, i)
        assert state.full == sc.parse(name).full_evaluations(12)


def test_cache_names_and_the_goal_count(capsys):
    from ditkit.cli import main

    assert main(["sample", "--ckpt", "missing.pt", "--cache", "bogus", "--no-progress"]) == 2  # before any read
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cache 'bogus' is not a cache setting" in err[0]
    assert sc.parse("off") is None and sc.parse(None) is None
    assert sc.parse("fast").name == sc.RECOMMENDED
    assert sc.parse("fora-1").full_evaluations(250) == 250
    # DDPM-250: the recommended setting runs the blocks on at most half the evaluations
    assert sc.parse("fast").full_evaluations(250) * 2 <= 250
    with pytest.raises(UserError, match="not a cache setting"):
        sc.parse("fora")
    with pytest.raises(UserError, match="at least 1"):
        sc.parse("fora-0")


def test_a_guidance_interval_changes_the_batch_and_restarts_the_history():
    model = class_model()
    # diffusion timesteps 0..999: guided (2N rows) only for t <= 400, so the batch halves then doubles
    settings = dict(sampler="ddim", num_steps=10, cfg_scale=2.0, guide_channels="all", interval=(0, 400))
    counter = Counter(model)
    _images(model, "fora-2", **settings)
    assert counter.calls == 10 and counter.full > sc.parse("fora-2").full_evaluations(10)  # a full one at the edge
    assert torch.equal(_images(model, "fora-1", **settings), _images(model, None, **settings))
    assert objective_for(infer_recipe(model.config)).kind == "diffusion"


@pytest.mark.slow
def test_a_cached_run_resumes_after_sigkill_to_the_same_bytes(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from soak_kill import SampleJob, kill_loop, run_in_process

    class CachedSampleJob(SampleJob):
        def command(self, work):
            return [*super().command(work), "--cache", "taylor2-3", "--cfg-scale", "2"]

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.safetensors"
    ditkit.save_model(class_model(), ckpt)
    job = CachedSampleJob(ckpt, num_samples=24, batch_size=4, steps=25)
    run_in_process(job, tmp_path / "reference")
    report = kill_loop(job, tmp_path / "killed", tmp_path / "reference", kills=2, rng=random.Random(3),
                       max_delay=4.0)
    assert report.kills >= 1, "the job finished before it could be killed"
    assert not report.unreadable and not report.data_lost
    assert report.final_equal, "the resumed cached run differs from the uninterrupted one"
