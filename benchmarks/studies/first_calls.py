"""The first call of each fused sampling op in a fresh process on a GPU: where a sampling run's warm-up goes.

Each op is timed (synchronised) on its first and, for some, second call at the shapes of a guided DiT-XL/2 step
(512 rows × 256 tokens × 1,152). Run it twice: the second process finds Triton's disk cache warm, so what is
still slow there is not compilation. By default gradients are on, so the ops go through their torch.library
custom ops (the path every fused op took before `kernels._direct`); `--no-grad` runs them as `ditkit sample`
does now (the kernels launched directly).

    PYTHONPATH=src python benchmarks/studies/first_calls.py; PYTHONPATH=src python benchmarks/studies/first_calls.py
    PYTHONPATH=src python benchmarks/studies/first_calls.py --no-grad
"""

from __future__ import annotations

import sys
import time

START = time.time()
import _paths  # noqa: E402, F401  (benchmarks/ and src/ on sys.path)
import torch  # noqa: E402

import ditkit.models.kernels as kernels  # noqa: E402
from ditkit.models.kernels import fp8_rows  # noqa: E402


def timed(label: str, fn) -> None:
    torch.cuda.synchronize()
    t0 = time.time()
    fn()
    torch.cuda.synchronize()
    print(f"{label}: {time.time() - t0:.3f} s", flush=True)


def main() -> None:
    x = torch.randn(512, 256, 1152, device="cuda")
    mods = torch.randn(512, 6 * 1152, device="cuda", dtype=torch.bfloat16)
    shift, scale, gate = mods.chunk(6, 1)[:3]
    y = x.bfloat16()
    timed("cuda warm", lambda: torch.ones(1, device="cuda") + 1)
    timed("ln_modulate_rows 1st", lambda: kernels.ln_modulate_rows(x, None, None, shift, scale, 1e-6))
    timed("ln_modulate_rows 1st res", lambda: kernels.ln_modulate_rows(x, y, gate, shift, scale, 1e-6))
    timed("ln_modulate_rows 2nd res", lambda: kernels.ln_modulate_rows(x, y, gate, shift, scale, 1e-6))
    timed("quantize 1st", lambda: fp8_rows.quantize_rows(x))
    timed("quantize gelu 1st", lambda: fp8_rows.quantize_rows(x, gelu=True))
    timed("gated_residual 1st", lambda: kernels.gated_residual(x, y, gate))
    weight = fp8_rows.quantize_weight(torch.randn(3456, 1152, device="cuda"), torch.randn(3456, device="cuda"),
                                      torch.bfloat16)
    rows = fp8_rows.quantize_rows(x)
    timed("scaled_mm 1st", lambda: fp8_rows.linear(rows, weight))
    timed("scaled_mm 2nd", lambda: fp8_rows.linear(rows, weight))
    q = torch.randn(512, 16, 256, 72, device="cuda", dtype=torch.bfloat16)
    timed("sdpa 1st", lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    print(f"total {time.time() - START:.2f} s")


if __name__ == "__main__":
    with torch.set_grad_enabled("--no-grad" not in sys.argv[1:]):
        main()
