"""FP8 inference for the DiT block's linears with row-wise scales (`ditkit sample --precision fp8`).

Every GEMM input row (a token) gets its own scale s = amax(|row|)/448 and every weight row (an output channel)
its own, so one outlier token or channel costs precision only in its own row. cuBLASLt/CUTLASS apply the two
scale vectors on the fp32 accumulator (`torch._scaled_mm` with an M×1 and a 1×N scale, bf16 out), so nothing is
dequantised in memory.

Where the row scales come from (no separate amax pass over any activation):
- qkv and fc1: the LayerNorm + modulate kernels write their output as FP8 rows (`adaln.forward_only`);
- proj and fc2: `quantize_rows` below reads the attention output / fc1's output once (fc2's input takes the
  GELU on the way) and writes FP8 rows.
The weights are quantised once, when the model is prepared (`fp8.enable_fp8(model, rowwise=True)`, which
stores them as `rows` on each block linear, a `fp8.Float8Linear`); the fp32 parameters and the state_dict are
unchanged. Forward only: training's `--precision fp8` is `Float8Linear`'s tensorwise product (autograd).

Triton's interpreter (the CPU tests) rounds float32 → float8 wrongly just below a power of two (125.5 → 64),
so the CPU tests let the kernels write the scaled rows in float32 and cast them with PyTorch; on the GPU the
cast is the hardware's round-to-nearest-even (checked against float64 in benchmarks/bench_sample.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
# The activations' storage dtype. The CPU tests set float32 (the scaled rows before the cast; see above).
ACTIVATIONS = E4M3
# The residual stream's storage dtype between the blocks on this path (under bf16 autocast; `kernels.fp8_stream`).
# fp32, as the authors' code keeps it under autocast. bf16 storage (every kernel still adds, normalises and
# scales in fp32) halves the bytes of the three memory-bound passes per block: on an H200 one guided DiT-XL/2
# forward took 174.5 ms against 184.8, but its error against fp32 grew from 1.54% to 2.58% (random weights,
# 2026-12-02, RESULTS.md), too much for 6%; the benchmark and the tests set it to compare.
STREAM = torch.float32


class Rows(NamedTuple):
    """An activation as FP8 rows: `data` …×K (float8_e4m3fn, or float32 in the CPU tests) and `scale` (one fp32
    per row): the value is data·scale."""

    data: torch.Tensor
    scale: torch.Tensor


class RowwiseWeight(NamedTuple):
    """A linear layer's weight as FP8 rows (N×K, N scales) and its bias in the output dtype."""

    data: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None


@triton.jit
def _gelu_tanh(x, HW_TANH: tl.constexpr):
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    if HW_TANH:
        # The GPU's tanh.approx.f32 (one special-function op, relative error ~2^-11, far below e4m3's 2^-4):
        # the exp + division form below costs two, and at 4,608 values a row those ops bound the pass.
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [u], dtype=tl.float32, is_pure=True,
                                      pack=1)
        return 0.5 * x * (1.0 + t)
    # x·σ(2u) = x / (1 + e^(−2u)) with a fast division (no IEEE rounding); Triton's interpreter (the CPU tests)
    # cannot run PTX. The exponent is capped so the fast division never sees an infinite divisor.
    return tl.fdiv(x, 1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)), ieee_rounding=False)


@triton.jit
def _quantize_rows_kernel(X, Q, S, M, K, QUANT_MAX: tl.constexpr, GELU: tl.constexpr, HW_TANH: tl.constexpr,
                          BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, ROWS: tl.constexpr):
    # A row is read as two power-of-two blocks, [0, BLOCK_A) and [BLOCK_A, BLOCK_A + BLOCK_B) (`split_width`):
    # 4,608 = 4,096 + 512 and 1,152 = 1,024 + 128 exactly, where one block padded to the next power of two
    # (8,192 / 2,048 lanes) spent ~44% of the arithmetic (GELU's) on masked lanes.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows[:, None] < M
    base = rows[:, None].to(tl.int64) * K
    cols_a = tl.arange(0, BLOCK_A)[None, :]
    cols_b = BLOCK_A + tl.arange(0, BLOCK_B)[None, :]
    mask_a = rmask & (cols_a < K)
    mask_b = rmask & (cols_b < K)
    xa = tl.load(X + base + cols_a, mask=mask_a, other=0.0).to(tl.float32)
    xb = tl.load(X + base + cols_b, mask=mask_b, other=0.0).to(tl.float32)
    if GELU:
        xa = _gelu_tanh(xa, HW_TANH)
        xb = _gelu_tanh(xb, HW_TANH)
    amax = tl.maximum(tl.max(tl.where(mask_a, tl.abs(xa), 0.0), axis=1),
                      tl.max(tl.where(mask_b, tl.abs(xb), 0.0), axis=1))
    amax = tl.maximum(amax, 1e-12)
    rows_ok = rows < M
    tl.store(S + rows, amax / QUANT_MAX, mask=rows_ok)
    inv = (QUANT_MAX / amax)[:, None]  # one division a row
    tl.store(Q + base + cols_a, (xa * inv).to(Q.dtype.element_ty), mask=mask_a)
    tl.store(Q + base + cols_b, (xb * inv).to(Q.dtype.element_ty), mask=mask_b)


