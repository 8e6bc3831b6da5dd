"""Sample quality of `--precision fp8` (row-wise FP8 block linears) against bf16 and fp32 on a trained model.

The model is the demo's DiT trained on the digits (`ditkit demo`, any device); each precision samples the same
labels from the same seeds with the demo's sampler (DPM-Solver++ 20 steps, cfg 2.5 on all channels), and the
digits yardstick scores them (classifier accuracy, Fréchet distance in its feature space). A second seed in
fp32 gives the seed-to-seed spread that a precision's difference has to be read against. Needs a CUDA GPU with
FP8 units for the fp8 row; the others run anywhere.

    python -m ditkit demo --results-dir results/demo
    PYTHONPATH=src python benchmarks/studies/fp8_quality.py --ckpt results/demo/checkpoints/0002000 \
        --out fp8_quality.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _paths  # noqa: F401  (first: benchmarks/ and src/ on sys.path)
import torch

from ditkit.cli import build_parser
from ditkit.metrics.digits_classifier import score_sampler
from ditkit.models.kernels.fp8 import Float8Linear
from ditkit.sample.pipeline import load_for_sampling


def sampler_for(ckpt: str, precision: str, device: torch.device):
    """The demo's sampling settings through `ditkit sample`'s own loading (its precision set-up included)."""
    argv = ["sample", "--ckpt", ckpt, "--sampler", "dpm-solver", "--num-steps", "20", "--cfg-scale", "2.5",
            "--guide-channels", "all", "--precision", precision, "--no-progress"]
    return load_for_sampling(build_parser(only="sample").parse_args(argv), device)


def fp8_linears(model: torch.nn.Module) -> int:
    return sum(getattr(m, "rows", None) is not None for m in model.modules() if isinstance(m, Float8Linear))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp8"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows: dict[str, dict] = {}
    runs = [(prec, args.seed) for prec in args.precisions] + [("fp32", args.seed + 1)]
    for precision, seed in runs:
        sampler = sampler_for(args.ckpt, precision, device)
        t0 = time.perf_counter()
        scores = score_sampler(sampler, args.num_samples, seed=seed)
        rows[f"{precision} seed {seed}"] = {
            "accuracy": round(float(scores["accuracy"]), 4), "frechet": round(float(scores["frechet"]), 3),
            "fp8_linears": fp8_linears(sampler.model), "seconds": round(time.perf_counter() - t0, 2)}
        print(f"{precision} seed {seed}: {rows[f'{precision} seed {seed}']}", flush=True)
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "ckpt": args.ckpt, "num_samples": args.num_samples, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
