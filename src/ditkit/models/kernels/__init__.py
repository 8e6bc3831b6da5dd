"""Fused GPU paths for the DiT block; the plain PyTorch code in `ditkit.models.dit` is the reference.

- `adaln`: LayerNorm (no affine) + adaLN modulate, alone or after the gated residual, forward and backward.
- `residual`: the adaLN-Zero gated residual x + gate·y, forward and backward.
- `attention`: the SDPA backend (cuDNN / flash / memory-efficient) chosen by measurement.
- `fp8`: FP8 GEMMs for the block linears in training (`--precision fp8`; tensorwise scales, autograd).
- `fp8_rows`: FP8 GEMMs for the block linears in sampling (`--precision fp8`; row-wise scales made by the
  LayerNorm kernels, weights quantised once).
- `linear_gelu_tanh`: fc1 with its bias and GELU in the GEMM's epilogue (cuBLASLt), for inference.

The Triton kernels are used on CUDA tensors of models at least MIN_WIDTH wide when Triton imports and
`set_fused(False)` (or the environment variable DITKIT_FUSED=0) has not turned them off; the attention backend
is measured for every width. CPU tensors always take the plain path.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

_STATE: dict[str, object] = {"enabled": os.environ.get("DITKIT_FUSED", "1") != "0", "modules": None}


def set_fused(enabled: bool) -> None:
    """Turn the fused Triton kernels (and the measured attention backend) on or off for CUDA tensors."""
    _STATE["enabled"] = bool(enabled)


def fused_enabled() -> bool:
    """Whether the fused path is switched on (it still applies to CUDA tensors only)."""
    return bool(_STATE["enabled"])


def _load() -> tuple[ModuleType, ModuleType] | None:
    """The kernel modules, imported on first use (Triton is only needed where a GPU is)."""
    if _STATE["modules"] is None:
        try:
            from ditkit.models.kernels import adaln, residual

            _STATE["modules"] = (adaln, residual)
        except ImportError:  # no Triton: the plain path serves
            _STATE["modules"] = ()
    return _STATE["modules"] or None  # type: ignore[return-value]


# Below this width the fused kernels lost to inductor's own fusion on an H200 (DiT-S/2, D=384: 0.87× the plain
# path's images/s; B/2, D=768: 1.07×; XL/2, D=1152: 1.03×; benchmarks/RESULTS.md), so narrow models keep the
# compiled plain path.
MIN_WIDTH = 768


def use_fused(x: torch.Tensor) -> bool:
    """True when x's block should run through the fused kernels (a CUDA tensor at least MIN_WIDTH wide,
    switched on, Triton present)."""
    return x.is_cuda and x.shape[-1] >= MIN_WIDTH and fused_enabled() and _load() is not None


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
    """x on CUDA, the fused path switched on, and no gradient wanted: where the forward-only paths apply."""
    return x.is_cuda and fused_enabled() and not torch.is_grad_enabled()


def use_gelu_epilogue(x: torch.Tensor) -> bool:
    """True when the MLP's fc1 + GELU should run as one GEMM with a GELU epilogue: CUDA, fused path on, and no
    gradient (cuBLASLt's epilogue has no backward in PyTorch; training keeps fc1 and GELU apart)."""
    return _gpu_inference(x)


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
    """True when a block should run its linears as row-wise FP8 GEMMs: `fp8_rows.prepare` quantised them, x is
    on CUDA, the fused path is on and no gradient is needed (the row-wise path has no backward)."""
    return getattr(linear, "fp8_rowwise", None) is not None and _gpu_inference(x) and _load() is not None


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
