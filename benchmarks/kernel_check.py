"""Run the fused Triton kernels on CPU tensors (Triton's interpreter) against float64 references; print JSON.

Started by tests/test_kernels.py in a subprocess, because TRITON_INTERPRET must be set before Triton is
imported and must not leak into the other tests (run as a script it sets the variable itself; imported, by
bench_kernels.py and bench_sample.py on a GPU, it leaves it alone and `check_ops` runs compiled kernels on CUDA).
It lives in benchmarks/ so that the benchmarks import it and the tests only run it: neither tree imports the
other's modules.
Each entry is the relative error ‖out − ref‖ / ‖ref‖ of one output or gradient; inputs are drawn fresh
(seeded) with feature sizes that are not powers of two and token counts that leave a partial last chunk.
"""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _src  # noqa: E402, F401  (src/ on sys.path when run from a checkout)

EPS = 1e-6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()  # the GPU checks compare with CPU float64
    return float((a - b).norm() / b.norm())


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def check_ops(
    n: int, t: int, d: int, mod_dtype: torch.dtype, out_dtype: torch.dtype, device: str = "cpu"
) -> dict[str, float]:
    """ln_modulate, residual_ln_modulate and gated_residual: forward outputs and every input gradient."""
    from ditkit.models.kernels import adaln, residual

    gen = torch.Generator().manual_seed(n * 1000 + t * 10 + d)
    x0 = (torch.randn(n, t, d, generator=gen) * 3 + 1).to(device)  # an offset the normalisation must remove
    y0 = torch.randn(n, t, d, generator=gen).to(device, mod_dtype)
    m0 = (torch.randn(n, 6 * d, generator=gen) * 0.5).to(device, mod_dtype)
    gh = torch.randn(n, t, d, generator=gen).to(device)
    gx = torch.randn(n, t, d, generator=gen).to(device)
    out: dict[str, float] = {}

    # fused, in the dtypes the block uses (x fp32, branch and modulation in mod_dtype)
    x, y, m = leaves(x0, y0, m0)
    shift1, scale1, gate1, shift2, scale2, gate2 = m.chunk(6, dim=1)
    h1 = adaln.ln_modulate(x, shift1, scale1, EPS, out_dtype)
    x1, h2 = adaln.residual_ln_modulate(x, y, gate1, shift2, scale2, EPS, out_dtype)
    x2 = residual.gated_residual(x1, y, gate2)
    ((h1.float() * gh).sum() + (h2.float() * gh).sum() + (x2 * gx).sum()).backward()

    # reference in float64 from the same (rounded) inputs
    xr, yr, mr = leaves(x0.double(), y0.double(), m0.double())
    s1, c1, g1, s2, c2, g2 = (v.unsqueeze(1) for v in mr.chunk(6, dim=1))
    r1 = F.layer_norm(xr, (d,), eps=EPS) * (1 + c1) + s1
    rx1 = xr + g1 * yr
    r2 = F.layer_norm(rx1, (d,), eps=EPS) * (1 + c2) + s2
    rx2 = rx1 + g2 * yr
    ((r1 * gh.double()).sum() + (r2 * gh.double()).sum() + (rx2 * gx.double()).sum()).backward()

    for name, a, b in [("h1", h1, r1), ("x1", x1, rx1), ("h2", h2, r2), ("x2", x2, rx2),
                       ("dx", x.grad, xr.grad), ("dy", y.grad, yr.grad), ("dmod", m.grad, mr.grad)]:
        out[name] = rel(a, b)
    return out


def small_tiles() -> dict[str, float]:
    """The same with launch shapes that make several token chunks per sample, the last one partial."""
    from ditkit.models.kernels import adaln

    adaln.TUNING.update(tile_elems=64, bwd_chunk=4, warps=1)  # D=40: 1 token per tile, 5 chunks of T=19
    try:
        return check_ops(2, 19, 40, torch.float32, torch.float32)
    finally:
        adaln.TUNING.clear()


