"""Forward-mode differentiation (Jacobian-vector products) through ditkit's networks.

MeanFlow's target needs du/dt = J·(v, 0, 1), the network's directional derivative along its inputs. PyTorch
computes it with `torch.func.jvp`, which needs a forward-mode rule for every op the forward pass runs. Three of
the ops ditkit's DiT uses on its fast paths have none:

- `scaled_dot_product_attention`: none of its fused backends (flash, memory-efficient, cuDNN, and the CPU flash
  kernel) has a forward-mode formula in PyTorch 2.13;
- the fused Triton adaLN kernels (`models/kernels`): custom ops with a backward but no forward-mode rule; on the
  no-gradient path they launch directly and would drop the tangent;
- compiled blocks (`ditkit.runtime.fast.compile_blocks`): dynamo does not trace a `torch.func.jvp` transform it is
  called inside.

`forward_mode()` is the plain path for the JVP pass: attention as explicit softmax(QKᵀ/√d)·V (every op of it has
a forward-mode rule; the N×H×T×T probabilities are materialised, 256 tokens for DiT-XL/2 at 256 px), the fused
kernels off and compiled blocks run eagerly. `jvp(fn, primals, tangents)` is `torch.func.jvp` inside it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ditkit.models import kernels

_STATE = {"depth": 0}


def active() -> bool:
    """True inside `forward_mode()`: the model's layers take their forward-differentiable path."""
    return _STATE["depth"] > 0


@contextlib.contextmanager
def forward_mode(eager: bool = True) -> Iterator[None]:
    """Within it, ditkit's networks run only ops with forward-mode rules (see the module doc). `eager=False`
    leaves torch.compile on, for a caller that compiles the whole `torch.func.jvp` call itself (measured in
    benchmarks/bench_meanflow.py; the training step keeps it eager)."""
    fused = kernels.fused_enabled()
    kernels.set_fused(False)
    _STATE["depth"] += 1
    stance = torch.compiler.set_stance("force_eager") if eager and hasattr(torch.compiler, "set_stance") else None
    try:
        with stance if stance is not None else contextlib.nullcontext():
            yield
    finally:
        _STATE["depth"] -= 1
        kernels.set_fused(fused)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v for N×H×T×d heads, with an optional boolean mask (True = attend) broadcast to the
    scores: `scaled_dot_product_attention`'s function, written out so that forward mode can differentiate it."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def jvp(fn: Callable[..., torch.Tensor], primals: tuple[torch.Tensor, ...],
        tangents: tuple[torch.Tensor, ...]) -> tuple[Any, Any]:
    """(fn(*primals), J_fn(primals)·tangents) through `torch.func.jvp` on the forward-differentiable path."""
    with forward_mode():
        return torch.func.jvp(fn, primals, tangents)
