"""Fused GPU paths for the DiT block; the plain PyTorch code in `ditkit.models.dit` is the reference.

- `adaln`: LayerNorm (no affine) + adaLN modulate, alone or after the gated residual, forward and backward.
- `residual`: the adaLN-Zero gated residual x + gate·y, forward and backward.
- `attention`: the SDPA backend (cuDNN / flash / memory-efficient) chosen by measurement.
- `fp8`: the block linears as `Float8Linear` (`--precision fp8`, training and sampling): tensorwise FP8 GEMMs
  with autograd for training; for sampling the weights quantised once, by rows, for `fp8_rows`.
- `fp8_rows`: the sampling FP8 GEMMs (row-wise scales made by the LayerNorm kernels).
- `linear_gelu_tanh`: fc1 with its bias and GELU in the GEMM's epilogue (cuBLASLt), for inference.

Which path a layer takes is the layer's own state, set once by `models.precision.prepare` (its `fused`
attribute: on by default, off for a plain run and inside `forward_mode.plain`); the checks here add what the
tensor decides: the Triton kernels run on CUDA tensors of models at least MIN_WIDTH wide when Triton imports.
The attention backend is measured for every width. CPU tensors always take the plain path. Nothing in this
package is a process-wide switch.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ditkit.models.kernels.fp8 import Float8Linear

# The Triton kernel modules once imported (a tuple, empty when Triton is missing): a cache of an import, which
# decides no path by itself.
_IMPORTED: list[tuple[ModuleType, ...]] = []


def _load() -> tuple[ModuleType, ModuleType] | None:
    """The kernel modules, imported on first use (Triton is only needed where a GPU is); None without Triton."""
    if not _IMPORTED:
        try:
            from ditkit.models.kernels import adaln, residual

            _IMPORTED.append((adaln, residual))
        except ImportError:  # no Triton: the plain path serves
            _IMPORTED.append(())
    return _IMPORTED[0] or None  # type: ignore[return-value]


# Below this width the fused kernels lost to inductor's own fusion on an H200 (DiT-S/2, D=384: 0.87× the plain
# path's images/s; B/2, D=768: 1.07×; XL/2, D=1152: 1.03×; benchmarks/RESULTS.md), so narrow models keep the
# compiled plain path.
MIN_WIDTH = 768


def use_fused(x: torch.Tensor) -> bool:
    """True when x suits the fused kernels (a CUDA tensor at least MIN_WIDTH wide, Triton present); the layer
    asks only when its own `fused` attribute is on."""
    return x.is_cuda and x.shape[-1] >= MIN_WIDTH and _load() is not None


def out_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the block's linears will consume: the autocast dtype when autocast is on, else x's dtype."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _direct() -> bool:
    """True when the fused ops may launch their kernels directly instead of through their torch.library custom
    ops: no gradient is wanted and torch.compile is not tracing. The first call of a custom op that has an
    autograd formula imports torch._dynamo: 3.7 s of every sampling process on the H200 (the first
    gated_residual, measured in a fresh process with Triton's cache warm), 1.3 s on the CPU machine."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Fused LN(x)·(1 + scale) + shift (see `adaln`)."""
    if _direct():
        return _load()[0].forward_only(x.contiguous(), None, None, shift, scale, eps, out_dtype(x))[1]
    return _load()[0].ln_modulate(x.contiguous(), shift, scale, eps, out_dtype(x))


def residual_ln_modulate(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused x' = x + gate·y, then LN(x')·(1 + scale) + shift; returns (x', h)."""
    if _direct():
        return _load()[0].forward_only(x.contiguous(), y, gate, shift, scale, eps, out_dtype(x))[:2]
    return _load()[0].residual_ln_modulate(x.contiguous(), y, gate, shift, scale, eps, out_dtype(x))


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Fused x + gate·y (see `residual`)."""
    if _direct():
        return _load()[1].forward_only(x.contiguous(), y, gate)
    return _load()[1].gated_residual(x.contiguous(), y, gate)


def _gpu_inference(x: torch.Tensor) -> bool:
    """x on CUDA and no gradient wanted: where the forward-only paths apply."""
    return x.is_cuda and not torch.is_grad_enabled()


def use_gelu_epilogue(x: torch.Tensor) -> bool:
    """True when x suits the MLP's fc1 + GELU as one GEMM with a GELU epilogue: CUDA and no gradient (cuBLASLt's
    epilogue has no backward in PyTorch; training keeps fc1 and GELU apart). The MLP asks when its `fused` is on."""
    return _gpu_inference(x)


def plain_linear(module: torch.nn.Module) -> bool:
    """True when module(x) is exactly F.linear(x, W, b): an nn.Linear, or a Float8Linear prepared for sampling
    (its row-wise weights serve the block's FP8 path; called directly it is the plain product)."""
    return type(module) is torch.nn.Linear or (type(module) is Float8Linear and module.rows is not None)


def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU_tanh(x·Wᵀ + b) as one cuBLASLt GEMM: the bias and the activation run in the epilogue on the fp32
    accumulator, so the 4·D-wide hidden activation is written once instead of written, read and written again.
    On CUDA PyTorch's `_addmm_activation` uses GELU's tanh approximation (the Lt epilogue's), which is the DiT
    MLP's own. Autocast does not cover this op, so the operands are cast to the autocast dtype here."""
    dtype = out_dtype(x)
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    out = torch._addmm_activation(bias.to(dtype), x2, weight.to(dtype).t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


def use_fp8_rows(x: torch.Tensor, linear: torch.nn.Module) -> bool:
    """True when a block may run its linears as row-wise FP8 GEMMs: `fp8.enable_fp8(rowwise=True)` quantised
    them, x is on CUDA and no gradient is needed (the row-wise path has no backward). The block asks only when
    its `fused` is on."""
    return isinstance(linear, Float8Linear) and linear.rows is not None and _gpu_inference(x) and _load() is not None


def ln_modulate_rows(
    x: torch.Tensor, y: torch.Tensor | None, gate: torch.Tensor | None, shift: torch.Tensor, scale: torch.Tensor,
    eps: float,
):
    """(x', h as FP8 rows): [x' = x + gate·y, then] LN(x')·(1 + scale) + shift quantised per row (see `adaln`)."""
    from ditkit.models.kernels import fp8_rows

    dtype, top = fp8_rows.ACTIVATIONS, fp8_rows.E4M3_MAX
    x_new, h, s = _load()[0].forward_only(x.contiguous(), y, gate, shift, scale, eps, dtype, top)
    return x_new, fp8_rows.Rows(h, s)


def fp8_stream(x: torch.Tensor) -> torch.Tensor:
    """The residual stream as the FP8 sampling path stores it, contiguous: in `fp8_rows.STREAM` under bf16
    autocast, which `ditkit sample --precision fp8` runs in (with a bf16 STREAM the first block casts the
    embedding's fp32 tokens once, the others get the stream back as they wrote it, and the final layer's linear
    is autocast too); without autocast x keeps its dtype, as every layer after the blocks expects."""
    from ditkit.models.kernels import fp8_rows

    if torch.is_autocast_enabled(x.device.type) and out_dtype(x) == torch.bfloat16:
        x = x.to(fp8_rows.STREAM)
    return x.contiguous()
