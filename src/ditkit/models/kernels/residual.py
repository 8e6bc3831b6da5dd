"""The adaLN-Zero gated residual out = x + gate·y (gate N×D per sample), forward and backward in one pass each.

The backward needs dy = gate·dout and the per-sample reduction d_gate = Σ_t dout·y; the plain path reads dout
and y twice for these (a product kernel, then a reduction), here one program per (sample, token chunk) does
both and keeps the partial sums in registers. dx = dout passes through unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ditkit.models.kernels.adaln import launch_shape


@triton.jit
def _fwd_kernel(X, Y, G, OUT, NT, T, D, stride_g, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    n = rows // T
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < NT)[:, None] & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + n[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (x + g * y).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(
    DOUT, Y, G, DY, PGATE, T, D, stride_g, num_chunks, CHUNK: tl.constexpr, TILE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    g = tl.load(G + n * stride_g + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(0, CHUNK, TILE):
        t = chunk * CHUNK + i + tl.arange(0, TILE)
        mask = (t < T)[:, None] & cmask[None, :]
        offs = (n * T + t)[:, None] * D + cols[None, :]
        dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DY + offs, (g[None, :] * dout).to(DY.dtype.element_ty), mask=mask)
        acc += tl.sum(dout * y, axis=0)
    tl.store(PGATE + (n * num_chunks + chunk) * D + cols, acc, mask=cmask)


def forward_only(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate·y launched directly (no autograd; `gated_residual` below is the op that has a backward)."""
    if x.dim() != 3 or not x.is_contiguous() or y.shape != x.shape:
        raise ValueError(f"expected contiguous N×T×D x and y of the same shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    if gate.shape != (x.shape[0], x.shape[2]) or gate.stride(1) != 1:
        raise ValueError(f"expected an N×D gate with unit column stride, got {tuple(gate.shape)}")
    n, t, d = x.shape
    out = torch.empty_like(x)
    block_d, tile, _, warps = launch_shape(d)
    _fwd_kernel[(triton.cdiv(n * t, tile),)](x, y.contiguous(), gate, out, n * t, t, d, gate.stride(0),
                                             BLOCK_D=block_d, ROWS=tile, num_warps=warps)
    return out


@torch.library.custom_op("ditkit::gated_residual_fwd", mutates_args=())
def _fwd(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return forward_only(x, y, gate)


@_fwd.register_fake
def _(x, y, gate):
    return torch.empty_like(x)


@torch.library.custom_op("ditkit::gated_residual_bwd", mutates_args=())
def _bwd(dout: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, t, d = dout.shape
    block_d, tile, chunk, warps = launch_shape(d)
    num_chunks = triton.cdiv(t, chunk)
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    parts = torch.empty((n, num_chunks, d), dtype=torch.float32, device=dout.device)
    _bwd_kernel[(n, num_chunks)](
        dout.contiguous(), y.contiguous(), gate, dy, parts, t, d, gate.stride(0), num_chunks,
        CHUNK=chunk, TILE=tile, BLOCK_D=block_d, num_warps=warps,
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
