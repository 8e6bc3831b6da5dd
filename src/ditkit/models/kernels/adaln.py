"""Fused LayerNorm (no affine) + adaLN modulate, optionally after a gated residual, forward and backward.

One pass over the activations where the plain path makes several (LayerNorm, modulate, and in the backward the
LayerNorm gradient, the modulate gradient and the two per-sample reductions over tokens):

    forward   x' = x + gate·y                (only with a residual: `residual_ln_modulate`)
              h  = LN(x')·(1 + scale) + shift          LN without affine, eps as given
    backward  d_shift = Σ_t dh,  d_scale = Σ_t dh·x̂,  dx' = LN'ᵀ(dh·(1 + scale)) + dx'_in
              dy = gate·dx',  d_gate = Σ_t dx'·y       (only with a residual)

x, y are N×T×D; shift, scale, gate are N×D (any row stride; they are chunks of the adaLN regression output).
Everything is computed in fp32 whatever the storage dtype; h is written in `out_dtype` (bf16 under autocast).
The ops are `torch.library.custom_op`s, so `torch.compile` keeps them whole (opaque to dynamo and inductor).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launch shapes by padded feature size (BLOCK_D), tuned on an H200 (benchmarks/bench_kernels.py, section
# "tune", 2026-12-01; RESULTS.md): (values per tile, tokens per backward program, warps). A tile holds
# tile/BLOCK_D tokens; the backward walks its tokens of one sample keeping the per-sample sums in registers.
# At D=384 the fastest tile is 16 tokens, at D=768 and 1152 two; 64 tokens per backward program and 4 warps win
# at all three (the first untuned shape was up to 3× slower in the backward at D=384 and 768).
TUNED = {512: (8192, 64, 4), 1024: (2048, 64, 4), 2048: (4096, 64, 4)}
TUNING: dict[str, int] = {}  # overrides for all widths (the benchmark's sweep and the tests set it)


@triton.jit
def _fwd_kernel(
    X, Y, G, SHIFT, SCALE, XOUT, H, HSCALE, MEAN, RSTD, NT, T, D, stride_mod, eps,
    HAS_RES: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, QUANT_MAX: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # row = n·T + t
    rmask = rows < NT
    n = rows // T
    cols = tl.arange(0, BLOCK_D)
    mask = rmask[:, None] & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    moffs = n[:, None] * stride_mod + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + moffs, mask=mask, other=0.0).to(tl.float32)
        x = x + g * y
        tl.store(XOUT + offs, x.to(XOUT.dtype.element_ty), mask=mask)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    shift = tl.load(SHIFT + moffs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + moffs, mask=mask, other=0.0).to(tl.float32)
    h = xc * rstd[:, None] * (1.0 + scale) + shift
    if QUANT_MAX > 0:  # FP8 rows for the next GEMM: h / s with s = amax(|h|) / QUANT_MAX, s per row
        amax = tl.maximum(tl.max(tl.where(mask, tl.abs(h), 0.0), axis=1), 1e-12)
        tl.store(HSCALE + rows, amax / QUANT_MAX, mask=rmask)
        h = h * (QUANT_MAX / amax)[:, None]  # one division per row, not per value
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _bwd_kernel(
    XN, DH, MEAN, RSTD, SCALE, G, Y, DXIN, DX, DY, PSHIFT, PSCALE, PGATE, T, D, stride_mod, num_chunks,
    HAS_RES: tl.constexpr, HAS_DXIN: tl.constexpr, CHUNK: tl.constexpr, TILE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    scale1 = 1.0 + tl.load(SCALE + n * stride_mod + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_RES:
        g = tl.load(G + n * stride_mod + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_shift = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_scale = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_gate = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(0, CHUNK, TILE):
        t = chunk * CHUNK + i + tl.arange(0, TILE)
        tmask = t < T
        mask = tmask[:, None] & cmask[None, :]
        row = n * T + t
        offs = row[:, None] * D + cols[None, :]
        x = tl.load(XN + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row, mask=tmask, other=0.0)
        rstd = tl.load(RSTD + row, mask=tmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        acc_shift += tl.sum(dh, axis=0)
        acc_scale += tl.sum(dh * xhat, axis=0)
        gg = dh * scale1[None, :]
        c1 = tl.sum(gg * xhat, axis=1) / D
        c2 = tl.sum(gg, axis=1) / D
        dx = tl.where(mask, (gg - xhat * c1[:, None] - c2[:, None]) * rstd[:, None], 0.0)
        if HAS_DXIN:
            dx += tl.load(DXIN + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_RES:
            y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DY + offs, (g[None, :] * dx).to(DY.dtype.element_ty), mask=mask)
            acc_gate += tl.sum(dx * y, axis=0)
    part = (n * num_chunks + chunk) * D + cols
    tl.store(PSHIFT + part, acc_shift, mask=cmask)
    tl.store(PSCALE + part, acc_scale, mask=cmask)
    if HAS_RES:
        tl.store(PGATE + part, acc_gate, mask=cmask)


def launch_shape(d: int) -> tuple[int, int, int, int]:
    """(BLOCK_D, tokens per tile, tokens per backward program, warps) for feature size d."""
    block_d = triton.next_power_of_2(d)
    elems, chunk, warps = TUNED.get(block_d, (4096, 64, 4))
    elems, chunk, warps = TUNING.get("tile_elems", elems), TUNING.get("bwd_chunk", chunk), TUNING.get("warps", warps)
    tile = max(1, elems // block_d)
    chunk = max(tile, chunk)
    warps = max(1, min(warps, tile * block_d // 256))
    return block_d, tile, chunk, warps


def _check(x: torch.Tensor, *mods: torch.Tensor) -> None:
    if x.dim() != 3 or not x.is_contiguous():
        raise ValueError(f"expected a contiguous N×T×D tensor, got shape {tuple(x.shape)}")
    for m in mods:
        if m.shape != (x.shape[0], x.shape[2]) or m.stride(1) != 1:
            raise ValueError(f"expected N×D modulation rows with unit column stride, got {tuple(m.shape)}")


def _forward(x, y, gate, shift, scale, eps, out_dtype, quant_max=0.0):
    """(x', h, mean, rstd, row scales); with quant_max > 0 h holds h / s per row (s in the row scales), ready
    for a cast to FP8, else the row scales are empty."""
    n, t, d = x.shape
    has_res = y is not None
    if has_res and y.shape != x.shape:
        raise ValueError(f"residual branch shape {tuple(y.shape)} != stream shape {tuple(x.shape)}")
    y = y.contiguous() if has_res else None
    _check(x, shift, scale, *((gate,) if has_res else ()))
    if shift.stride(0) != scale.stride(0) or (has_res and gate.stride(0) != shift.stride(0)):
        raise ValueError("shift, scale and gate must share one row stride (chunks of one tensor)")
    h = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    x_out = torch.empty_like(x) if has_res else x.new_empty(0)
    mean = torch.empty(n * t, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    row_scale = torch.empty_like(mean) if quant_max > 0 else mean.new_empty(0)
    block_d, tile, _, warps = launch_shape(d)
    _fwd_kernel[(triton.cdiv(n * t, tile),)](
        x, y if has_res else x, gate if has_res else shift, shift, scale, x_out, h, row_scale, mean, rstd, n * t,
        t, d, shift.stride(0), eps, HAS_RES=has_res, BLOCK_D=block_d, ROWS=tile, QUANT_MAX=float(quant_max),
        num_warps=warps,
    )
    return x_out, h, mean, rstd, row_scale


def _backward(x_norm, dh, mean, rstd, scale, gate, y, dx_in):
    n, t, d = x_norm.shape
    has_res = y is not None
    block_d, tile, chunk, warps = launch_shape(d)
    num_chunks = triton.cdiv(t, chunk)
    dx = torch.empty_like(x_norm)
    dy = torch.empty_like(y) if has_res else dx.new_empty(0)
    parts = torch.empty((3 if has_res else 2, n, num_chunks, d), dtype=torch.float32, device=x_norm.device)
    _bwd_kernel[(n, num_chunks)](
        x_norm, dh.contiguous(), mean, rstd, scale, gate if has_res else scale, y if has_res else x_norm,
        dx_in.contiguous() if dx_in is not None else dx, dx, dy, parts[0], parts[1], parts[-1], t, d,
        scale.stride(0), num_chunks, HAS_RES=has_res, HAS_DXIN=dx_in is not None, CHUNK=chunk, TILE=tile,
        BLOCK_D=block_d, num_warps=warps,
    )
    sums = parts.sum(dim=2)  # N×D per-sample sums over the token chunks (a small tensor)
    return dx, dy, sums


# ---- custom ops: plain LayerNorm + modulate ---------------------------------------------------------------


@torch.library.custom_op("ditkit::ln_modulate_fwd", mutates_args=())
def _ln_mod_fwd(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, h, mean, rstd, _ = _forward(x, None, None, shift, scale, eps, out_dtype)
    return h, mean, rstd


@_ln_mod_fwd.register_fake
def _(x, shift, scale, eps, out_dtype):
    rows = x.shape[0] * x.shape[1]
    stats = x.new_empty(rows, dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("ditkit::ln_modulate_bwd", mutates_args=())
def _ln_mod_bwd(
    x: torch.Tensor, dh: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    dx, _, sums = _backward(x, dh, mean, rstd, scale, None, None, None)
    return dx, sums  # sums: 2×N×D (d_shift, d_scale); one tensor, as a custom op's outputs may not alias


@_ln_mod_bwd.register_fake
def _(x, dh, mean, rstd, scale):
    return torch.empty_like(x), x.new_empty((2, x.shape[0], x.shape[2]), dtype=torch.float32)


def _ln_mod_setup(ctx, inputs, output):
    x, shift, scale, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, scale)
    ctx.mod_dtype = shift.dtype


def _ln_mod_grad(ctx, dh, _dmean, _drstd):
    x, mean, rstd, scale = ctx.saved_tensors
    dx, sums = _ln_mod_bwd(x, dh, mean, rstd, scale)
    return dx, sums[0].to(ctx.mod_dtype), sums[1].to(ctx.mod_dtype), None, None


_ln_mod_fwd.register_autograd(_ln_mod_grad, setup_context=_ln_mod_setup)


def ln_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """LN(x)·(1 + scale) + shift for x N×T×D (contiguous) and N×D shift/scale, written in `out_dtype`."""
    return _ln_mod_fwd(x, shift, scale, eps, out_dtype)[0]


# ---- custom ops: gated residual, then LayerNorm + modulate --------------------------------------------------


@torch.library.custom_op("ditkit::res_ln_modulate_fwd", mutates_args=())
def _res_fwd(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, y, gate, shift, scale, eps, out_dtype)[:4]


@_res_fwd.register_fake
def _(x, y, gate, shift, scale, eps, out_dtype):
    stats = x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)
    return torch.empty_like(x), x.new_empty(x.shape, dtype=out_dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("ditkit::res_ln_modulate_bwd", mutates_args=())
def _res_bwd(
    x_new: torch.Tensor, dh: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, scale: torch.Tensor,
    gate: torch.Tensor, y: torch.Tensor, dx_in: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dy, sums = _backward(x_new, dh, mean, rstd, scale, gate, y.contiguous(), dx_in)
    return dx, dy, sums  # sums: 3×N×D (d_shift, d_scale, d_gate)


@_res_bwd.register_fake
def _(x_new, dh, mean, rstd, scale, gate, y, dx_in):
    sums = x_new.new_empty((3, x_new.shape[0], x_new.shape[2]), dtype=torch.float32)
    return torch.empty_like(x_new), torch.empty_like(y), sums


def _res_setup(ctx, inputs, output):
    _, y, gate, shift, scale, _, _ = inputs
    x_new, _, mean, rstd = output
    ctx.save_for_backward(x_new, mean, rstd, scale, gate, y)
    ctx.mod_dtype = shift.dtype


def _res_grad(ctx, dx_new, dh, _dmean, _drstd):
    x_new, mean, rstd, scale, gate, y = ctx.saved_tensors
    dx, dy, sums = _res_bwd(x_new, dh, mean, rstd, scale, gate, y, dx_new)
    cast = ctx.mod_dtype
    return dx, dy, sums[2].to(gate.dtype), sums[0].to(cast), sums[1].to(cast), None, None


_res_fwd.register_autograd(_res_grad, setup_context=_res_setup)


def residual_ln_modulate(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x' = x + gate·y and LN(x')·(1 + scale) + shift in one pass; returns (x', h)."""
    x_new, h, _, _ = _res_fwd(x, y, gate, shift, scale, eps, out_dtype)
    return x_new, h


# ---- inference: the same forward without the custom op (no autograd), optionally as FP8 rows ----------------


def forward_only(
    x: torch.Tensor, y: torch.Tensor | None, gate: torch.Tensor | None, shift: torch.Tensor, scale: torch.Tensor,
    eps: float, dtype: torch.dtype, quant_max: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x', h, s): the forward above launched directly (with the gated residual when y is given; x' is x
    without it), h in `dtype`. With quant_max > 0, h is divided by its per-row scale s = amax(|h|)/quant_max
    (FP8 rows for the next GEMM: dtype float8_e4m3fn); else s is empty."""
    x_out, h, _, _, s = _forward(x, y, gate, shift, scale, eps, dtype, quant_max)
    return (x if y is None else x_out), h, s
