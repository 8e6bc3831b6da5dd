"""Sampling speed of ditkit's three samplers with guidance, DiT-XL/2 at 256×256 (random weights, no VAE).

Latents 32×32×4, classifier-free guidance 1.5 (one batched forward of 2·batch per step), typical step counts:
DDPM 250, DDIM 50, DPM-Solver++ 20. Reports images/s, model evaluations per image and the achieved
TFLOP/s (2 × 118.64 GFLOP per evaluation), in TF32 and in bf16 autocast.

    python benchmarks/bench_samplers.py --batch 32 --json out.json      # cuda
    python benchmarks/bench_samplers.py --device cpu --quick             # smoke test: a tiny model, 3 steps
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import _src  # noqa: F401  (first: puts src/ on sys.path when run from a checkout)
import ditkit
from ditkit.sample import Sampler

GFLOP_XL2 = 118.64  # paper's Table 4, multiply-adds per forward at 256×256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--quick", action="store_true", help="tiny model and 3 steps (CPU smoke test)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.quick:
        model = ditkit.create_model("DiT-S/2", input_size=8, num_classes=10, depth=2, hidden_size=64, num_heads=2)
        settings = [("ddpm", 3), ("ddim", 3), ("dpm-solver", 3)]
    else:
        model = ditkit.create_model("DiT-XL/2", input_size=32, num_classes=1000)
        settings = [("ddpm", 250), ("ddim", 50), ("dpm-solver", 20)]
    for p in model.parameters():  # the official init zeroes the output layers: give them values
        if p.requires_grad and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    model = model.to(device).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for precision in ("fp32", "bf16"):
        for sampler, steps in settings:
            common = dict(model=model, vae=None, sampler=sampler, cfg_scale=args.cfg_scale, device=device,
                          precision=precision)  # fmt: skip
            labels = torch.randint(0, model.num_classes, (args.batch,))
            generator = torch.Generator(device=device).manual_seed(0)
            Sampler(num_steps=3, **common).images(labels, generator)  # warm-up
            run = Sampler(num_steps=steps, **common)
            sync()
            start = time.perf_counter()
            images = run.images(labels, generator)
            sync()
            seconds = time.perf_counter() - start
            nfe = run.evaluations_per_image()
            row = dict(
                precision="tf32" if precision == "fp32" else precision, sampler=sampler, steps=steps,
                batch=args.batch, seconds=round(seconds, 3), img_per_s=round(args.batch / seconds, 2),
                nfe_per_image=nfe, tflops=round(args.batch * nfe * 2 * GFLOP_XL2 / seconds / 1e3, 1),
                finite=bool(torch.isfinite(images.float()).all()),
            )  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
