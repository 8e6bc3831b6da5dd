"""Training-free feature caching for sampling: skip the block stack on some network evaluations.

Neighbouring sampling steps give the transformer nearly the same input, so the change the block stack makes to
its tokens — the residual R = blocks(x) − x — changes slowly. Two ways to skip the stack on a step:

- **reuse** (FORA, Selvaraju et al. 2024; Δ-DiT's idea of caching a stack's residual): run every block on one
  evaluation of every N, keep R, and on the N − 1 evaluations between return x + R (the current tokens plus the
  last residual). `fora-N`.
- **forecast** (TaylorSeer, Liu et al., ICCV 2025): on the full evaluations also keep finite differences of R
  (first order Δ¹ = (R_k − R_{k−1}) / gap, second order the difference of those), and on the skipped ones
  return x + R_k + Δ¹·d + ½Δ²·d², d = evaluations since the last full one. `taylorK-N` (K = 1 or 2).

Each is the stack's residual, not every block's (the patch and label/caption embedders and the final layer
always run: they are a few percent of the cost). The first `warmup` evaluations are always full (the features
change fastest at high noise, and the forecast needs history). The cache state lives for one `Sampler.images`
call (one batch / one shard of `--num-samples`): it starts empty at each shard, so a shard's images depend only
on (seed, shard) and a killed run resumes to the same bytes. A batch whose size changes between evaluations
(a guidance interval's edge: 2N rows → N) is computed in full and starts a new history.

`fora-1` caches nothing (every evaluation is full, through the same hook): its samples are bit-identical to
no cache (tests/test_sample_cache.py).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ditkit.runtime.errors import UserError

# The setting `--cache fast` stands for: chosen by measurement on the demo models (docs/protocols_and_caching.md).
RECOMMENDED = "taylor2-3"
NAMED = ("off", "fast", "fora-1", "fora-2", "fora-3", "fora-4", "taylor1-2", "taylor1-3", "taylor2-3",
         "taylor2-4", "taylor2-5")
_PATTERN = re.compile(r"^(?:fora-(?P<n>\d+)|taylor(?P<order>[12])-(?P<tn>\d+))(?:-w(?P<warmup>\d+))?$")
DEFAULT_WARMUP = 2


@dataclass(frozen=True)
class CacheSetting:
    """A parsed --cache value: full evaluations every `interval`, a forecast of `order` (0 = reuse)."""

    name: str
    interval: int
    order: int
    warmup: int = DEFAULT_WARMUP

    def full_evaluations(self, evaluations: int) -> int:
        """How many of `evaluations` consecutive evaluations (one batch) run the block stack."""
        return sum(1 for i in range(evaluations) if self.is_full(i))

    def is_full(self, index: int) -> bool:
        return index < self.warmup or (index - self.warmup) % self.interval == 0


def parse(name: str | None) -> CacheSetting | None:
    """A --cache value as a setting; None for no cache ("off" or None). One line for a bad name."""
    if name is None or name == "off":
        return None
    spelled = RECOMMENDED if name == "fast" else name
    match = _PATTERN.match(spelled)
    if match is None:
        raise UserError(f"--cache {name!r} is not a cache setting; use off, fast, fora-N or taylorK-N "
                        f"(K = 1 or 2, N >= 1), e.g. {', '.join(NAMED[2:6])}")
    warmup = int(match["warmup"]) if match["warmup"] is not None else DEFAULT_WARMUP
    if match["n"] is not None:
        interval, order = int(match["n"]), 0
    else:
        interval, order = int(match["tn"]), int(match["order"])
    if interval < 1:
        raise UserError(f"--cache {name}: the interval N must be at least 1")
    return CacheSetting(spelled, interval, order, warmup if interval > 1 else 0)


class StackCache:
    """The state of one batch: called by `TokenGrid._run_block` for every block of every evaluation."""

    def __init__(self, setting: CacheSetting, depth: int):
        self.setting, self.depth = setting, depth
        self.position = 0  # the next block's index within the current evaluation
        self.evaluations = 0  # evaluations begun
        self.full = 0  # evaluations that ran the blocks
        self.skip = False
        self.inputs: torch.Tensor | None = None
        self.terms: list[torch.Tensor] = []  # R, Δ¹R, Δ²R at the last full evaluation
        self.last_full: int | None = None  # its index
        self.out_dtype: torch.dtype | None = None

    def run(self, block: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        tokens, position = args[0], self.position
        self.position = (position + 1) % self.depth
        if position == 0:
            self._begin(tokens)
        if self.skip:  # the whole stack is one step on the first block; the others pass the tokens on
            return self._forecast(tokens) if position == 0 else tokens
        out = block(*args)
        if position == self.depth - 1:
            self._record(out)
        return out

    def _begin(self, tokens: torch.Tensor) -> None:
        index = self.evaluations
        self.evaluations += 1
        fits = bool(self.terms) and self.terms[0].shape == tokens.shape
        self.skip = fits and not self.setting.is_full(index)
        if not fits:
            self.terms, self.last_full = [], None  # a new history (first evaluation, or the batch changed)
        if not self.skip:
            self.inputs = tokens
            self.full += 1

    def _record(self, out: torch.Tensor) -> None:
        """Update R and its differences from a full evaluation (the output itself goes on unchanged)."""
        index = self.evaluations - 1
        residual = out - self.inputs
        terms = [residual]
        if self.terms and self.setting.order > 0:
            gap = index - self.last_full
            for k in range(self.setting.order):
                if k >= len(self.terms):
                    break
                terms.append((terms[k] - self.terms[k]) / gap)
        self.terms, self.last_full, self.inputs = terms, index, None
        self.out_dtype = out.dtype  # the stack's output dtype (bf16 on the FP8 path's stream), kept on skipped ones

    def _forecast(self, tokens: torch.Tensor) -> torch.Tensor:
        d = float(self.evaluations - 1 - self.last_full)
        out = tokens + self.terms[0]
        factor = 1.0
        for k, term in enumerate(self.terms[1:], start=1):
            factor *= d / k  # d^k / k!
            out = out + factor * term
        # The first block's input can be a transposed view (the patch embedding); the fused final-layer kernels
        # on a GPU take the contiguous layout that a block's output has.
        return out.to(self.out_dtype).contiguous()


def _networks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The block-stack owners inside `model` (a DiT, a PixArtDiT, or a wrapper holding one)."""
    return [m for m in model.modules() if hasattr(m, "block_cache") and hasattr(m, "blocks")]


@contextlib.contextmanager
def caching(model: torch.nn.Module, setting: CacheSetting | None) -> Iterator[list[StackCache]]:
    """Attach a fresh cache state to `model`'s block stack for one batch, and detach it afterwards."""
    if setting is None:
        yield []
        return
    nets = _networks(model)
    if not nets:
        raise UserError(f"--cache {setting.name}: this model has no DiT block stack to cache")
    states = [StackCache(setting, len(net.blocks)) for net in nets]
    for net, state in zip(nets, states):
        net.block_cache = state
    try:
        yield states
    finally:
        for net in nets:
            net.block_cache = None


def summary(states: list[StackCache]) -> dict[str, Any]:
    """Evaluations begun and those that ran the blocks (the first stack's; one per model)."""
    if not states:
        return {"evaluations": 0, "full": 0}
    return {"evaluations": states[0].evaluations, "full": states[0].full}
