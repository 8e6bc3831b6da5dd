"""Run the fused Triton kernels on CPU tensors (Triton's interpreter) against float64 references; print JSON.

Started by tests/test_kernels.py in a subprocess, because TRITON_INTERPRET must be set before Triton is
imported and must not leak into the other tests (run as a script it sets the variable itself; imported, by
benchmarks/bench_kernels.py on a GPU, it leaves it alone and `check_ops` runs compiled kernels on CUDA).
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

EPS = 1e-6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
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


def main() -> None:
    results = {
        "fp32": check_ops(2, 19, 40, torch.float32, torch.float32),
        "bf16": check_ops(3, 21, 24, torch.bfloat16, torch.bfloat16),
        "fp32_small_tiles": small_tiles(),
        "block_fp32": check_block("fp32"),
    }
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
