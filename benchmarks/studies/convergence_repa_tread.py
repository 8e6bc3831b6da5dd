"""Convergence on the digits with REPA, TREAD, both, or neither, on both objectives, several seeds (issue 26).

Every run is `ditkit train` (ditkit.train.train) with the same small DiT, data, batch, learning rate, EMA and step
budget; only `--repa-*` / `--tread-*` and the objective differ. Checkpoints are written at fixed steps and each
EMA is scored afterwards with the digits classifier (class accuracy and the digits Fréchet distance of guided
samples, as `ditkit demo` scores them), so the training wall clock of a run is its own (no evaluation inside).

REPA's frozen encoder is `digits-mae` (ditkit.encoders.features): a conv encoder trained self-supervised (masked-
patch reconstruction, no labels) on the digits train split — not the classifier that scores the samples.

    flock /tmp/cpu-heavy.lock nice -n 5 env PYTHONPATH=src python benchmarks/studies/convergence_repa_tread.py \
        --out results/convergence_repa_tread.json --plot docs/convergence_repa_tread.png

Runs already in --out are skipped, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import _paths  # noqa: F401, E402  (benchmarks/ and src/ on sys.path)
import torch

from ditkit.runtime.io import atomic_write  # noqa: E402

MODEL = "DiT-S/2"
OVERRIDES = {"depth": 6, "hidden_size": 64, "num_heads": 2}  # 16 tokens (8×8 digits, 2×2 patches)
ARMS: dict[str, dict[str, Any]] = {
    "plain": {},
    "repa": {"repa_encoder": "digits-mae", "repa_depth": 2, "repa_projector_dim": 256},
    "tread": {"tread_rate": 0.5, "tread_start": 1, "tread_end": 4},
    "repa+tread": {"repa_encoder": "digits-mae", "repa_depth": 2, "repa_projector_dim": 256,
                   "tread_rate": 0.5, "tread_start": 1, "tread_end": 4},
}
OBJECTIVES = ("diffusion", "flow")
CFG = 2.5  # the demo's guidance (all channels)


def train_run(arm: str, objective: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one run (resuming a finished one is a no-op); returns its wall clock and checkpoint folder."""
    from ditkit.train import TrainOptions, train

    folder = Path(args.runs) / f"{arm}-{objective}-s{seed}"
    start = time.perf_counter()
    train(TrainOptions(
        data_path="digits", model=MODEL, image_size=8, global_batch_size=args.batch, lr=1e-3, ema_decay=0.99,
        max_steps=args.steps, log_every=args.eval_every, ckpt_every=args.eval_every, global_seed=seed,
        results_dir=str(folder), resume="auto", num_workers=0, progress=False, model_overrides=dict(OVERRIDES),
        objective=objective, **ARMS[arm],
    ))
    return {"train_seconds": time.perf_counter() - start, "folder": str(folder)}


def score_run(folder: str, objective: str, args: argparse.Namespace) -> dict[int, dict[str, float]]:
    """Accuracy and Fréchet distance of the EMA at each checkpoint (guided, as the demo samples)."""
    from ditkit.weights.checkpoints import load_model_with_recipe
    from ditkit.metrics.digits_classifier import score_sampler
    from ditkit.sample import Sampler

    scores = {}
    for step in range(args.eval_every, args.steps + 1, args.eval_every):
        model, recipe = load_model_with_recipe(Path(folder) / "checkpoints" / f"{step:07d}")
        sampler = Sampler(model=model, vae=None, sampler="heun" if objective == "flow" else "dpm-solver",
                          num_steps=10 if objective == "flow" else 20, cfg_scale=CFG, guide_channels="all",
                          device=torch.device("cpu"), progress=False, recipe=recipe)
        got = score_sampler(sampler, args.eval_samples, seed=1)
        scores[step] = {"accuracy": float(got["accuracy"]), "frechet": float(got["frechet"])}
    return scores


def summary(record: dict[str, Any], args: argparse.Namespace) -> str:
    """Markdown table: per arm and objective, mean ± spread over seeds at each step, wall clock, steps to 0.98."""
    steps = list(range(args.eval_every, args.steps + 1, args.eval_every))
    head = "| objective | recipe | train s/run | " + " | ".join(f"Fréchet @{s}" for s in steps)
    lines = [head + " | accuracy @last | steps to acc ≥ 0.98 |", "|" + " --- |" * (len(steps) + 5)]
    for objective in OBJECTIVES:
        for arm in ARMS:
            runs = [r for r in record["runs"] if r["arm"] == arm and r["objective"] == objective]
            if not runs:
                continue
            cells = []
            for s in steps:
                vals = [r["scores"][str(s)]["frechet"] for r in runs]
                cells.append(f"{statistics.mean(vals):.2f} [{min(vals):.2f}–{max(vals):.2f}]")
            acc = [r["scores"][str(steps[-1])]["accuracy"] for r in runs]
            reach = [next((s for s in steps if r["scores"][str(s)]["accuracy"] >= 0.98), None) for r in runs]
            reach_text = ", ".join("—" if s is None else str(s) for s in reach)
            secs = statistics.mean(r["train_seconds"] for r in runs)
            lines.append(f"| {objective} | {arm} | {secs:.0f} | " + " | ".join(cells)
                         + f" | {statistics.mean(acc):.3f} [{min(acc):.3f}–{max(acc):.3f}] | {reach_text} |")
    return "\n".join(lines)


