"""What an objective gives the rest of ditkit (`Objective`), apart from the table of them (`ditkit.objectives`), so
that the objective modules (`ditkit.diffusion.objective`, `ditkit.transport.objective`) can build one without
importing the table that imports them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ditkit.runtime.errors import UserError

SampleFn = Callable[..., torch.Tensor]


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
