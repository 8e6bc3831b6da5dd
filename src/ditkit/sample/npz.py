"""Evaluation samples: N images in resumable shards over all processes, then one ADM-layout `.npz`.

Every shard's labels and noise depend only on (seed, shard index), so the result does not depend on the number
of GPUs and an interrupted run resumes by skipping the shards already written.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditkit.errors import UserError
from ditkit.io import atomic_write
from ditkit.sample.pipeline import Sampler


def shard_labels(seed: int, shard: int, size: int, num_classes: int) -> torch.Tensor:
    """A shard's labels, uniform over the classes, fixed by (seed, shard) alone."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + shard)
    return torch.randint(0, num_classes, (size,), generator=g)


def shard_path(out: Path, shard: int) -> Path:
    return out / "shards" / f"shard_{shard:06d}.npz"


def _shard_done(path: Path, size: int) -> bool:
    """A shard file that is complete (atomically written, so a readable one with the right count is done)."""
    try:
        with np.load(path) as f:
            return f["arr_0"].shape[0] == size
    except (OSError, ValueError, KeyError):
        return False


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a temp name
            np.savez(f, **arrays)

    atomic_write(path, write)


def _write_shard(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)  # the ADM layout is RGB
    _write_npz(path, arr_0=images, arr_1=labels)


def sample_npz(
    sampler: Sampler, num_samples: int, batch_size: int, seed: int, out: Path, rank: int = 0, world_size: int = 1
) -> Path | None:
    """Write this rank's missing shards (shard k goes to rank k mod world_size), then, on rank 0 after all
    ranks finish, OUT/samples_{N}x{H}x{W}x3.npz with uint8 `arr_0` (N×H×W×3) and labels `arr_1`."""
    from ditkit import distributed

    num_shards = math.ceil(num_samples / batch_size)
    num_classes = sampler.model.config.num_classes
    _check_settings(out, {**sampler.settings(), "seed": seed, "batch_size": batch_size}, write=rank == 0)
    mine = [k for k in range(num_shards) if k % world_size == rank]
    todo = [k for k in mine if not _shard_done(shard_path(out, k), _shard_size(k, num_samples, batch_size))]
    if rank == 0:
        print(
            f"sampling {num_samples} images in {num_shards} shards of {batch_size} over {world_size} "
            f"process(es); {len(mine) - len(todo)} of this process's {len(mine)} shards already done"
        )
    bar = None
    if sampler.progress and rank == 0 and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="shards", unit="shard")
    # One writer thread: shard k is written to disk while the GPU samples shard k+1 (at most one pending write,
    # so host memory holds two shards at most; a write error surfaces at the next shard or at the end).
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for k in todo:
            size = _shard_size(k, num_samples, batch_size)
            labels = shard_labels(seed, k, size, num_classes)
            generator = torch.Generator(device=sampler.device).manual_seed(seed * 1_000_003 + k)
            images = sampler.images(labels, generator).numpy()
            if pending is not None:
                pending.result()
            pending = writer.submit(_write_shard, shard_path(out, k), images, labels.numpy())
            if bar is not None:
                bar.update(1)
        if pending is not None:
            pending.result()
    if bar is not None:
        bar.close()
    distributed.barrier()
    if rank != 0:
        return None
    for tmp in (out / "shards").glob(".shard_*.tmp"):  # left by killed runs; every rank's writes are over now
        tmp.unlink(missing_ok=True)
    arrays, labels = [], []
    for k in range(num_shards):
        with np.load(shard_path(out, k)) as f:
            arrays.append(f["arr_0"])
            labels.append(f["arr_1"])
    images = np.concatenate(arrays)[:num_samples]
    n, h, w, c = images.shape
    final = out / f"samples_{n}x{h}x{w}x{c}.npz"
    _write_npz(final, arr_0=images, arr_1=np.concatenate(labels)[:num_samples])
    return final


def _check_settings(out: Path, settings: dict[str, Any], write: bool) -> None:
    """Refuse to resume into OUT when its shards were made with other settings; record them on first use."""
    path = out / "settings.json"
    settings = json.loads(json.dumps(settings))  # as it reads back (tuples become lists)
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            stored = None
        if stored != settings:
            changed = sorted(k for k in settings if not isinstance(stored, dict) or stored.get(k) != settings[k])
            raise UserError(
                f"{out} holds shards sampled with other settings ({', '.join(changed) or 'unreadable'} differ); "
                "use another --out, or delete it to start over"
            )
    elif write:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=1)))


def _shard_size(k: int, num_samples: int, batch_size: int) -> int:
    return min(batch_size, num_samples - k * batch_size)
