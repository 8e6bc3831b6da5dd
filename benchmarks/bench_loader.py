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

import torch
from torch.utils.data import DataLoader

import _src  # noqa: F401  (first: puts src/ on sys.path when run from a checkout)
from ditkit.data.store import LatentStore
from synthetic_store import make_store


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
            make_store(store, args.count, shard_size=args.shard_size)
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
