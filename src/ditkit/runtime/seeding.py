"""Seeds: how one user seed becomes the many generators of a run, written once.

A run's randomness is a function of (seed, k) only, where k is a shard index, an epoch or an optimizer step: the
same numbers on any number of GPUs, after any resume. `seed · SEED_STRIDE + k` keeps every (seed, k) pair
distinct for k below the stride, and stays within torch's 64-bit seeds for every seed up to `MAX_SEED`.
"""

from __future__ import annotations

import torch

SEED_STRIDE = 1_000_003  # a prime above any shard, epoch or step count of one run's seed
MAX_SEED = 2**32 - 1  # seed · SEED_STRIDE + k must fit torch's 64-bit seeds


def derived_seed(seed: int, k: int) -> int:
    """The seed of stream `k` (a shard, an epoch, a step) of the run seeded by `seed`."""
    return seed * SEED_STRIDE + k


def generator(seed: int, k: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on `device` seeded for stream `k` of the run seeded by `seed`."""
    return torch.Generator(device=device).manual_seed(derived_seed(seed, k))
