"""`ditkit train` itself, one recipe an arm, timed by its own log (issue 26: each recipe on its own progress bar).

    PYTHONPATH=src python benchmarks/bench_train_recipes.py --out $OUT/train_recipes.json          # H100, <= 5 min
    PYTHONPATH=src python benchmarks/bench_train_recipes.py --quick --out /tmp/train_recipes.json  # CPU smoke

The script builds a synthetic latent store (random 4×32×32 latents for 256 px, float16, with random float16
features of DINOv2-B's shape, 256 patches × 768, named after a random DINOv2-B-shaped transformers folder it
also writes), then runs `python -m ditkit train` on it for each arm: DiT-XL/2, batch 128, default precision and
compile, `--steps` steps logged every `--log-every`. An arm's figure is the median `images_per_sec` of its
metrics.jsonl records after the first (the first window holds the compile warm-up). Arms:

- plain; repa-stored (REPA's targets read from the store through the DataLoader); tread (the paper's 0.5);
  repa-stored+tread; knobs (RMSNorm, QK-norm, RoPE, SwiGLU); flow and meanflow (`--objective`; compare them
  with each other: MeanFlow's cost over the flow objective it extends).

REPA on the fly cannot run on a latent store (no images there): its cost is bench_repa_tread.py's
repa-onthefly arms (the same TrainStep, the encoder run each step). Arms stop starting after `--budget-s`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _src  # noqa: F401  (first: puts src/ on sys.path when run from a checkout)
import harness
from synthetic_store import make_store

ARMS: list[tuple[str, list[str]]] = [
    ("plain", []),
    ("repa-stored", ["--repa-encoder", "{dino}"]),
    ("tread", ["--tread-rate", "0.5"]),
    ("repa-stored+tread", ["--repa-encoder", "{dino}", "--tread-rate", "0.5"]),
    ("knobs", ["--norm", "rmsnorm", "--qk-norm", "rmsnorm", "--rope", "--mlp", "swiglu"]),
    ("flow", ["--objective", "flow"]),
    ("meanflow", ["--objective", "meanflow"]),  # the dual JVP pass on the rows with r != t
]


def write_dino(folder: Path, quick: bool) -> tuple[int, int]:
    """A random transformers DINOv2 (DINOv2-B's shape; tiny with --quick) saved in `folder`: (tokens, channels)
    of its features at the store's resolution, as `ditkit extract --repa-encoder` would store them."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    if quick:
        config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                              image_size=28, patch_size=14)
    else:
        config = Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                              intermediate_size=3072, image_size=518, patch_size=14)
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(folder)
    return (16 if quick else 256), config.hidden_size  # 224 px / 14 = 16 patches a side (REPA's setting)


def run_arm(name: str, extra: list[str], args: argparse.Namespace, work: Path, dino: Path) -> dict[str, Any]:
    """One `ditkit train` process; its logged images/s after the first logging window."""
    results = work / f"run-{name.replace('+', '-')}"
    model = "DiT-S/2" if args.quick else "DiT-XL/2"
    cmd = [sys.executable, "-m", "ditkit", "train", "--data-path", str(work / "store"), "--model", model,
           "--global-batch-size", str(args.batch), "--max-steps", str(args.steps), "--log-every",
           str(args.log_every), "--ckpt-every", str(10**6), "--results-dir", str(results), "--no-progress",
           "--num-workers", str(args.workers), *[a.format(dino=dino) for a in extra]]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=harness.child_env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"arm": name, "error": done.stderr.strip().splitlines()[-1][:300] if done.stderr else "failed",
                "wall_s": wall}
    records = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["images_per_sec"] for r in records[1:]] or [records[-1]["images_per_sec"]]
    shutil.rmtree(results, ignore_errors=True)  # a DiT-XL/2 checkpoint is ~8 GB: one at a time on the disk
    return {"arm": name, "img_per_s": statistics.median(rates), "windows": len(rates), "wall_s": wall,
            "loss": records[-1]["loss"], "flags": extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU, DiT-S/2 on 8×8 latents, a few steps")
    parser.add_argument("--batch", type=int, default=None, help="default 128 (4 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="steps an arm (default 40; 4 with --quick)")
    parser.add_argument("--log-every", type=int, default=None, help="default 10 (2 with --quick)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 6; 0 with --quick)")
    parser.add_argument("--count", type=int, default=None,
                        help="items in the synthetic store (default 1024: a new epoch, so fresh DataLoader workers, "
                             "every 1024/batch steps, which REPA's 50 MB batches pay more for; 16 with --quick)")
    parser.add_argument("--budget-s", type=float, default=270.0, help="stop starting arms after this many seconds")
    parser.add_argument("--arms", nargs="+", choices=[name for name, _ in ARMS], default=None,
                        help="only these arms (default: all), e.g. --arms flow meanflow")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    args.batch = args.batch or (4 if args.quick else 128)
    args.steps = args.steps or (4 if args.quick else 40)
    args.log_every = args.log_every or (2 if args.quick else 10)
    args.workers = args.workers if args.workers is not None else (0 if args.quick else 6)
    start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="ditkit-recipes-") as tmp:
        work = Path(tmp)
        features = write_dino(work / "dino", args.quick)
        side = 8 if args.quick else 32
        make_store(work / "store", count=args.count or (16 if args.quick else 1024), side=side, features=features,
                   encoder=str(work / "dino"), num_classes=10 if args.quick else 1000)
        for name, extra in ARMS:
            if args.arms and name not in args.arms:
                continue
            if time.perf_counter() - start > args.budget_s:
                print(f"budget of {args.budget_s:.0f} s spent: skipped {name}", flush=True)
                continue
            rows.append(run_arm(name, extra, args, work, work / "dino"))
            print(json.dumps(rows[-1]), flush=True)
    _report(rows, args)
    return 0


def _report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    first = "plain" if any(r["arm"] == "plain" for r in rows) else (rows[0]["arm"] if rows else "plain")
    base = next((r.get("img_per_s") for r in rows if r["arm"] == first), None)
    device = harness.pick_device(None if not args.quick else "cpu")
    print(f"\n`ditkit train` {'DiT-S/2 (quick)' if args.quick else 'DiT-XL/2'}, batch {args.batch}, "
          f"{args.steps} steps an arm")
    print(f"| arm | img/s (logged) | × {first} | wall s |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        rate = r.get("img_per_s")
        ratio = f"{rate / base:.3f}" if rate and base else "-"
        shown = f"{rate:.1f}" if rate else f"failed: {r['error']}"
        print(f"| {r['arm']} | {shown} | {ratio} | {r['wall_s']:.0f} |")
    if args.out:
        harness.write_json(args.out, {"env": harness.environment(device), "batch": args.batch, "steps": args.steps,
                                      "quick": args.quick, "rows": rows})


if __name__ == "__main__":
    raise SystemExit(main())
