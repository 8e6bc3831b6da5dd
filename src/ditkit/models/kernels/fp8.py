"""FP8 matrix products for the DiT block's linears (qkv, proj, fc1, fc2), with fp32 master weights.

Through `torch._scaled_mm` (cuBLASLt's FP8 GEMMs on Hopper), tensorwise dynamic scaling: each operand is scaled
so that its largest magnitude maps to the format's largest finite value, cast, and the product is rescaled.
Forward: activations and weights in e4m3 (more mantissa); backward: the output gradient in e5m2 (more range),
dgrad = dy·W and wgrad = dyᵀ·x, both with one e4m3 operand (Hopper has no e5m2×e5m2 product). Weight
gradients come out in fp32 for the fp32 master weights; the activation is saved in fp8 (half of bf16's memory).

`Float8Linear` is the one FP8 form of a block linear: `enable_fp8` swaps it in for training (this tensorwise
product) and for sampling (the weights quantised once by rows for `fp8_rows`; `models.precision.prepare`
chooses which).

torchao's float8 training would do the same with more options, but it needs wheels carried to the GPU machine
and gains nothing at these shapes over this short path; `torch._scaled_mm` ships with torch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def to_fp8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(t·s cast to `dtype`, 1/s) with s = max finite / amax(|t|): the tensorwise scale and its inverse."""
    top = torch.finfo(dtype).max
    amax = t.detach().abs().amax().float().clamp(min=1e-12)
    scale = top / amax
    return (t.float() * scale).clamp(-top, top).to(dtype), scale.reciprocal()


def _col_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


class _Fp8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, out_dtype):  # x2: M×K, weight: N×K (fp32 master)
        x8, x_inv = to_fp8(x2, E4M3)
        w8, w_inv = to_fp8(weight, E4M3)
        b = bias.to(out_dtype) if bias is not None else None
        out = torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, bias=b, out_dtype=out_dtype)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.has_bias = bias is not None
        ctx.x_dtype = x2.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        dy8, dy_inv = to_fp8(dy, E5M2)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch._scaled_mm(dy8, _col_major(w8), scale_a=dy_inv, scale_b=w_inv, out_dtype=dy.dtype)
            dx = dx.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = torch._scaled_mm(dy8.t().contiguous(), _col_major(x8), scale_a=dy_inv, scale_b=x_inv,
                                  out_dtype=torch.float32)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.float().sum(0)
        return dx, dw, db, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear through FP8 GEMMs; falls back to F.linear where a dimension is not a multiple of 16."""
    k = x.shape[-1]
    m = x.numel() // k
    if m % 16 or k % 16 or weight.shape[0] % 16:
        return F.linear(x, weight, bias)
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        out_dtype = torch.bfloat16
    out = _Fp8Matmul.apply(x.reshape(m, k), weight, bias, out_dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Float8Linear(nn.Linear):
    """nn.Linear whose product runs in FP8 (same parameters and state_dict keys; the class is swapped in place by
    `enable_fp8`), the one FP8 form of a block linear for training and sampling.

    `rows` None (prepared for training): every call is the tensorwise FP8 GEMM with autograd (`fp8_linear`).
    `rows` set (prepared for sampling): the weight quantised once by rows (`fp8_rows.RowwiseWeight`), which the
    block's no-gradient FP8 path reads; a direct call (a block without that path) is the plain product, as an
    unprepared layer computes it."""

    rows: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            return F.linear(x, self.weight, self.bias)
        return fp8_linear(x, self.weight, self.bias)


def enable_fp8(model: nn.Module, *, rowwise: bool = False) -> int:
    """Make the block linears (qkv, proj, fc1, fc2) of every DiT block Float8Linear in place; returns how many.

    Training (`rowwise=False`): every such nn.Linear, any size (`fp8_linear` falls back where a size is not a
    multiple of 16). Sampling (`rowwise=True`): the four linears of each block whose sizes are all multiples of
    16, with their weights quantised by rows in bf16 out (the FP8 GEMMs' rule; other blocks keep bf16). Call it
    for sampling after the model is on its device, and again if the weights change."""
    if rowwise:
        return _enable_rows(model)
    count = 0
    for name, module in model.named_modules():
        if type(module) is nn.Linear and any(name.endswith(s) for s in BLOCK_LINEARS) and ".blocks." in f".{name}":
            module.__class__ = Float8Linear
            count += 1
    return count


def _enable_rows(model: nn.Module, out_dtype: torch.dtype = torch.bfloat16) -> int:
    from ditkit.models.kernels.fp8_rows import quantize_weight  # Triton: only where FP8 sampling runs

    count = 0
    for block in getattr(model, "blocks", ()):
        linears = [getattr(getattr(block, part, None), name, None)
                   for part, name in (path.split(".") for path in BLOCK_LINEARS)]
        if not all(isinstance(lin, nn.Linear) for lin in linears):
            continue  # not a block with these four linears (e.g. PixArt's block)
        if any(size % 16 for lin in linears for size in lin.weight.shape):
            continue
        for lin in linears:
            lin.__class__ = Float8Linear
            lin.rows = quantize_weight(lin.weight, lin.bias, out_dtype)
        count += len(linears)
    return count


def disable_fp8(model: nn.Module) -> int:
    """Undo `enable_fp8`: every Float8Linear back to nn.Linear (parameters untouched); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is Float8Linear:
            module.__dict__.pop("rows", None)
            module.__class__ = nn.Linear
            count += 1
    return count
