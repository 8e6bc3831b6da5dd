"""Helpers for the fast path on a GPU: regional torch.compile of the DiT blocks and the settings it needs.

Compiling the whole DiT makes inductor trace and compile all 28 blocks of an XL model as one graph, which
takes minutes; the blocks are identical code, so compiling each block (`compile_blocks`) makes dynamo compile
ONE block graph per input shape and reuse it for every block ("regional compilation"). Inside a block
inductor still fuses what matters: the LayerNorm with the adaLN modulate, GELU into its neighbours, the
gated residual adds. The embedders, the final layer and the loss stay eager; they are a few percent of the
work.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Each (model size, batch, grad mode) is a new shape for the one block code object; the default limit of 8
# recompiles per code object would silently fall back to eager after a few configs.
CACHE_SIZE_LIMIT = 256


def configure_compile(cache_size_limit: int = CACHE_SIZE_LIMIT) -> None:
    """Raise dynamo's recompile limits so that many shapes of the same block all stay compiled."""
    config = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit"):  # renamed in newer torch; set whichever exists
        if hasattr(config, name):
            setattr(config, name, max(int(getattr(config, name)), cache_size_limit))
    if hasattr(config, "accumulated_cache_size_limit"):
        config.accumulated_cache_size_limit = max(
            int(config.accumulated_cache_size_limit), cache_size_limit * 4
        )


def compile_blocks(
    model: nn.Module,
    *,
    mode: str | None = None,
    backend: str = "inductor",
    dynamic: bool | None = False,
    fullgraph: bool = False,
) -> nn.Module:
    """Compile each transformer block of `model` in place (state_dict keys unchanged); returns `model`.

    dynamic=False compiles one static-shape graph per batch size (faster kernels than a dynamic-shape graph,
    which dynamo would otherwise switch to at the second batch size). `backend="eager"` runs dynamo's
    tracing only, which checks on a CPU that the block compiles without graph breaks (with fullgraph=True).
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError("compile_blocks needs a model with a non-empty `blocks` ModuleList (a DiT)")
    configure_compile()
    kwargs: dict[str, Any] = {"backend": backend, "dynamic": dynamic, "fullgraph": fullgraph}
    if mode is not None:
        kwargs["mode"] = mode
    for block in blocks:
        block.compile(**kwargs)
    return model