def check_block(dtype_name: str) -> dict[str, float]:
    """A 2-block DiT (fused kernels forced on) against the plain path in float64: output and all gradients."""
    import ditkit.models.kernels as kernels
    from ditkit.models.config import DiTConfig
    from ditkit.models.dit import DiT

    torch.manual_seed(0)
    cfg = DiTConfig.from_name("DiT-S/2", input_size=8, num_classes=10, depth=2, hidden_size=48, num_heads=4)
    model = DiT(cfg)
    for p in model.parameters():  # adaLN-Zero starts at zero gates; random values exercise every path
        torch.nn.init.normal_(p, std=0.1)
    ref = DiT(cfg).double()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([1.0, 50.0, 999.0])
    y = torch.tensor([0, 3, 10])
    model.eval(), ref.eval()
    plain = ref(x.double(), t.double(), y)
    plain.square().sum().backward()
    kernels.use_fused = lambda tensor: True  # CPU tensors through the interpreted kernels
    fused = model(x, t, y)
    fused.square().sum().backward()
    out = {"out": rel(fused, plain)}
    grads = dict(ref.named_parameters())
    worst = max(rel(p.grad, grads[k].grad) for k, p in model.named_parameters() if p.grad is not None
                and grads[k].grad.norm() > 0)
    out["worst_param_grad"] = worst
    return out


def check_knob_block() -> dict[str, float]:
    """QK-norm, RoPE and SwiGLU in LayerNorm blocks (models/knobs.py) keep the fused kernels: a 2-block DiT through
    them against the plain path in float64, and how often the LayerNorm kernel ran."""
    import ditkit.models.kernels as kernels
    from ditkit.models import DiTConfig, build_model

    torch.manual_seed(0)
    cfg = DiTConfig.from_name("DiT-S/2", input_size=8, num_classes=10, depth=2, hidden_size=48, num_heads=4,
                              qk_norm="rmsnorm", rope=True, mlp="swiglu")
    model = build_model(cfg)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    ref = build_model(cfg).double()
    ref.load_state_dict(model.state_dict())
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1.0, 50.0, 999.0]), torch.tensor([0, 3, 10])
    model.eval(), ref.eval()
    plain = ref(x.double(), t.double(), y)
    plain.square().sum().backward()
    calls = {"n": 0}
    ln_modulate = kernels.ln_modulate

    def counted(*args, **kwargs):
        calls["n"] += 1
        return ln_modulate(*args, **kwargs)

    use_fused, kernels.use_fused, kernels.ln_modulate = kernels.use_fused, (lambda tensor: True), counted
    try:  # CPU tensors through the interpreted kernels
        fused = model(x, t, y)
        fused.square().sum().backward()
    finally:
        kernels.use_fused, kernels.ln_modulate = use_fused, ln_modulate
    grads = dict(ref.named_parameters())
    worst = max(rel(p.grad, grads[k].grad) for k, p in model.named_parameters()
                if p.grad is not None and grads[k].grad.norm() > 0)
    return {"out": rel(fused, plain), "worst_param_grad": worst, "fused_calls": calls["n"]}


def _dequantized(rows) -> torch.Tensor:
    return rows.data.double() * rows.scale.double().view(*rows.data.shape[:-1], 1)


def _row_top(rows) -> float:
    """The largest |scaled value| per row, worst distance from E4M3's max over the rows, relative."""
    top = rows.data.double().abs().amax(dim=-1)
    return float((top - 448.0).abs().max() / 448.0)


