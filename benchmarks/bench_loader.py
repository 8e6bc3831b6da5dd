"""Latents/s read from a latent store through a torch DataLoader (shuffled, as training reads it).

Writes a synthetic store of random posteriors in the real layout (256×256 ImageNet: 4×32×32 latents, float16,
image + flip), then times full passes of `ditkit.data.LatentStore` (flip choice + posterior resampling on) for
several worker counts. The first pass after writing may be served from the page cache; on a real 1.28M-image
store (~84 GB at float16) a cold first epoch is bound by the disk instead.

    python benchmarks/bench_loader.py                       # 8192 latents, workers 0,1,2, batch 256
    python benchmarks/bench_loader.py --count 65536 --workers 0,4,8 --json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import _src  # noqa: F401  (first: puts src/ on sys.path when run from a checkout)
from ditkit.data.store import MANIFEST, LatentStore, shard_name


def write_synthetic_store(root: Path, count: int, shard_size: int, channels: int = 4, side: int = 32) -> None:
    """Random mean/std shards plus a minimal manifest: everything LatentStore reads, nothing it does not."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    shards = []
    for k, start in enumerate(range(0, count, shard_size)):
        n = min(shard_size, count - start)
        mean = torch.from_numpy(rng.standard_normal((n, 2, channels, side, side), dtype=np.float32) * 5)
        std = torch.from_numpy(rng.uniform(0.01, 0.1, (n, 2, channels, side, side)).astype(np.float32))
        tensors = {
            "mean": mean.half(),
            "std": std.half(),
            "label": torch.from_numpy(rng.integers(0, 1000, n)),
            "index": torch.arange(start, start + n),
        }
        save_file(tensors, str(root / shard_name(k)))
        shards.append({"file": shard_name(k), "count": n})
    manifest = {
        "format": "ditkit-latents", "version": 1, "vae": "synthetic", "scale": 0.18215, "shift": 0.0,
        "image_size": side * 8, "latent_shape": [channels, side, side], "dtype": "float16", "count": count,
        "num_classes": 1000, "classes": [], "shard_size": shard_size, "shards": shards,
    }
    (root / MANIFEST).write_text(json.dumps(manifest))


def time_loader(store: Path, workers: int, batch_size: int, passes: int) -> float:
    """Best latents/s over `passes` shuffled epochs; workers persist, so only the first pass pays start-up."""
    ds = LatentStore(store, seed=0)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=False,
                        prefetch_factor=4 if workers else None, persistent_workers=workers > 0)
    best = 0.0
    for _ in range(passes):
        start = time.perf_counter()
        seen = 0
        for x, _y in loader:
            seen += x.shape[0]
        best = max(best, seen / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--count", type=int, default=8192, help="latents in the synthetic store")
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--passes", type=int, default=3, help="epochs per setting; the best is reported")
    parser.add_argument("--store", help="time an existing store instead of a synthetic one")
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    args = parser.parse_args()

    torch.set_num_threads(1)  # per-item work is numpy; extra torch threads only contend
    results = []
    with tempfile.TemporaryDirectory(prefix="ditkit-bench-store-") as tmp:
        store = Path(args.store) if args.store else Path(tmp)
        if not args.store:
            t0 = time.perf_counter()
            write_synthetic_store(store, args.count, args.shard_size)
            size = sum(f.stat().st_size for f in store.iterdir()) / 2**20
            print(f"synthetic store: {args.count} latents 4x32x32 float16 (+flip, mean+std), {size:.0f} MiB, "
                  f"written in {time.perf_counter() - t0:.1f} s")
        n = len(LatentStore(store))
        for workers in [int(w) for w in args.workers.split(",")]:
            rate = time_loader(store, workers, args.batch_size, args.passes)
            results.append({"workers": workers, "latents_per_s": round(rate, 1)})
            print(f"workers {workers}: {rate:,.0f} latents/s  (batch {args.batch_size}, {n} latents, shuffled)")
    if args.json:
        print(json.dumps({"benchmark": "loader", "cpus": os.cpu_count(), "torch": torch.__version__,
                          "batch_size": args.batch_size, "count": n, "results": results}))


if __name__ == "__main__":
    main()
