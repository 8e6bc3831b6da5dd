"""Options that cannot apply are refused; options that apply on resume are applied and logged (issue 30, class 5).

A flag the run silently ignores is worse than an error: `--prompt` on a class-conditional checkpoint wrote a
class grid and exited 0, a flow `--guidance-interval 0.2 1.5` (flow time runs 0..1) was accepted, and `--lr`
given with `--resume auto` was overwritten by the checkpoint's optimizer state while the log showed the old
value. The rules:

- a flag choosing what to sample for the other conditioning kind (`--prompt`, `--prompt-file`,
  `--negative-prompt` on a class model; `--class-labels`, `--num-classes` on a text model) is refused in one line
  naming it;
- `--eta` (DDIM's noise) with another sampler is refused;
- `--guidance-interval` is checked against the model's own time axis: diffusion timesteps 0..T-1 (T from the
  recipe), flow time 0..1;
- `--lr` on resume is applied from the resumed step on, and the change is logged (the same `--lr` as before
  resumes bit-exactly, as always).
"""

from __future__ import annotations

import math
from typing import Any

from ditkit.runtime.errors import UserError

# What to sample, for text models. (--text-encoder and --max-tokens only say how to load one: `ditkit serve` passes
# them for every checkpoint of a folder, class models included, so they are not refused.)
TEXT_FLAGS = ("prompt", "prompt_file", "negative_prompt")
CLASS_FLAGS = ("class_labels", "num_classes")


def _given(args: Any, names: tuple[str, ...]) -> list[str]:
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) not in (None, [], ())]


def conditioning_flags(args: Any, is_text: bool) -> None:
    """Refuse sampling flags that the checkpoint's conditioning cannot use."""
    if not is_text and (given := _given(args, TEXT_FLAGS)):
        raise UserError(f"{given[0]} applies to text models, but this checkpoint is class-conditional; use "
                        "--class-labels to choose what to sample, or give a text model's checkpoint")
    if is_text and (given := _given(args, CLASS_FLAGS)):
        raise UserError(f"{given[0]} applies to class-conditional models, but this checkpoint is a text model; "
                        "use --prompt or --prompt-file")


def sampler_flags(args: Any, sampler: str) -> None:
    """Refuse sampler settings the chosen sampler has no use for (`--eta` is DDIM's noise)."""
    eta = float(getattr(args, "eta", 0.0) or 0.0)
    if eta != 0.0 and sampler != "ddim":
        raise UserError(f"--eta {eta:g} applies to --sampler ddim only (this run samples with {sampler}); drop it "
                        "or pass --sampler ddim")


def guidance_interval(interval: Any, kind: str, diffusion_steps: int = 1000) -> None:
    """`--guidance-interval T_LO T_HI` on the model's time axis: diffusion timesteps 0..T-1, flow time 0..1."""
    if not interval:
        return
    lo, hi = interval
    top = 1.0 if kind == "flow" else float(diffusion_steps - 1)
    axis = "flow time t in 0..1 (1 = data)" if kind == "flow" else f"diffusion timesteps in 0..{int(top)}"
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi <= top):
        raise UserError(f"--guidance-interval takes two values T_LO <= T_HI of the {axis} for this {kind} model; "
                        f"got {lo:g} {hi:g}")


def resumed_lr(optimizer: Any, lr: float) -> str | None:
    """Set `lr` on an optimizer whose state was just restored from a checkpoint (which carries the old rate);
    returns the line to log when the rate changed, None when it is the same."""
    old = optimizer.param_groups[0]["lr"]
    if old == lr:
        return None
    for group in optimizer.param_groups:
        group["lr"] = lr
    return f"--lr {lr:g} applied from the resumed step on (the checkpoint was trained at {old:g})"
