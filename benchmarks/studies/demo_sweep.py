"""Choose the `ditkit demo` settings: sample quality of small DiTs on the digits vs training steps.

The demo must reach a digit-class accuracy of at least 0.9 within a few minutes on a 2-core CPU. Quality after
N steps does not depend on the device (same fp32 math), so this sweep runs on a GPU to find the smallest
(model, steps) that gets there; the CPU time per step is measured separately (`--time-cpu`).

    PYTHONPATH=src python benchmarks/studies/demo_sweep.py --out sweep.json            # GPU (or CPU, slowly)
    PYTHONPATH=src python benchmarks/studies/demo_sweep.py --time-cpu --steps 20       # CPU seconds per step
"""

from __future__ import annotations

import argparse
import json
import time

import _paths  # noqa: F401  (first: benchmarks/ and src/ on sys.path)
import torch

from ditkit.diffusion.guidance import guided
from ditkit.diffusion.samplers import sample
from ditkit.metrics.digits_classifier import digits_metrics
from ditkit.train import TrainOptions, train

CANDIDATES = {
    # name: (model, depth, width, heads, image_size, batch, lr)
    "d4w192p4": ("DiT-S/4", 4, 192, 3, 16, 128, 1e-3),
    "d6w256p4": ("DiT-S/4", 6, 256, 4, 16, 128, 5e-4),
    "d3w128p4": ("DiT-S/4", 3, 128, 2, 16, 128, 1e-3),
    "d4w192p2": ("DiT-S/2", 4, 192, 3, 16, 128, 1e-3),
    "d4w192p4-lr5e-4": ("DiT-S/4", 4, 192, 3, 16, 128, 5e-4),
    "d4w192p4-b64": ("DiT-S/4", 4, 192, 3, 16, 64, 1e-3),
    # 8×8 (the digits' native size) with 2×2 patches: as cheap as 16×16 with 4×4 patches
    "8px-d4w192p2": ("DiT-S/2", 4, 192, 3, 8, 128, 1e-3),
    "8px-d4w192p2-b64": ("DiT-S/2", 4, 192, 3, 8, 64, 1e-3),
    "8px-d4w192p2-lr2e-3": ("DiT-S/2", 4, 192, 3, 8, 128, 2e-3),
    "d4w192p4-lr2e-3": ("DiT-S/4", 4, 192, 3, 16, 128, 2e-3),
    "8px-d4w128p2-b64": ("DiT-S/2", 4, 128, 2, 8, 64, 1e-3),
}


def options(name: str, out: str, steps: int, ema: float, precision: str) -> TrainOptions:
    model, depth, width, heads, size, batch, lr = CANDIDATES[name]
    return TrainOptions(
        data_path="digits", model=model, image_size=size, global_batch_size=batch, lr=lr, ema_decay=ema,
        max_steps=steps, log_every=50, ckpt_every=10**9, results_dir=f"{out}/{name}", resume="auto",
        num_workers=0, progress=False, precision=precision,
        model_overrides={"depth": depth, "hidden_size": width, "num_heads": heads},
    )


def score(ema: torch.nn.Module, size: int, device: torch.device, scales: list[float], n: int = 500) -> dict:
    labels = torch.arange(n, device=device) % 10
    noise = torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    out = {}
    for scale in scales:
        x = sample(guided(ema, scale, 10, channels="all"), noise, sampler="dpm-solver", num_steps=20,
                   model_kwargs={"y": labels})
        m = digits_metrics(x.clamp(-1, 1).float().cpu(), labels.cpu(), verbose=False)
        out[str(scale)] = {k: round(float(v), 4) for k, v in m.items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="sweep.json")
    p.add_argument("--workdir", default="/tmp/demo_sweep")
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--checkpoints", default="300,600,1000,1500,2500")
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--scales", default="2.5,4,6")
    p.add_argument("--time-cpu", action="store_true", help="only time CPU steps of each candidate")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    results: dict = {}
    for name in args.candidates.split(","):
        if args.time_cpu:
            t0 = time.perf_counter()
            train(options(name, args.workdir + "-cpu", args.steps, args.ema, "fp32"))
            results[name] = {"cpu_s_per_step": (time.perf_counter() - t0) / args.steps}
            print(name, results[name], flush=True)
            continue
        results[name] = {}
        for steps in map(int, args.checkpoints.split(",")):
            t0 = time.perf_counter()
            r = train(options(name, args.workdir, steps, args.ema, "fp32"))
            t1 = time.perf_counter()
            device = next(r.ema.parameters()).device
            size = CANDIDATES[name][4]
            scales = [float(s) for s in args.scales.split(",")]
            results[name][steps] = {"train_s": round(t1 - t0, 1), "loss": r.losses[-1][1] if r.losses else None,
                                    "ema": score(r.ema, size, device, scales),
                                    "raw": score(r.model, size, device, scales)}
            print(name, steps, json.dumps(results[name][steps]), flush=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