def check_fp8_rows(device: str = "cpu") -> dict[str, float]:
    """The FP8-row kernels (inference): LayerNorm + modulate (± gated residual) and `quantize_rows` (± GELU)
    dequantised against float64, the row maxima at E4M3's 448, and the row-scaled GEMM against float64 of its
    FP8 operands. On the CPU the kernels write the scaled rows in float32 (the interpreter's FP8 rounding is
    wrong just below powers of two) and PyTorch casts them; on CUDA they write float8_e4m3fn themselves."""
    import ditkit.models.kernels as kernels
    from ditkit.models.kernels import fp8_rows

    storage = torch.float32 if device == "cpu" else fp8_rows.E4M3
    fp8_rows.ACTIVATIONS, saved = storage, fp8_rows.ACTIVATIONS
    try:
        gen = torch.Generator().manual_seed(8)
        n, t, d = 3, 21, 48  # the FP8 GEMMs need K and N multiples of 16
        x0 = (torch.randn(n, t, d, generator=gen) * 3 + 1).to(device)
        y0 = torch.randn(n, t, d, generator=gen).to(device, torch.bfloat16)
        m0 = (torch.randn(n, 5 * d, generator=gen) * 0.5).to(device, torch.bfloat16)
        shift1, scale1, gate, shift2, scale2 = m0.chunk(5, dim=1)
        _, h1 = kernels.ln_modulate_rows(x0, None, None, shift1, scale1, EPS)
        x1, h2 = kernels.ln_modulate_rows(x0, y0, gate, shift2, scale2, EPS)
        s1, c1, g, s2, c2 = (v.double().unsqueeze(1) for v in m0.chunk(5, dim=1))
        r1 = F.layer_norm(x0.double(), (d,), eps=EPS) * (1 + c1) + s1
        rx1 = x0.double() + g * y0.double()
        r2 = F.layer_norm(rx1, (d,), eps=EPS) * (1 + c2) + s2
        wide = torch.randn(n * t, 4 * d, generator=gen).to(device, torch.bfloat16) * 2
        q_plain, q_gelu = fp8_rows.quantize_rows(wide), fp8_rows.quantize_rows(wide, gelu=True)
        out = {"h1": rel(_dequantized(h1), r1), "x1": rel(x1, rx1), "h2": rel(_dequantized(h2), r2),
               "rows": rel(_dequantized(q_plain), wide.double()),
               "gelu_rows": rel(_dequantized(q_gelu), F.gelu(wide.double(), approximate="tanh")),
               "row_max": max(_row_top(r) for r in (h1, h2, q_plain, q_gelu))}
        w = torch.randn(3 * d, d, generator=gen).to(device) / 7
        b = torch.randn(3 * d, generator=gen).to(device)
        weight = fp8_rows.quantize_weight(w, b, torch.bfloat16)
        a = fp8_rows.Rows(h1.data.to(fp8_rows.E4M3), h1.scale)
        ref = _dequantized(a) @ (weight.data.double() * weight.scale.double()[:, None]).t() + weight.bias.double()
        out["gemm"] = rel(fp8_rows.linear(a, weight), ref)
        out["weight"] = rel(weight.data.double() * weight.scale.double()[:, None], w.double())
        # Row widths that split into two power-of-two blocks exactly (1,152 = 1,024 + 128), a power of two (the
        # second block all masked) and a ragged one: each against float64 and against the one padded block.
        for k in (1152, 256, 200):
            xk = torch.randn(37, k, generator=gen).to(device, torch.bfloat16) * 3
            ref_k = F.gelu(xk.double(), approximate="tanh")
            split, padded = (fp8_rows.quantize_rows(xk, gelu=True, padded=p) for p in (False, True))
            out[f"gelu_rows_k{k}"] = rel(_dequantized(split), ref_k)
            out[f"split_vs_padded_k{k}"] = rel(_dequantized(split), _dequantized(padded).double())
            out["row_max"] = max(out["row_max"], _row_top(split))
        return out
    finally:
        fp8_rows.ACTIVATIONS = saved


