"""The authors' Gaussian diffusion as a ditkit objective: the pieces `ditkit.objectives` registers as "diffusion".

- `process_from_flags(opts)`: the recipe's `DiffusionProcess` from `ditkit train`'s flags (checked);
- `build(recipe)`: the `Objective` (training loss, samplers, evaluation counts) of a diffusion recipe.

Its samplers are `ditkit.diffusion.samplers.SAMPLERS` (one signature; adding one is a function and an entry).
"""

from __future__ import annotations

from typing import Any

import torch

from ditkit.objective import Objective
from ditkit.recipe import DiffusionProcess, Recipe
from ditkit.runtime.errors import UserError


def default_steps() -> dict[str, int]:
    """Sampler name -> default `--num-steps`, read from the sampler table (so a registered sampler appears)."""
    from ditkit.diffusion.samplers import SAMPLERS

    return {name: s.default_steps for name, s in SAMPLERS.items()}


def process_from_flags(opts: Any) -> DiffusionProcess:
    """The process of `--objective diffusion`: `--noise-schedule` and `--prediction` (one line for a bad one)."""
    if opts.prediction is not None and opts.prediction not in DiffusionProcess.PREDICTIONS:
        raise UserError(f"--prediction {opts.prediction!r} is not a diffusion prediction; use one of "
                        f"{', '.join(DiffusionProcess.PREDICTIONS)} (or --objective flow)")
    return DiffusionProcess(noise_schedule=opts.noise_schedule, prediction=opts.prediction or "epsilon")


def build(recipe: Recipe) -> Objective:
    """The diffusion objective of `recipe`: its training process is built here, once."""
    from ditkit.diffusion import create_diffusion, samplers

    process = recipe.process
    settings = dict(noise_schedule=process.noise_schedule, learn_sigma=recipe.model.learn_sigma,
                    diffusion_steps=process.diffusion_steps, prediction=process.prediction)

    def sample(denoiser: Any, noise: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return samplers.sample(denoiser, noise, **kwargs, **settings)

    def evaluations(sampler: str, num_steps: int, cfg_scale: float, interval: tuple[float, float] | None) -> int:
        steps = samplers.steps_for(sampler, num_steps, process.diffusion_steps)
        return samplers.model_evaluations(
            create_diffusion(steps, diffusion_steps=process.diffusion_steps), cfg_scale, interval
        )

    return Objective(kind="diffusion", training=create_diffusion("", **settings), sample=sample,
                     default_steps=default_steps(), evaluations=evaluations)
