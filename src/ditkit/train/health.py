"""Which checkpoint is "the last good one" after a NaN, and advice that works when followed (issue 30, class 6).

The rule (one, simple, stated in the message):

    A checkpoint at step s is good when (1) its weights, EMA weights and optimizer state are all finite, and
    (2) the first logging window that trained from its weights (the next one logged after s) had a finite mean
    loss at most `EXPLODING` (10) times the lowest window mean logged so far in this run.

(2) looks after the checkpoint, not before it: the loss logged at step s was computed with the weights of the
steps before s, so a checkpoint written just after a bad update would pass a look backwards. Until that window
is logged a checkpoint is pending; a NaN before then leaves it out. A run resumed from a checkpoint treats it
the same way.

Following the advice (`--resume GOOD --lr LR/10`) continues from GOOD; the newer checkpoints of the diverged
run are renamed `STEP.superseded` (kept, never deleted) so that a later `--resume auto` does not pick them up.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ditkit.runtime.errors import UserError

EXPLODING = 10.0  # a window mean this many times the run's lowest is "exploding"
SUPERSEDED = ".superseded"


def all_finite(*states: Any) -> bool:
    """Whether every floating-point tensor in `states` (nested dicts / lists of tensors) is finite."""
    stack = list(states)
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if item.is_floating_point() and item.numel() and not bool(torch.isfinite(item).all()):
                return False
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return True


def window_ok(loss: float, lowest: float | None) -> bool:
    """Rule (2) for one logging window mean `loss`, given the lowest window mean logged before it."""
    if loss != loss or loss in (float("inf"), float("-inf")):
        return False
    return lowest is None or loss <= EXPLODING * max(lowest, 1e-12)


class GoodCheckpoints:
    """The rule's bookkeeping on rank 0: checkpoints waiting for their window, and the last confirmed good."""

    def __init__(self, resumed_from: Path | None = None) -> None:
        self.pending: list[tuple[int, Path]] = []
        self.last_good: Path | None = None
        self.lowest: float | None = None
        if resumed_from is not None:
            self.pending.append((_step_of(resumed_from), Path(resumed_from)))

    def saved(self, step: int, path: Path, finite: bool) -> None:
        """A checkpoint was written at `step`; rule (1) is `finite`."""
        if finite:
            self.pending.append((step, path))

    def logged(self, step: int, loss: float) -> None:
        """A window ending at `step` (its losses trained from the weights of steps < `step`) had mean `loss`."""
        ok = window_ok(loss, self.lowest)
        used = [(s, p) for s, p in self.pending if s < step]
        self.pending = [(s, p) for s, p in self.pending if s >= step]
        if ok and used:
            self.last_good = used[-1][1]
        if loss == loss and abs(loss) != float("inf"):
            self.lowest = loss if self.lowest is None else min(self.lowest, loss)

    def protected(self) -> list[Path]:
        """Checkpoints that pruning (`--keep-last`) must leave: the last good one and the newest pending one (all
        pending checkpoints are judged by the same next window, so only the newest can become the last good)."""
        return [p for p in (self.last_good, self.pending[-1][1] if self.pending else None) if p is not None]


def _step_of(path: Path) -> int:
    try:
        return int(Path(path).name)
    except ValueError:
        return 0


def nonfinite_advice(bad_step: int, last_good: Path | None, lr: float, results: Path) -> UserError:
    """The one-line error after a NaN/Inf loss or gradient, with advice that works when followed."""
    lower = f"{lr / 10:g}"
    rule = "finite weights and optimizer state, and the loss of the steps after it finite and not exploding"
    if last_good is not None:
        return UserError(
            f"the loss or gradient became NaN/Inf at step {bad_step}; training stopped. The last good checkpoint "
            f"({rule}) is {last_good}: resume from it with --resume {last_good} --lr {lower} (or add "
            "--grad-clip 1.0 or --skip-nonfinite)"
        )
    return UserError(
        f"the loss or gradient became NaN/Inf at step {bad_step}; training stopped, and no checkpoint of this run "
        f"is good ({rule}); start again with a lower --lr, e.g. --lr {lower}, and another --results-dir than "
        f"{results}"
    )


def supersede_newer(ckpt_dir: Path, step: int, listed: Iterable[Path]) -> str | None:
    """Rename the checkpoints after `step` to `STEP.superseded` (a run continued from an earlier checkpoint);
    returns the line to log, or None when there were none."""
    newer = [p for p in listed if _step_of(p) > step]
    for path in newer:
        target, n = path.with_name(path.name + SUPERSEDED), 1
        while target.exists():  # superseded once already (a second divergence)
            target, n = path.with_name(f"{path.name}{SUPERSEDED}-{n}"), n + 1
        os.replace(path, target)
    if not newer:
        return None
    return (f"continuing from step {step}: the later checkpoint(s) {', '.join(p.name for p in newer)} in {ckpt_dir} "
            f"were renamed *{SUPERSEDED} (kept, not deleted) so that --resume auto does not return to them")
