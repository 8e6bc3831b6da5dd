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

`plain(model)` is the plain path for the JVP pass, set on the model's own layers for the time of the `with`:
every attention module's `backend` is "math" (explicit softmax(QKᵀ/√d)·V: every op of it has a forward-mode
rule; the N×H×T×T probabilities are materialised, 256 tokens for DiT-XL/2 at 256 px), every layer's `fused`
kernel path is off, and compiled blocks run eagerly. `jvp(model, fn, primals, tangents)` is `torch.func.jvp`
inside it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

# What `plain` sets on a layer that has the attribute: the forward-differentiable choice of each.
PLAIN_PATH = {"fused": False, "backend": "math"}
_CLASS_DEFAULT = object()  # marks a layer that read the attribute from its class before `plain`


@contextlib.contextmanager
def plain(model: Any, eager: bool = True) -> Iterator[None]:
    """Within it, `model`'s layers run only ops with forward-mode rules (see the module doc); their own
    settings come back afterwards. `model` that is not an nn.Module (a plain function) has no layers to set.
    `eager=False` leaves torch.compile on, for a caller that compiles the whole `torch.func.jvp` call itself
    (measured in benchmarks/bench_meanflow.py; the training step keeps it eager)."""
    saved = []  # (module, name, its own value, or _CLASS_DEFAULT where it read the class's)
    modules = model.modules() if isinstance(model, nn.Module) else ()
    for module in modules:
        for name, value in PLAIN_PATH.items():
            if isinstance(getattr(module, name, None), type(value)):  # ditkit's layers: a bool / a str
                saved.append((module, name, module.__dict__.get(name, _CLASS_DEFAULT)))
                setattr(module, name, value)
    stance = torch.compiler.set_stance("force_eager") if eager and hasattr(torch.compiler, "set_stance") else None
    try:
        with stance if stance is not None else contextlib.nullcontext():
            yield
    finally:
        for module, name, value in reversed(saved):
            if value is _CLASS_DEFAULT:
                delattr(module, name)
            else:
                setattr(module, name, value)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v for N×H×T×d heads, with an optional boolean mask (True = attend) broadcast to the
    scores: `scaled_dot_product_attention`'s function, written out so that forward mode can differentiate it."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def jvp(model: Any, fn: Callable[..., torch.Tensor], primals: tuple[torch.Tensor, ...],
        tangents: tuple[torch.Tensor, ...]) -> tuple[Any, Any]:
    """(fn(*primals), J_fn(primals)·tangents) through `torch.func.jvp`, with `model` (the network `fn` calls)
    on its forward-differentiable path (`plain`)."""
    with plain(model):
        return torch.func.jvp(fn, primals, tangents)
