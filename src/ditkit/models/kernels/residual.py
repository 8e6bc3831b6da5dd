"""The adaLN-Zero gated residual out = x + gate·y (gate N×D per sample), forward and backward in one pass each.

The backward needs dy = gate·dout and the per-sample reduction d_gate = Σ_t dout·y; the plain path reads dout
and y twice for these (a product kernel, then a reduction), here one program per (sample, token chunk) does
both and keeps the partial sums in registers. dx = dout passes through unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS_PER_PROGRAM = 16


@triton.jit
def _fwd_kernel(X, Y, G, OUT, T, D, stride_g, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    n = row // T
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + n * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * D + cols, (x + g * y).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(DOUT, Y, G, DY, PGATE, T, D, stride_g, num_chunks, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    g = tl.load(G + n * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(ROWS):
        t = chunk * ROWS + i
        m = cols < tl.where(t < T, D, 0)  # a whole-row mask past the last token (t ≥ T)
        row = n * T + t
        dout = tl.load(DOUT + row * D + cols, mask=m, other=0.0).to(tl.float32)
        y = tl.load(Y + row * D + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(DY + row * D + cols, (g * dout).to(DY.dtype.element_ty), mask=m)
        acc += dout * y
    tl.store(PGATE + (n * num_chunks + chunk) * D + cols, acc, mask=mask)


def _warps(block_d: int) -> int:
    return max(1, min(16, block_d // 256))


@torch.library.custom_op("ditkit::gated_residual_fwd", mutates_args=())
def _fwd(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    if x.dim() != 3 or not x.is_contiguous() or y.shape != x.shape:
        raise ValueError(f"expected contiguous N×T×D x and y of the same shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    if gate.shape != (x.shape[0], x.shape[2]) or gate.stride(1) != 1:
        raise ValueError(f"expected an N×D gate with unit column stride, got {tuple(gate.shape)}")
    n, t, d = x.shape
    out = torch.empty_like(x)
    block_d = triton.next_power_of_2(d)
    _fwd_kernel[(n * t,)](x, y.contiguous(), gate, out, t, d, gate.stride(0), BLOCK_D=block_d,
                          num_warps=_warps(block_d))
    return out


@_fwd.register_fake
def _(x, y, gate):
    return torch.empty_like(x)


@torch.library.custom_op("ditkit::gated_residual_bwd", mutates_args=())
def _bwd(dout: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, t, d = dout.shape
    num_chunks = triton.cdiv(t, ROWS_PER_PROGRAM)
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    parts = torch.empty((n, num_chunks, d), dtype=torch.float32, device=dout.device)
    block_d = triton.next_power_of_2(d)
    _bwd_kernel[(n, num_chunks)](
        dout.contiguous(), y.contiguous(), gate, dy, parts, t, d, gate.stride(0), num_chunks,
        ROWS=ROWS_PER_PROGRAM, BLOCK_D=block_d, num_warps=_warps(block_d),
    )
    return dy, parts.sum(dim=1).to(gate.dtype)


@_bwd.register_fake
def _(dout, y, gate):
    return torch.empty(y.shape, dtype=y.dtype, device=y.device), gate.new_empty(gate.shape)


def _setup(ctx, inputs, output):
    _, y, gate = inputs
    ctx.save_for_backward(y, gate)


def _grad(ctx, dout):
    y, gate = ctx.saved_tensors
    dy, dgate = _bwd(dout, y, gate)
    return dout, dy, dgate


_fwd.register_autograd(_grad, setup_context=_setup)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate·y for x, y N×T×D and gate N×D, in x's dtype (fp32 math)."""
    return _fwd(x, y, gate)
