"""`ditkit sample --cache` wall clock on one GPU: DiT-XL/2 (random weights) with an SD-VAE-shaped decoder (random
weights), 256 px, guided (cfg 1.5 on 3 channels, the DiT protocol), DDPM-250 and DPM-Solver++ 20, uncached and
with each cache setting, every job a fresh `ditkit sample --num-samples N` process in the same call.

Each job runs in bench_sample.py's instrumented child, which records when each phase starts and ends; the table
gives the process's wall clock and the shard's sampling time without the VAE decode (what the cache changes),
and the speed-ups against the uncached job of the same sampler. N = 256 images (one shard of 256), not the
50,000 of an evaluation: the per-image cost of the loop is the same, the fixed start-up is not amortised.

    python benchmarks/bench_cache.py --out cache_gpu.json                # one GPU, about 3.5 min on an H100
    PYTHONPATH=src python benchmarks/bench_cache.py --quick --out q.json # CPU smoke run (DiT-S/2, 64 px, seconds)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import _src  # first: puts src/ on sys.path when run from a checkout
import harness

ROOT = _src.ROOT

# (sampler, cache) in the order run; the budget skips the tail. "fast" is the recommended setting.
JOBS = (("ddpm", "off"), ("ddpm", "fast"), ("dpm-solver", "off"), ("dpm-solver", "fast"), ("ddpm", "fora-3"),
        ("dpm-solver", "fora-2"), ("ddpm", "fora-2"))
STEPS = {"ddpm": 250, "dpm-solver": 20}


def make_inputs(work: Path, name: str, image: int) -> tuple[Path, Path]:
    """A DiT checkpoint with every weight random (N(0, 0.02): the official init's zero layers would make the
    blocks identities), and an SD-VAE-shaped decoder folder with random weights (no diffusers needed)."""
    from safetensors.torch import save_file

    from ditkit.encoders.autoencoder import SD_VAE_CONFIG
    from ditkit.encoders.vae_decoder import WEIGHTS, DecoderKL
    from ditkit.models import create_model

    torch.manual_seed(0)
    model = create_model(name, input_size=image // 8, num_classes=1000)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.02)
    ckpt = work / "dit.pt"
    torch.save(model.state_dict(), ckpt)
    config = {"_class_name": "AutoencoderKL", **{k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in SD_VAE_CONFIG.items()}}
    folder = work / "vae"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    decoder = DecoderKL(config)
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(folder / WEIGHTS))
    return ckpt, folder


def _phase(events: list, label: str) -> float:
    """Seconds spent in the phases named `label` (summed)."""
    return sum(end - start for name, start, end in events if name == label)


def run_job(args: argparse.Namespace, work: Path, k: int, sampler: str, cache: str, inputs: tuple[Path, Path],
            timeout: float) -> dict[str, Any]:
    ckpt, vae = inputs
    steps = 4 if args.quick else STEPS[sampler]
    argv = ["--ckpt", str(ckpt), "--model", args.model, "--image-size", str(args.image), "--num-classes", "1000",
            "--vae", str(vae), "--num-samples", str(args.num_samples), "--batch-size", str(args.batch),
            "--sampler", sampler, "--num-steps", str(steps), "--cfg-scale", "1.5", "--cache", cache,
            "--out", str(work / f"samples_{k}"), "--no-progress", *(["--device", args.device] if args.device else [])]
    child = harness.sample_in_child(argv, work / f"events_{k}.json", timeout, tail_chars=1200)
    row = {"sampler": sampler, "steps": steps, "cache": cache, "rc": child["rc"], "wall_s": child["wall_s"],
           "cmd": child["cmd"]}
    if "events" in child:
        ev = child["events"]
        shard, decode = _phase(ev, "shard: sample + decode + to host"), _phase(ev, "VAE decode")
        row.update(shard_s=round(shard, 2), decode_s=round(decode, 2), sampling_s=round(shard - decode, 2))
    if child["rc"] != 0:
        row["tail"] = child["tail"]
    return row


def speedups(rows: list[dict[str, Any]]) -> None:
    """Add each row's speed-up against the uncached row of its sampler (process wall, and sampling alone)."""
    for row in rows:
        off = next((r for r in rows if r["sampler"] == row["sampler"] and r["cache"] == "off" and r["rc"] == 0), None)
        if off is None or row["rc"] != 0:
            continue
        row["speedup_wall"] = round(off["wall_s"] / row["wall_s"], 3)
        if row.get("sampling_s") and off.get("sampling_s"):
            row["speedup_sampling"] = round(off["sampling_s"] / row["sampling_s"], 3)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| sampler | cache | wall s | sampling s (no decode) | × wall | × sampling |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['sampler']} {r['steps']} | {r['cache']} | {r['wall_s']} | {r.get('sampling_s', '-')} | "
                     f"{r.get('speedup_wall', '-')} | {r.get('speedup_sampling', '-')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="DiT-S/2 at 64 px, 4 images, 4 steps: a CPU smoke run")
    p.add_argument("--num-samples", type=int, default=None, help="images per job (default 256; quick 4)")
    p.add_argument("--budget-s", type=float, default=200.0, help="start no job after this (seconds); a job is "
                   "cut 30 s after it")
    args = p.parse_args(argv)
    args.model, args.image = ("DiT-S/2", 64) if args.quick else ("DiT-XL/2", 256)
    args.num_samples = args.num_samples or (4 if args.quick else 256)
    args.batch = args.num_samples
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="ditkit_cache_"))
    inputs = make_inputs(work, args.model, args.image)
    results: dict[str, Any] = {"torch": torch.__version__, "args": vars(args), "rows": []}
    if torch.cuda.is_available() and not args.quick:
        results["gpu"] = torch.cuda.get_device_name()
    for k, (sampler, cache) in enumerate(JOBS[:2] if args.quick else JOBS):  # quick: the plumbing only
        left = args.budget_s - (time.monotonic() - start)
        if left < 15:
            results["rows"].append({"sampler": sampler, "cache": cache, "rc": "skipped (budget)", "steps": 0,
                                    "wall_s": None})
            continue
        results["rows"].append(run_job(args, work, k, sampler, cache, inputs, timeout=left + 30))
        print(json.dumps(results["rows"][-1])[:400], flush=True)
        speedups([r for r in results["rows"] if r.get("wall_s") is not None])
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    print(table([r for r in results["rows"] if r.get("wall_s") is not None]))
    return 0 if all(r["rc"] in (0, "skipped (budget)") for r in results["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
