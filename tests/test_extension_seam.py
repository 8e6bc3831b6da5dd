"""The objective and sampler seam, used as a user outside the package would: a toy diffusion sampler and a toy
objective are registered without editing ditkit, then trained and sampled through the CLI code paths."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from ditkit.cli import main
from ditkit.diffusion import create_diffusion, samplers
from ditkit.objective import Objective
from ditkit.objectives import OBJECTIVES, ObjectiveEntry, register_objective
from ditkit.recipe import PROCESSES
from ditkit.runtime.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--data-path", "digits", "--model", "DiT-S/2", "--image-size", "8", "--num-workers", "0", "--no-progress",
        "--global-batch-size", "8", "--log-every", "1"]


def toy_ddim(diffusion, model, noise, *, model_kwargs=None, clip_denoised=False, generator=None, progress=False,
             eta=0.0):
    """A sampler written outside ditkit: deterministic DDIM steps through the process's public step."""
    x = noise
    for i in reversed(range(diffusion.num_timesteps)):
        t = torch.full((len(x),), i, dtype=torch.long)
        x = diffusion.ddim_sample(model, x, t, clip_denoised, model_kwargs=model_kwargs)["sample"]
    return x


@pytest.fixture
def toy_sampler():
    samplers.register_sampler("toy-ddim", toy_ddim, default_steps=7)
    yield "toy-ddim"
    del samplers.SAMPLERS["toy-ddim"]


def test_a_registered_sampler_matches_the_builtin_it_reimplements(toy_sampler):
    torch.manual_seed(0)
    model = lambda x, t, **kw: 0.3 * x + 0.01 * t.float()[:, None, None, None]  # noqa: E731
    noise = torch.randn(2, 1, 4, 4)
    ours = samplers.sample(model, noise, sampler=toy_sampler, num_steps=7, learn_sigma=False)
    respaced = create_diffusion(samplers.steps_for(toy_sampler, 7), learn_sigma=False)  # evenly spaced 7
    theirs = samplers.ddim(respaced, model, noise)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_a_registered_sampler_runs_through_ditkit_sample(toy_sampler, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--max-steps", "1", "--ckpt-every", "1", "--results-dir", str(run)]) == 0
    ckpt = next((run / "checkpoints").iterdir())
    args = ["sample", "--ckpt", str(ckpt), "--class-labels", "1", "2", "--per-label", "2", "--no-progress"]
    capsys.readouterr()
    assert main([*args, "--sampler", toy_sampler, "--out", str(tmp_path / "a")]) == 0
    # Its default step count and evaluation count came from its table entry and the process.
    assert "diffusion toy-ddim 7 steps, cfg 4 on 3 channels: 14 model evaluations" in capsys.readouterr().out
    assert (tmp_path / "a" / "grid.png").stat().st_size > 0
    assert main([*args, "--sampler", toy_sampler, "--num-steps", "1", "--out", str(tmp_path / "b")]) == 2


@dataclass(frozen=True)
class ToyProcess:
    """x0 prediction from x_t = (1 − t)·x0 + t·ε, continuous t: a process ditkit does not know."""

    kind: ClassVar[str] = "toy"
    noise_scale: float = 1.0

    def validate(self) -> None:
        if not self.noise_scale > 0:
            raise UserError("recipe: process.noise_scale must be > 0")


class ToyTraining:
    num_timesteps = None  # continuous time: the step draws uniform t in [0, 1)

    def __init__(self, scale: float):
        self.scale = scale

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        x_t = (1 - t)[:, None, None, None] * x_start + self.scale * t[:, None, None, None] * noise
        out = model(x_t, t * 999, **(model_kwargs or {}))[:, : x_start.shape[1]]
        mse = ((out - x_start) ** 2).mean(dim=(1, 2, 3))
        return {"loss": mse, "mse": mse}


def build_toy(recipe) -> Objective:
    training = ToyTraining(recipe.process.noise_scale)

    def sample(denoiser, noise, *, sampler, num_steps, model_kwargs=None, **_):
        t = torch.full((len(noise),), 999.0)
        return denoiser(noise * recipe.process.noise_scale, t, **(model_kwargs or {}))[:, : noise.shape[1]]

    return Objective(kind="toy", training=training, sample=sample, default_steps={"one-shot": 1},
                     evaluations=lambda sampler, n, cfg, interval: 2 if cfg != 1.0 else 1)


@pytest.fixture
def toy_objective():
    register_objective(ObjectiveEntry(
        "toy", ToyProcess, build_toy, lambda opts: ToyProcess(), lambda: {"one-shot": 1}, preview=("one-shot", 1),
        help="a test's toy", flags={}))
    yield "toy"
    del OBJECTIVES["toy"], PROCESSES["toy"]


def test_a_registered_objective_trains_records_resumes_and_samples(toy_objective, tmp_path):
    run = tmp_path / "run"
    common = ["train", *TINY, "--objective", toy_objective, "--ckpt-every", "2", "--results-dir", str(run)]
    assert main([*common, "--max-steps", "2"]) == 0
    assert main([*common, "--max-steps", "3", "--resume", "auto"]) == 0
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    from safetensors import safe_open

    with safe_open(str(ckpt / "ema.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["recipe"])["process"] == {"kind": "toy", "noise_scale": 1.0}
    out = tmp_path / "grid"
    assert main(["sample", "--ckpt", str(ckpt), "--class-labels", "3", "--per-label", "2", "--no-progress",
                 "--out", str(out)]) == 0
    assert (out / "grid.png").stat().st_size > 0
    # The table's samplers are per objective: a diffusion sampler is refused on the toy model, in one line.
    assert main(["sample", "--ckpt", str(ckpt), "--sampler", "ddpm", "--no-progress", "--out", str(out)]) == 2
