"""Sample quality against network evaluations (NFE) for the two objectives on the digits, same model and training.

Takes the two demo runs (`ditkit demo` and `ditkit demo --objective flow`: the same 1.3M-parameter DiT, data,
batch, learning rate, EMA and 2,000 steps; only the objective differs), samples guided digits (scale 2.5 on all
channels, as the demo) with each sampler at several step counts, and scores them with the digits classifier:
accuracy and the digits Fréchet distance (500 samples by default: the floor, real vs real, is about 0.35).
NFE is counted, not computed: network rows evaluated per image, so a guided evaluation counts 2 (the
conditional and the unconditional row).

    PYTHONPATH=src python -m ditkit demo --results-dir results/demo
    PYTHONPATH=src python -m ditkit demo --objective flow --results-dir results/demo-flow
    PYTHONPATH=src python benchmarks/studies/flow_vs_diffusion.py --diffusion-run results/demo \
        --flow-run results/demo-flow --json results/flow_vs_diffusion.json --plot docs/flow_vs_diffusion.png

CPU cost: about 240 guided evaluations of 500 samples in all (about 10 minutes on 2 busy cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import _paths  # noqa: F401  (first: benchmarks/ and src/ on sys.path)
import torch

from ditkit.diffusion import samplers as diffusion_samplers
from ditkit.diffusion.guidance import guided
from ditkit.metrics.digits_classifier import digits_metrics
from ditkit.transport import create_transport
from ditkit.transport import objective as flow

# Kept small: the 2-core machine is shared. NFE without guidance: ddim/dpm-solver/euler = steps, heun = 2 × steps.
SETTINGS = {
    "diffusion": [("ddim", n) for n in (5, 10, 20)] + [("dpm-solver", n) for n in (5, 10, 20)] + [("ddpm", 50)],
    "flow": [("euler", n) for n in (5, 10, 20)] + [("heun", n) for n in (3, 5, 10)]
    + [("dopri5", rtol) for rtol in (1e-2, 1e-3)],
}


class RowCounter:
    """Counts the rows the network evaluates (per image: the NFE, guided rows included)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.rows = model, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kw) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.model(x, t, y, **kw)


def newest_ema(run: Path) -> tuple[torch.nn.Module, dict]:
    """The EMA model of the newest checkpoint of a run folder, and its stored recipe (or {})."""
    from ditkit.weights.checkpoints import load_model

    steps = sorted(p for p in (run / "checkpoints").iterdir() if p.is_dir() and p.name.isdigit())
    if not steps:
        sys.exit(f"no checkpoint in {run}/checkpoints: run the demo for it first (see this script's doc)")
    ema_file = steps[-1] / "ema.safetensors"
    recipe = {}
    try:
        from safetensors import safe_open

        with safe_open(str(ema_file), "pt") as f:
            recipe = json.loads((f.metadata() or {}).get("recipe", "{}"))
    except (OSError, ValueError):
        pass
    return load_model(ema_file), recipe


def run_one(kind: str, model: torch.nn.Module, recipe: dict, sampler: str, n: float, num: int, cfg: float) -> dict:
    labels = torch.arange(num) % 10
    z = torch.randn(num, model.in_channels, model.config.input_size, model.config.input_size,
                    generator=torch.Generator().manual_seed(1))
    counter = RowCounter(model)
    net = guided(counter, cfg, model.num_classes, channels="all")
    start = time.perf_counter()
    with torch.no_grad():
        if kind == "diffusion":
            x = diffusion_samplers.sample(net, z, sampler=sampler, num_steps=int(n), model_kwargs={"y": labels},
                                          clip_denoised=True, learn_sigma=model.config.learn_sigma,
                                          generator=torch.Generator().manual_seed(2))
        else:
            process = recipe.get("process", {})
            transport = create_transport(process.get("path_type", "Linear"), process.get("prediction", "velocity"),
                                         process.get("loss_weight"), process.get("train_eps"),
                                         process.get("sample_eps"))
            if sampler == "dopri5":
                fn = flow.sample_function(transport, "dopri5", 1, atol=float(n) * 1e-2, rtol=float(n))
            else:
                fn = flow.sample_function(transport, sampler, int(n), generator=torch.Generator().manual_seed(2))
            x = fn(z, net, y=labels)[-1]
    seconds = time.perf_counter() - start
    scores = digits_metrics(x.clamp(-1, 1), labels, verbose=False)
    setting = f"rtol {n:g}" if sampler == "dopri5" else f"{int(n)} steps"
    return {"objective": kind, "sampler": sampler, "setting": setting, "nfe": counter.rows / num,
            "accuracy": round(float(scores["accuracy"]), 4), "frechet": round(float(scores["frechet"]), 3),
            "seconds": round(seconds, 1)}


def plot(rows: list[dict], path: Path) -> None:
    from ditkit.apps.scaling import LinePlot

    # ASCII labels: the default bitmap font has no é.
    for metric, label, log_y in (("frechet", "digits Frechet distance (lower is better)", True),
                                 ("accuracy", "digit-class accuracy (higher is better)", False)):
        chart = LinePlot(f"{label.split(' (')[0]} vs network evaluations, digits demo DiT", "NFE per image (guided)",
                         label, log_x=True, log_y=log_y)
        for kind, sampler in dict.fromkeys((r["objective"], r["sampler"]) for r in rows):
            pts = sorted((r["nfe"], r[metric]) for r in rows if (r["objective"], r["sampler"]) == (kind, sampler))
            chart.line(f"{kind}: {sampler}", pts)
        chart.save(path if metric == "frechet" else path.with_name(path.stem + "_accuracy" + path.suffix))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusion-run", type=Path, required=True)
    parser.add_argument("--flow-run", type=Path, required=True)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--cfg-scale", type=float, default=2.5)
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--plot", type=Path, help="draw Fréchet (and accuracy, *_accuracy.png) vs NFE here")
    parser.add_argument("--quick", action="store_true", help="one setting per objective, 100 samples (smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    rows = []
    for kind, run in (("diffusion", args.diffusion_run), ("flow", args.flow_run)):
        model, recipe = newest_ema(run)
        settings = SETTINGS[kind][:1] if args.quick else SETTINGS[kind]
        for sampler, n in settings:
            rows.append(run_one(kind, model, recipe, sampler, n, 100 if args.quick else args.num_samples,
                                args.cfg_scale))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| objective | sampler | setting | NFE | accuracy | digits Fréchet | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['objective']} | {r['sampler']} | {r['setting']} | {r['nfe']:g} | {r['accuracy']:.3f} | "
              f"{r['frechet']:.2f} | {r['seconds']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