def draw(record: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    """Fréchet vs steps, one panel per objective, one line per recipe (seed mean), the seeds' range as a band."""
    from PIL import Image, ImageDraw

    from ditkit.apps.scaling import PALETTE, _font, _text, axis_ticks

    steps = list(range(args.eval_every, args.steps + 1, args.eval_every))
    w, h, left, top, pw, ph = 1200, 520, 70, 50, 420, 380
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img, "RGBA")
    allv = [r["scores"][str(s)]["frechet"] for r in record["runs"] for s in steps]
    lo, hi = 0.0, max(allv) * 1.05
    for k, objective in enumerate(OBJECTIVES):
        x0 = left + k * (pw + 90)

        def px(step: float, v: float, x0: int = x0) -> tuple[float, float]:
            return x0 + (step - steps[0]) / max(1, steps[-1] - steps[0]) * pw, top + ph - (v - lo) / (hi - lo) * ph

        for t in axis_ticks(lo, hi, False):
            d.line([px(steps[0], t), px(steps[-1], t)], fill="#e6e6e6")
            _text(d, (x0 - 6, px(steps[0], t)[1]), f"{t:g}", _font(12), "rm")
        for s in steps:
            _text(d, (px(s, lo)[0], top + ph + 6), str(s), _font(12), "ma")
        d.rectangle([x0, top, x0 + pw, top + ph], outline="black")
        _text(d, (x0 + pw / 2, 15), f"{objective}: digits Frechet distance vs training steps", _font(15), "ma")
        for i, arm in enumerate(ARMS):
            runs = [r for r in record["runs"] if r["arm"] == arm and r["objective"] == objective]
            if not runs:
                continue
            color = PALETTE[i % len(PALETTE)]
            vals = [[r["scores"][str(s)]["frechet"] for r in runs] for s in steps]
            band = [px(s, max(v)) for s, v in zip(steps, vals)] + [px(s, min(v)) for s, v in reversed(
                list(zip(steps, vals)))]
            rgb = tuple(int(color[j:j + 2], 16) for j in (1, 3, 5))
            d.polygon(band, fill=(*rgb, 50))
            d.line([px(s, statistics.mean(v)) for s, v in zip(steps, vals)], fill=color, width=3)
            if k == 1:
                _text(d, (x0 + pw + 12, top + 12 + 22 * i), f"{arm} ({len(runs)} seeds)", _font(13), "lm", color)
    _text(d, (w / 2 - 60, h - 20), "training steps (band: min-max over seeds; line: mean)", _font(13), "ma")
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    p.add_argument("--runs", default="results/convergence_repa_tread", help="the runs' folders")
    p.add_argument("--out", default="results/convergence_repa_tread.json")
    p.add_argument("--plot", default=None, help="write the picture here (PNG)")
    p.add_argument("--report-only", action="store_true", help="no training: the table and picture from --out")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {"settings": {}, "runs": []}
    record["settings"] = {k: getattr(args, k) for k in ("steps", "eval_every", "batch", "eval_samples")} | {
        "model": MODEL, "overrides": OVERRIDES, "arms": ARMS, "cfg": CFG}
    done = {(r["arm"], r["objective"], r["seed"]) for r in record["runs"]}
    # seeds outermost: a cut-short study still has every recipe at the first seeds
    for seed in [] if args.report_only else args.seeds:
        for objective in args.objectives:
            for arm in args.arms:
                if (arm, objective, seed) in done:
                    continue
                run = train_run(arm, objective, seed, args)
                run.update(arm=arm, objective=objective, seed=seed, scores=score_run(run["folder"], objective, args))
                record["runs"].append(run)
                atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
                last = run["scores"][args.steps]
                print(f"{arm:>10} {objective:>9} seed {seed}: {run['train_seconds']:.0f} s, Fréchet "
                      f"{last['frechet']:.2f}, accuracy {last['accuracy']:.3f}", flush=True)
    record = json.loads(out.read_text())
    print(summary(record, args))
    if args.plot:
        draw(record, args, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
