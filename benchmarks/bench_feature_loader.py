"""How fast `ditkit train`'s DataLoader feeds a step from a latent store, with and without REPA's stored features.

The loader is built as `ditkit train` builds it (train/loop.py: a fresh DataLoader each epoch over `GlobalBatches`,
prefetch 4, pinned memory on a GPU) on a synthetic store (benchmarks/synthetic_store.py: 4×32×32 latents, and
DINOv2-B-shaped float16 features 256×768 of the image and its flip). The consumer stands in for the GPU step: it
sleeps `--step-ms` per batch (the GPU works while the CPU waits), after touching the batch as the pin-memory copy
would (a copy on the CPU). Printed for each arm and worker count: the wait for each epoch's first batch (fresh
workers), the mean wait per later batch, and the epoch's time against its steps × step-ms. A small store (few steps
per epoch) pays the first-batch wait often, which is what a 40-step run on a 1,024-item store measures.

    PYTHONPATH=src python benchmarks/bench_feature_loader.py --quick            # CPU, ~1 min
    PYTHONPATH=src python benchmarks/bench_feature_loader.py --workers 6 --count 1024 --step-ms 236
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

import _src  # noqa: F401  (puts src/ on sys.path when run from a checkout)
from ditkit.data.feature_store import AlignedLatents, StoredFeatures
from ditkit.data.store import LatentStore
from ditkit.runtime.seeding import generator as seeded
from ditkit.train.batches import GlobalBatches
from synthetic_store import make_store


def open_arm(root: Path, arm: str) -> Any:
    """The training dataset of `arm`: the plain latent store or the store with its features (`AlignedLatents`)."""
    store = LatentStore(root, seed=0)
    return store if arm == "plain" else AlignedLatents(store, StoredFeatures(root, store.manifest))


def epoch_loader(dataset: Any, batch: int, workers: int, epoch: int, stacked: bool = True) -> Any:
    """The DataLoader of one epoch, with `ditkit train`'s settings (train/loop.py `Trainer.loader`); `stacked`
    False: torch's default collate (the items split and stacked again, as before `AlignedLatents.collate`)."""
    dataset.set_epoch(epoch)
    batches = GlobalBatches(len(dataset), batch, 0, 1, 0, epoch, 0)
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=4 if workers else None, generator=seeded(0, epoch),
                      collate_fn=getattr(dataset, "collate", None) if stacked else None)


def time_epochs(dataset: Any, batch: int, workers: int, epochs: int, step_s: float,
                stacked: bool) -> dict[str, float]:
    """Waits for the first batch of each epoch and for the later ones, and epoch time over steps × step time."""
    first, later, ends, ratio = [], [], [], []
    for epoch in range(epochs):
        start = t0 = time.perf_counter()
        steps = 0
        for k, (x, *rest) in enumerate(epoch_loader(dataset, batch, workers, epoch, stacked)):
            (first if k == 0 else later).append(time.perf_counter() - t0)
            for t in (x, *rest[1:]):
                t.clone()  # the pin-memory copy of the batch (pinned memory needs a GPU)
            time.sleep(step_s)
            steps += 1
            t0 = time.perf_counter()
        ends.append(time.perf_counter() - t0)  # the last next(): the workers' shutdown
        ratio.append((time.perf_counter() - start) / max(steps * step_s, 1e-9))
    return {"first_batch_ms": 1e3 * statistics.median(first),
            "later_wait_ms": 1e3 * statistics.mean(later) if later else 0.0,
            "end_ms": 1e3 * statistics.median(ends), "epoch_over_steps": statistics.median(ratio)}


def time_getitems(dataset: Any, batch: int, repeats: int, stacked: bool) -> float:
    """Milliseconds for one batch read and collated in this process (`__getitems__` + the loader's collate)."""
    from torch.utils.data import default_collate

    collate = getattr(dataset, "collate", default_collate) if stacked else default_collate
    times = []
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    for r in range(repeats):
        idx = order[(r * batch) % (len(dataset) - batch + 1):][:batch]
        t0 = time.perf_counter()
        collate(dataset.__getitems__(idx))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU sizes: 1,024 items, workers 1,2, 3 epochs")
    parser.add_argument("--count", type=int, default=1024, help="items in the synthetic store")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", default="6", help="comma-separated worker counts")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--step-ms", type=float, default=236.0, help="the consumer's time per step")
    parser.add_argument("--store", default=None, help="reuse (or write) the synthetic store here")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.workers, args.epochs = "1,2", 3
    with tempfile.TemporaryDirectory(prefix="ditkit-feedbench-") as tmp:
        root = Path(args.store or tmp) / "store"
        if not (root / "manifest.json").exists():
            make_store(root, count=args.count, features=(256, 768), encoder="random-dinov2-b")
        rows = []
        for arm in ("plain", "features", "features-default-collate"):
            dataset, stacked = open_arm(root, arm), arm != "features-default-collate"
            getitems_ms = time_getitems(dataset, args.batch, repeats=5, stacked=stacked)
            for workers in [int(w) for w in args.workers.split(",")]:
                row = {"arm": arm, "workers": workers, "getitems_ms": getitems_ms,
                       **time_epochs(dataset, args.batch, workers, args.epochs, args.step_ms / 1e3, stacked)}
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