def check_fp8_block(device: str = "cpu") -> dict[str, float]:
    """A 2-block DiT with its block linears as row-wise FP8 GEMMs against the plain model in float64 (output
    only: the path has no backward). On the CPU the FP8 casts are PyTorch's, as in `check_fp8_rows`."""
    import ditkit.models.kernels as kernels
    from ditkit.models.config import DiTConfig
    from ditkit.models.dit import DiT
    from ditkit.models.kernels import fp8, fp8_rows

    torch.manual_seed(1)  # head dim 16: CUDA's attention kernels need multiples of 8
    cfg = DiTConfig.from_name("DiT-S/2", input_size=8, num_classes=10, depth=2, hidden_size=64, num_heads=4)
    model = DiT(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ref = DiT(cfg).double()
    ref.load_state_dict(model.state_dict())
    model.to(device).eval(), ref.eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1.0, 50.0, 999.0]), torch.tensor([0, 3, 10])
    with torch.no_grad():
        plain = ref(x.double(), t.double(), y)
        assert fp8.enable_fp8(model, rowwise=True) == 8
        saved = fp8_rows.ACTIVATIONS, fp8_rows.linear, kernels.use_fp8_rows
        if device == "cpu":
            gemm = fp8_rows.linear
            fp8_rows.ACTIVATIONS = torch.float32
            fp8_rows.linear = lambda a, w: gemm(fp8_rows.Rows(a.data.to(fp8_rows.E4M3), a.scale), w)
            kernels.use_fp8_rows = lambda tensor, linear: True
        try:
            # Under bf16 autocast, as `ditkit sample --precision fp8` runs: the stream is stored in bf16
            stream = fp8_rows.STREAM
            try:
                with torch.autocast(device, dtype=torch.bfloat16):  # as `ditkit sample --precision fp8` runs
                    fp8_rows.STREAM = torch.float32
                    fast = model(x.to(device), t.to(device), y.to(device))
                    fp8_rows.STREAM = torch.bfloat16  # the residual stream stored in bf16 (the variant)
                    fast_bf16_stream = model(x.to(device), t.to(device), y.to(device))
            finally:
                fp8_rows.STREAM = stream
        finally:
            fp8_rows.ACTIVATIONS, fp8_rows.linear, kernels.use_fp8_rows = saved
        assert fp8.disable_fp8(model) == 8  # the same weights with no FP8 rows: shows the path above was taken
        use_fused, kernels.use_fused = kernels.use_fused, lambda tensor: True
        try:
            fused = model(x.to(device), t.to(device), y.to(device))
        finally:
            kernels.use_fused = use_fused
    return {"out": rel(fast, plain), "out_bf16_stream": rel(fast_bf16_stream, plain),
            "stream_gap": rel(fast, fast_bf16_stream), "fused_fp32_out": rel(fused, plain)}


def imports_dynamo(through_custom_ops: bool) -> dict[str, bool]:
    """Whether a no-grad fused forward of a small DiT imports torch._dynamo (run alone in a fresh process:
    `kernel_check.py dynamo [custom-ops]`); `through_custom_ops` forces the training path's custom ops."""
    import ditkit.models.kernels as kernels
    from ditkit.models import create_model

    model = create_model("DiT-S/2", input_size=8, num_classes=10, depth=2, hidden_size=64, num_heads=4).eval()
    kernels.use_fused = lambda tensor: True
    if through_custom_ops:
        kernels._direct = lambda: False
    with torch.no_grad():
        model(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 500.0]), torch.tensor([0, 10]))
    return {"dynamo": "torch._dynamo" in sys.modules}


def main() -> None:
    if sys.argv[1:2] == ["dynamo"]:
        json.dump(imports_dynamo(sys.argv[2:3] == ["custom-ops"]), sys.stdout)
        return
    results = {
        "fp32": check_ops(2, 19, 40, torch.float32, torch.float32),
        "bf16": check_ops(3, 21, 24, torch.bfloat16, torch.bfloat16),
        "fp32_small_tiles": small_tiles(),
        "block_fp32": check_block("fp32"),
        "block_knobs": check_knob_block(),
        "fp8_rows": check_fp8_rows(),
        "fp8_block": check_fp8_block(),
    }
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
