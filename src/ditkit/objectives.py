"""The seam between a recipe's process and the code that trains and samples it, keyed by `recipe.process.kind`.

An `Objective` gives (a) the training loss for `ditkit.train.step` — `training_losses(model, x_start, t,
model_kwargs, noise)` with `num_timesteps` saying how `t` is drawn (integers 0…T−1, or None: uniform floats in
[0, 1) that the objective maps to its own time) — and (b) the samplers for `ditkit sample` and the in-training
grids, all with one signature. Adding an objective (flow matching, issue 15) is one builder in `OBJECTIVES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ditkit.errors import UserError
from ditkit.recipe import Recipe
from ditkit.transport.meanflow import MEANFLOW_SAMPLERS
from ditkit.transport.objective import FLOW_SAMPLERS

SampleFn = Callable[..., torch.Tensor]

# kind -> sampler name -> default number of steps; the first sampler is the kind's default.
SAMPLERS: dict[str, dict[str, int]] = {"diffusion": {"ddpm": 250, "ddim": 50, "dpm-solver": 20}, "flow": FLOW_SAMPLERS,
                                       "meanflow": MEANFLOW_SAMPLERS}


@dataclass(frozen=True)
class Objective:
    """What train and sample need from a process.

    `training`: an object with `num_timesteps` (int, or None for continuous time) and `training_losses(model,
    x_start, t, model_kwargs=None, noise=None)` → dict with "loss" (N) and optionally "mse", "vb".
    `sample(denoiser, noise, *, sampler, num_steps, model_kwargs, eta, clip_denoised, generator, progress)`:
    samples from x_T = noise. `default_steps`: sampler name → default step count (its keys are the samplers).
    `evaluations(sampler, num_steps, cfg_scale, interval)`: network evaluations per image.
    """

    kind: str
    training: Any
    sample: SampleFn
    default_steps: Mapping[str, int]
    evaluations: Callable[[str, int, float, tuple[float, float] | None], int]

    @property
    def samplers(self) -> tuple[str, ...]:
        return tuple(self.default_steps)

    @property
    def default_sampler(self) -> str:
        return self.samplers[0]

    def check_sampler(self, sampler: str, num_steps: int) -> None:
        """One line for a sampler this process has not, or a step count it cannot take."""
        if sampler not in self.default_steps:
            raise UserError(
                f"sampler {sampler!r} does not apply to a {self.kind} model; use one of: {', '.join(self.samplers)}"
            )
        self.evaluations(sampler, num_steps, 1.0, None)  # validates the step count


def _diffusion(recipe: Recipe) -> Objective:
    from ditkit.diffusion import create_diffusion, samplers

    process = recipe.process
    settings = dict(
        noise_schedule=process.noise_schedule,
        learn_sigma=recipe.model.learn_sigma,
        diffusion_steps=process.diffusion_steps,
        prediction=process.prediction,
    )

    def sample(denoiser: Any, noise: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return samplers.sample(denoiser, noise, **kwargs, **settings)

    def evaluations(sampler: str, num_steps: int, cfg_scale: float, interval: tuple[float, float] | None) -> int:
        steps = samplers.steps_for(sampler, num_steps, process.diffusion_steps)
        return samplers.model_evaluations(
            create_diffusion(steps, diffusion_steps=process.diffusion_steps), cfg_scale, interval
        )

    return Objective(
        kind="diffusion",
        training=create_diffusion("", **settings),
        sample=sample,
        default_steps=SAMPLERS["diffusion"],
        evaluations=evaluations,
    )


def _flow(recipe: Recipe) -> Objective:
    from ditkit.transport import create_transport
    from ditkit.transport import objective as flow

    p = recipe.process
    transport = create_transport(p.path_type, p.prediction, p.loss_weight, p.train_eps, p.sample_eps, p.t_sampling)

    def sample(denoiser: Any, noise: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return flow.sample(denoiser, noise, transport=transport, **kwargs)

    return Objective(kind="flow", training=flow.FlowTraining(transport), sample=sample,
                     default_steps=FLOW_SAMPLERS, evaluations=flow.evaluations)


def _meanflow(recipe: Recipe) -> Objective:
    from ditkit.transport import meanflow

    meanflow.check_model(recipe)
    return Objective(kind="meanflow", training=meanflow.MeanFlowTraining(recipe.process), sample=meanflow.sample,
                     default_steps=MEANFLOW_SAMPLERS, evaluations=meanflow.evaluations)


OBJECTIVES: dict[str, Callable[[Recipe], Objective]] = {"diffusion": _diffusion, "flow": _flow, "meanflow": _meanflow}


def objective_for(recipe: Recipe) -> Objective:
    """The objective of `recipe.process` (one line when this ditkit has none for its kind)."""
    build = OBJECTIVES.get(recipe.process.kind)
    if build is None:
        raise UserError(
            f"this ditkit cannot train or sample a {recipe.process.kind!r} process yet; known: {', '.join(OBJECTIVES)}"
        )
    return build(recipe)


def sampler_names() -> tuple[str, ...]:
    """Every sampler name of every objective (the `--sampler` choices)."""
    return tuple(dict.fromkeys(name for steps in SAMPLERS.values() for name in steps))