def split_width(k: int, padded: bool = False) -> tuple[int, int]:
    """(BLOCK_A, BLOCK_B): the largest power of two ≤ k and the power of two ≥ the rest (at least 16); with
    `padded`, one block of the next power of two ≥ k (the old layout, kept for the benchmark's comparison)."""
    if padded:
        return triton.next_power_of_2(k), 16
    block_a = 1 << (k.bit_length() - 1)
    return block_a, max(16, triton.next_power_of_2(k - block_a))


def quantize_rows(x: torch.Tensor, gelu: bool = False, dtype: torch.dtype | None = None,
                  padded: bool = False, hw_tanh: bool | None = None) -> Rows:
    """x (…×K, any float dtype, made contiguous) as FP8 rows (in `dtype`, default ACTIVATIONS), GELU-tanh
    applied first when `gelu`. `padded` (the one-block launch of `split_width`) and `hw_tanh` (default: on a
    GPU) are there for the benchmark's comparisons."""
    dtype = dtype or ACTIVATIONS
    x = x.contiguous()
    k = x.shape[-1]
    m = x.numel() // k
    q = torch.empty(x.shape, dtype=dtype, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    block_a, block_b = split_width(k, padded)
    rows, warps = TUNING.get((k, gelu), (1, 4))
    _quantize_rows_kernel[(triton.cdiv(m, rows),)](
        x, q, s, m, k, QUANT_MAX=E4M3_MAX, GELU=gelu, HW_TANH=x.is_cuda if hw_tanh is None else hw_tanh,
        BLOCK_A=block_a, BLOCK_B=block_b, ROWS=rows,
        num_warps=warps)
    return Rows(q, s)


# (width, GELU) -> (rows per program, warps); otherwise one row, 4 warps. From bench_sample.py's sweep
# (`--sections quant-tune`, two H200 machines, M = 131,072, two-block rows, 2026-12-02): 2 rows and 4 warps were
# within 15% of the best at both widths on both machines: K = 1,152 0.169–0.171 ms (1 row: 0.206–0.226);
# K = 4,608 with GELU (tanh.approx) 0.667 ms (1 row: 0.697). The sweep sets entries here.
TUNING: dict[tuple[int, bool], tuple[int, int]] = {(1152, False): (2, 4), (4608, True): (2, 4)}


def quantize_weight(weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> RowwiseWeight:
    """A weight N×K as FP8 rows (scale per output channel), in fp32 arithmetic; the bias cast to `out_dtype`."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / E4M3_MAX
    data = (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return RowwiseWeight(data, scale, None if bias is None else bias.detach().to(out_dtype))


_BIAS_IN_GEMM = {"ok": True}  # turned off once if this build's row-wise GEMM refuses a bias


def linear(x: Rows, weight: RowwiseWeight, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x·Wᵀ + b from FP8 rows, both row scales applied on the fp32 accumulator; …×N in `out_dtype`."""
    k = x.data.shape[-1]
    a, b = x.data.reshape(-1, k), weight.data.t()
    scales = {"scale_a": x.scale.view(-1, 1), "scale_b": weight.scale.view(1, -1), "out_dtype": out_dtype}
    if weight.bias is not None and _BIAS_IN_GEMM["ok"]:
        try:
            out = torch._scaled_mm(a, b, bias=weight.bias, **scales)
        except RuntimeError:  # the bias then goes in a separate add (one more pass over the output)
            _BIAS_IN_GEMM["ok"] = False
            out = torch._scaled_mm(a, b, **scales) + weight.bias
    else:
        out = torch._scaled_mm(a, b, **scales)
        out = out if weight.bias is None else out + weight.bias
    return out.view(*x.data.shape[:-1], weight.data.shape[0])
