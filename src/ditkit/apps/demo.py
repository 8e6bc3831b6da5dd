"""`ditkit demo`: train a small DiT on the built-in digits, sample a guided class grid, and score it.

The whole pipeline in one command on whatever device there is (a 2-core CPU included, in a few minutes):
train (with checkpoints, so an interrupted demo resumes), sample with DPM-Solver++ and classifier-free
guidance, write RESULTS/grid.png, and print the digit-class accuracy and the Fréchet distance in the digit
classifier's features, next to the same distance for real held-out digits (the best a model can do).
Running it again reuses the finished training and only samples.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ditkit.objectives import OBJECTIVES, entry_for
from ditkit.runtime import counts
from ditkit.runtime.errors import UserError

# Chosen with benchmarks/studies/demo_sweep.py (figures in RESULTS.md there, "Demo settings"): the digits at their
# native 8×8 with 2×2 patches (16 tokens), a 4-block, 128-wide DiT (1.3M parameters), batch 64. On the GPU sweep
# its EMA samples reach a digit accuracy of 0.99 after 1,500 steps and 0.998 after 2,000; a step takes about
# 0.1 s on a 2-core CPU, so training takes about 3.5 minutes there.
DEMO_MODEL = "DiT-S/2"
DEMO_OVERRIDES = {"depth": 4, "hidden_size": 128, "num_heads": 2}
DEMO_IMAGE_SIZE = 8
DEMO_BATCH = 64
DEMO_LR = 1e-3
DEMO_EMA = 0.99
DEMO_STEPS = 2000
DEMO_CFG = 2.5
# `--recipe`: the training-only methods of issue 26 (docs/repa_tread.md) on the demo's 4-block model: REPA's tap
# after block 1 of 4 (REPA: 8 of 28), TREAD routing half the tokens around blocks 1..2 (TREAD: 2..depth-4).
DEMO_RECIPES: dict[str, dict] = {
    "plain": {},
    "repa": {"repa_encoder": "digits-mae", "repa_depth": 1, "repa_projector_dim": 256},
    "tread": {"tread_rate": 0.5, "tread_start": 1, "tread_end": 2},
    "repa+tread": {"repa_encoder": "digits-mae", "repa_depth": 1, "repa_projector_dim": 256, "tread_rate": 0.5,
                   "tread_start": 1, "tread_end": 2},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ditkit.apps import demo_text
    parser.add_argument("--text", action="store_true",
                        help="the text-to-image demo instead: prompts on the colour digits (demo_text.py)")
    parser.add_argument("--objective", choices=tuple(OBJECTIVES), default="diffusion",
                        help="the objective to train (same model, data, steps), sampled with its preview sampler: "
                        + ", ".join(f"{e.name}: {e.preview[0]} {e.preview[1]} steps" for e in OBJECTIVES.values())
                        + " (meanflow: scored at 1 and 2 steps; docs/meanflow.md)")
    parser.add_argument("--recipe", choices=tuple(DEMO_RECIPES), default="plain",
                        help="train with REPA (digits-mae encoder), TREAD, both, or neither (default); see "
                        "docs/repa_tread.md")
    parser.add_argument("--results-dir", default=None,
                        help="run folder (default results/demo, results/demo-flow / demo-meanflow with --objective, "
                        "or results/demo_text with --text)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps (default {DEMO_STEPS}, {demo_text.DEMO_STEPS} with --text)")
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help=f"guidance scale (default {DEMO_CFG}, {demo_text.DEMO_CFG:g} with --text)")
    parser.add_argument("--num-samples", type=int, default=1000, help="samples scored (default 1000)")
    parser.add_argument("--per-class", type=int, default=10, help="grid columns per class (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")


def run(args: argparse.Namespace) -> int:
    from ditkit.metrics.digits_classifier import real_digits_frechet, score_sampler
    from ditkit.sample import SamplingPipeline, sample_grid
    from ditkit.train import TrainOptions, train

    counts.demo_flags(args)  # before minutes of training
    if args.text:
        from ditkit.apps import demo_text
        return demo_text.run_text(args)
    objective = getattr(args, "objective", "diffusion")
    if objective == "meanflow":  # issue 27: scored at 1 and 2 steps, in its own module
        from ditkit.apps import demo_meanflow
        return demo_meanflow.run_meanflow(args, dict(model=DEMO_MODEL, image_size=DEMO_IMAGE_SIZE, lr=DEMO_LR,
                                                     global_batch_size=DEMO_BATCH, ema_decay=DEMO_EMA,
                                                     model_overrides=DEMO_OVERRIDES))
    recipe = getattr(args, "recipe", "plain")
    suffix = "" if recipe == "plain" else "-" + recipe.replace("+", "-")
    base = "results/demo" if objective == "diffusion" else f"results/demo-{objective}"
    args.results_dir = args.results_dir or base + suffix
    args.steps = DEMO_STEPS if args.steps is None else args.steps
    args.cfg_scale = DEMO_CFG if args.cfg_scale is None else args.cfg_scale
    for name in ("steps", "num_samples", "per_class"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not math.isfinite(args.cfg_scale) or args.cfg_scale < 0:
        raise UserError(f"--cfg-scale must be a finite number >= 0 (1 = no guidance), got {args.cfg_scale}")
    if args.num_samples < 20:
        raise UserError(f"--num-samples must be at least 20 for a meaningful score, got {args.num_samples}")
    results = Path(args.results_dir)
    start = time.perf_counter()
    print(f"[1/3] training a small DiT on the digits ({args.steps} steps, batch {DEMO_BATCH}) -> {results}",
          file=sys.stderr)
    result = train(
        TrainOptions(
            data_path="digits",
            model=DEMO_MODEL,
            image_size=DEMO_IMAGE_SIZE,
            global_batch_size=DEMO_BATCH,
            lr=DEMO_LR,
            ema_decay=DEMO_EMA,
            max_steps=args.steps,
            log_every=50,
            ckpt_every=250,
            keep_last=2,
            global_seed=args.seed,
            results_dir=str(results),
            resume="auto",
            num_workers=0,
            model_overrides=DEMO_OVERRIDES,
            objective=objective,
            **DEMO_RECIPES[recipe],
        )
    )
    if result.stopped_by_signal:  # a stop was asked for: don't go on to sample a half-trained model
        print(f"training stopped by a signal at step {result.step} (checkpoint written); run the same command "
              "again to continue from there", file=sys.stderr)
        return 0
    trained = time.perf_counter()
    device = next(result.ema.parameters()).device
    # About 20 network evaluations per image: DPM-Solver++ 20 steps, or Heun 10 steps on the flow model
    # (at that budget Heun beat Euler 20 steps on the digits' Fréchet distance, 2.87 vs 3.24: benchmarks/RESULTS.md)
    preview, steps = entry_for(objective).preview
    sampler = SamplingPipeline(model=result.ema, vae=None, sampler=preview, num_steps=steps,
                      cfg_scale=args.cfg_scale,
                      guide_channels="all", device=device, progress=True, recipe=result.recipe)
    print(f"[2/3] sampling: {sampler.describe()}", file=sys.stderr)
    grid = sample_grid(sampler, list(range(10)), args.per_class, args.seed, results, save_images=False)
    print(f"[3/3] scoring {args.num_samples} samples with the digits classifier", file=sys.stderr)
    scores = score_sampler(sampler, args.num_samples, seed=args.seed + 1)
    # As many real digits (the train split has 1,437): the distance a perfect generator would get.
    floor = real_digits_frechet(DEMO_IMAGE_SIZE, min(args.num_samples, 1437))
    done = time.perf_counter()
    figures = {
        "accuracy": round(float(scores["accuracy"]), 4),
        "frechet": round(float(scores["frechet"]), 3),
        "frechet_real_vs_real": round(float(floor), 3),
        "train_seconds": round(trained - start, 1),
        "total_seconds": round(done - start, 1),
        "grid": str(grid),
    }
    (results / "demo.json").write_text(json.dumps(figures, indent=2))
    print(f"sample grid: {grid}")
    print(f"digit-class accuracy of {args.num_samples} guided samples: {figures['accuracy']:.3f}")
    print(f"digits Fréchet distance: {figures['frechet']:.2f} (real digits vs held-out real digits, same count: "
          f"{figures['frechet_real_vs_real']:.2f})")
    print(f"time: {figures['train_seconds']:.0f} s training, {figures['total_seconds']:.0f} s in all, on {device}")
    if args.json:
        print(json.dumps(figures))
    return 0
