"""`ditkit demo --objective meanflow`: the digits demo's model, data and budget, trained with MeanFlow and
sampled in 1 and 2 network evaluations per image, scored as the diffusion and flow demos are.

Guidance is trained in (the target's ω, `--cfg-scale` here), so the samples are unguided: one evaluation is
one image. Writes RESULTS/grid.png (1 step) and RESULTS/grid-2step/grid.png, and RESULTS/demo.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ditkit.runtime.errors import UserError

# The diffusion demo's network and optimiser (demo.py) and the paper's MeanFlow settings; DEMO_OMEGA is the
# target's folded guidance scale ω (κ 0, the model's 10 % class dropout), set before the one CPU run measured
# (docs/meanflow.md: 1 step accuracy 0.994, Fréchet 2.12; 2 steps 0.999, 1.83; 510 s); not tuned.
DEMO_STEPS = 2000
DEMO_OMEGA = 2.0
DEMO_SETTINGS = "ratio_r_neq_t=0.25"
SAMPLE_STEPS = (1, 2)


def _train(args: argparse.Namespace, results: Path, base: dict):
    from ditkit.train import TrainOptions, train

    return train(TrainOptions(
        data_path="digits", **base, max_steps=args.steps, log_every=50, ckpt_every=250, keep_last=2,
        global_seed=args.seed, results_dir=str(results), resume="auto", num_workers=0, objective="meanflow",
        meanflow=f"omega={args.cfg_scale},{DEMO_SETTINGS}",
    ))


def _score(result, args: argparse.Namespace, results: Path) -> dict:
    """Grid and digits scores of the EMA model at 1 and 2 steps."""
    from ditkit.metrics.digits_classifier import score_sampler
    from ditkit.sample import Sampler, sample_grid

    device = next(result.ema.parameters()).device
    figures: dict = {}
    for steps in SAMPLE_STEPS:
        sampler = Sampler(model=result.ema, vae=None, sampler="meanflow", num_steps=steps, cfg_scale=1.0,
                          device=device, recipe=result.recipe)
        print(f"[2/3] sampling: {sampler.describe()}", file=sys.stderr)
        folder = results if steps == 1 else results / f"grid-{steps}step"
        folder.mkdir(parents=True, exist_ok=True)
        grid = sample_grid(sampler, list(range(10)), args.per_class, args.seed, folder, save_images=False)
        print(f"[3/3] scoring {args.num_samples} samples with the digits classifier", file=sys.stderr)
        start = time.perf_counter()
        scores = score_sampler(sampler, args.num_samples, seed=args.seed + 1)
        figures[f"{steps}step"] = {"accuracy": round(float(scores["accuracy"]), 4),
                                   "frechet": round(float(scores["frechet"]), 3),
                                   "sample_seconds": round(time.perf_counter() - start, 2), "grid": str(grid)}
    return figures


def run_meanflow(args: argparse.Namespace, base: dict) -> int:
    """The MeanFlow digits demo (see the module doc); `args` as `ditkit demo` parses them, `base` the diffusion
    demo's TrainOptions settings (model, image_size, global_batch_size, lr, ema_decay, model_overrides)."""
    from ditkit.metrics.digits_classifier import real_digits_frechet

    args.results_dir = args.results_dir or "results/demo-meanflow"
    args.steps = DEMO_STEPS if args.steps is None else args.steps
    args.cfg_scale = DEMO_OMEGA if args.cfg_scale is None else args.cfg_scale
    for name in ("steps", "num_samples", "per_class"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.num_samples < 20:
        raise UserError(f"--num-samples must be at least 20 for a meaningful score, got {args.num_samples}")
    if not (math.isfinite(args.cfg_scale) and args.cfg_scale > 0):
        raise UserError(f"--cfg-scale (MeanFlow's trained-in ω) must be a finite number > 0, got {args.cfg_scale}")
    results = Path(args.results_dir)
    start = time.perf_counter()
    print(f"[1/3] training a small DiT with MeanFlow on the digits ({args.steps} steps, batch "
          f"{base['global_batch_size']}, "
          f"guidance ω {args.cfg_scale:g} trained in) -> {results}", file=sys.stderr)
    result = _train(args, results, base)
    if result.stopped_by_signal:
        print(f"training stopped by a signal at step {result.step} (checkpoint written); run the same command "
              "again to continue from there", file=sys.stderr)
        return 0
    trained = time.perf_counter()
    figures = _score(result, args, results)
    floor = real_digits_frechet(base["image_size"], min(args.num_samples, 1437))
    figures.update(frechet_real_vs_real=round(float(floor), 3), train_seconds=round(trained - start, 1),
                   total_seconds=round(time.perf_counter() - start, 1))
    (results / "demo.json").write_text(json.dumps(figures, indent=2))
    for steps in SAMPLE_STEPS:
        got = figures[f"{steps}step"]
        print(f"{steps} step{'s' if steps > 1 else ''} ({steps} network evaluation{'s' if steps > 1 else ''} per "
              f"image): digit-class accuracy {got['accuracy']:.3f}, digits Fréchet distance {got['frechet']:.2f}; "
              f"grid {got['grid']}")
    print(f"real digits vs held-out real digits, same count: Fréchet {figures['frechet_real_vs_real']:.2f}")
    print(f"time: {figures['train_seconds']:.0f} s training, {figures['total_seconds']:.0f} s in all")
    if args.json:
        print(json.dumps(figures))
    return 0
