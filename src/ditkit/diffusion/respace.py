"""Timestep respacing: a shorter process that visits a subset of the original T steps.

Keeping the steps S ⊂ {0…T−1} and their ᾱ unchanged defines new betas β'_k = 1 − ᾱ_{s_k}/ᾱ_{s_{k−1}}; the
model was trained on the original indices, so it is handed s_k, not k (the reference wraps the model for that;
here `GaussianDiffusion.timestep_map` does it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ditkit.diffusion.gaussian import GaussianDiffusion
from ditkit.runtime.errors import UserError


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> set[int]:
    """The original steps to keep, as the reference chooses them.

    `section_counts`: "250" or [250] (evenly strided over the process), "10,15,20" (the process split into
    equal sections, each strided to its count), or "ddimN" (the DDIM paper's integer stride 0, k, 2k, … giving
    exactly N steps). Fractional strides are rounded per step, as the reference does.
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            try:
                desired = int(text[len("ddim") :])
            except ValueError:
                raise UserError(
                    f"bad respacing {section_counts!r}: write ddimN with an integer N, e.g. ddim50"
                ) from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise UserError(
                f"cannot make exactly {desired} DDIM steps out of {num_timesteps} with an integer stride; "
                'use a plain count like "50" instead'
            )
        try:
            section_counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise UserError(
                f"bad respacing {section_counts!r}: use a count (250), section counts (10,15,20) or ddimN"
            ) from None
    counts = list(section_counts)
    if not counts or any(c < 1 for c in counts):
        raise UserError(f"bad respacing {section_counts!r}: every section needs at least one step")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise UserError(f"cannot take {count} steps from a section of {size} steps (T={num_timesteps})")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Python's round() (banker's rounding on .5) is part of the reference's choice of steps.
        steps += [start + round(stride * k) for k in range(count)] if count > 1 else [start]
        start += size
    return set(steps)


def respaced_betas(alphas_cumprod: np.ndarray, use_timesteps: Iterable[int]) -> tuple[np.ndarray, list[int]]:
    """(new betas, kept original indices in increasing order) keeping ᾱ at the kept steps."""
    keep = set(use_timesteps)
    last, betas, kept = 1.0, [], []
    for i, alpha_bar in enumerate(alphas_cumprod):
        if i in keep:
            betas.append(1.0 - alpha_bar / last)
            last = alpha_bar
            kept.append(i)
    return np.array(betas, dtype=np.float64), kept


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over the steps `use_timesteps` of the process defined by `betas`.

    `num_timesteps` is the number of kept steps; `timestep_map[k]` is the original index of step k;
    `original_num_steps` is T of the base process.
    """

    def __init__(self, use_timesteps: Iterable[int], *, betas: np.ndarray, **kwargs):
        base = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = len(base)
        new_betas, kept = respaced_betas(base, self.use_timesteps)
        super().__init__(betas=new_betas, timestep_map=kept, **kwargs)


def respace(diffusion: GaussianDiffusion, use_timesteps: Iterable[int]) -> SpacedDiffusion:
    """`diffusion` (a full, unspaced process) restricted to the given original timesteps."""
    return SpacedDiffusion(
        use_timesteps,
        betas=diffusion.betas,
        mean_type=diffusion.mean_type,
        var_type=diffusion.var_type,
        loss_type=diffusion.loss_type,
    )
