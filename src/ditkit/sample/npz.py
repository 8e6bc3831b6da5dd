"""Evaluation samples: N images in resumable shards over all processes, then one ADM-layout `.npz`.

Every shard's labels and noise depend only on (seed, shard index), so the result does not depend on the number
of GPUs and an interrupted run resumes by skipping the shards already written.
"""

from __future__ import annotations

import json
import math
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditkit.runtime import validate
from ditkit.runtime.errors import UserError
from ditkit.runtime.io import atomic_write, commit_temporary, discard_temporary, new_temporary
from ditkit.runtime.seeding import generator
from ditkit.sample.pipeline import SamplingPipeline
from ditkit.sample.protocol import protocol as sample_protocol


def shard_labels(seed: int, shard: int, size: int, num_classes: int) -> torch.Tensor:
    """A shard's labels, uniform over the classes, fixed by (seed, shard) alone."""
    g = generator(seed, shard)
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


def _rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images  # the ADM layout is RGB


class FinalNpz:
    """OUT/samples_{N}x{H}x{W}x{C}.npz written shard by shard, in np.savez's layout (uncompressed zip64 members
    arr_0.npy, arr_1.npy), so that memory holds one shard, not all N images (50,000 at 256 px are 9.8 GB);
    the file appears complete or not at all (a temporary, renamed by `close`). One thread calls its methods."""

    def __init__(self, out: Path, count: int):
        self.out, self.count = out, count
        self.labels: list[np.ndarray] = []
        self.path: Path | None = None
        self.tmp: str | None = None
        self.written = 0

    def add(self, images: np.ndarray, labels: np.ndarray) -> None:
        """Append the next shard's uint8 images N×H×W×C and labels."""
        if self.tmp is None:
            self._open(images.shape[1:])
        self.member.write(np.ascontiguousarray(images, dtype=np.uint8).data)
        self.written += len(images)
        self.labels.append(labels)

    def _open(self, image_shape: tuple[int, ...]) -> None:
        self.path = self.out / f"samples_{self.count}x{'x'.join(map(str, image_shape))}.npz"
        tmp = new_temporary(self.path)
        try:
            self.zip = zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
            self.member = self.zip.open("arr_0.npy", "w", force_zip64=True)
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": (self.count, *image_shape)}
            np.lib.format.write_array_header_1_0(self.member, header)
        except BaseException as err:
            discard_temporary(tmp, self.path, err)
            raise
        self.tmp = tmp  # from here on `discard` closes and removes it

    def close(self) -> Path:
        """Write the labels, check the count, put the file in place; returns its path."""
        try:
            if self.written != self.count:
                raise RuntimeError(f"{self.written} of {self.count} images reached the final .npz")
            self.member.close()
            with self.zip.open("arr_1.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.concatenate(self.labels), allow_pickle=False)
            self.zip.close()
            commit_temporary(self.tmp, self.path)
        except BaseException as err:
            self.discard(err)
            raise
        return self.path

    def discard(self, err: BaseException | None = None) -> None:
        """Remove the unfinished file (a full disk, named in `err`, becomes a one-line UserError)."""
        if self.tmp is None:
            return
        tmp, self.tmp = self.tmp, None
        try:
            self.member.close()
            self.zip.close()
        except (OSError, ValueError):  # the write that failed may fail again here; the file goes anyway
            pass
        discard_temporary(tmp, self.path, err)


def _store(path: Path, images: np.ndarray | None, labels: np.ndarray | None, final: FinalNpz | None) -> None:
    """Write a new shard (images given) for resuming, or read a finished one back; then append it to `final`."""
    if images is not None:
        images = _rgb(images)
        _write_npz(path, arr_0=images, arr_1=labels)
    elif final is not None:
        with np.load(path) as f:
            images, labels = f["arr_0"], f["arr_1"]
    if final is not None:
        final.add(images, labels)


def sample_npz(
    sampler: SamplingPipeline, num_samples: int, batch_size: int, seed: int, out: Path, rank: int = 0,
    world_size: int = 1,
) -> Path | None:
    """Write this rank's missing shards (shard k goes to rank k mod world_size), then, on rank 0 after all
    ranks finish, OUT/samples_{N}x{H}x{W}x3.npz with uint8 `arr_0` (N×H×W×3) and labels `arr_1`.

    One process writes the final file as it goes (each shard appended after its own file is written), so it is
    complete moments after the last shard; with several, rank 0 assembles it from the shard files at the end."""
    from ditkit.runtime import distributed
    num_shards = math.ceil(num_samples / batch_size)
    _check_settings(out, {**sampler.settings(), "seed": seed, "batch_size": batch_size}, write=rank == 0,
                    protocol=sample_protocol(sampler, num_samples, seed))
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
    final = FinalNpz(out, num_samples) if world_size == 1 else None
    # One writer thread: shard k is written to disk (and appended to the final file) while the GPU samples
    # shard k+1; at most one write is pending, so host memory holds two shards at most, and a write error
    # surfaces at the next shard or at the end. It alone touches `final`.
    with ThreadPoolExecutor(max_workers=1) as writer:
        try:
            path = _sample_shards(sampler, seed, out, num_samples, batch_size, mine if final else todo,
                                  set(todo), writer, final, bar)
        except BaseException as err:
            if final is not None:  # after the pending write; a full disk becomes its one-line error here
                writer.submit(final.discard, err).result()
            raise
    if bar is not None:
        bar.close()
    if final is not None:
        return path
    distributed.barrier()
    if rank != 0:
        return None
    _remove_leftovers(out)  # every rank's writes are over now
    final = FinalNpz(out, num_samples)
    try:
        for k in range(num_shards):
            _store(shard_path(out, k), None, None, final)
    except BaseException as err:
        final.discard(err)
        raise
    return final.close()


def _sample_shards(sampler: SamplingPipeline, seed: int, out: Path, num_samples: int, batch_size: int,
                   shards: list[int], todo: set[int], writer: ThreadPoolExecutor, final: FinalNpz | None,
                   bar: Any) -> Path | None:
    """Sample the `todo` shards among `shards` (in order), handing each to the writer; a finished shard is read
    back into `final` in its turn. Returns the final file's path when `final` is written here."""
    num_classes = sampler.model.config.num_classes
    pending = None
    for k in shards:
        images = labels = None
        if k in todo:
            size = _shard_size(k, num_samples, batch_size)
            labels = shard_labels(seed, k, size, num_classes)
            gen = generator(seed, k, sampler.device)
            images, labels = sampler.images(labels, gen).numpy(), labels.numpy()
        if pending is not None:
            pending.result()
        pending = writer.submit(_store, shard_path(out, k), images, labels, final)
        if bar is not None and k in todo:
            bar.update(1)
    if pending is not None:
        pending.result()
    if final is None:
        return None
    _remove_leftovers(out, keep=final.tmp)  # this process wrote all the shards
    return writer.submit(final.close).result()


def _remove_leftovers(out: Path, keep: str | None = None) -> None:
    """Remove the temporaries of killed runs (`io.new_temporary`'s: shards', settings', and final files', which
    grow with the run) but `keep`, this run's own final file; call when no other writer of this run is active
    (`--out` is locked)."""
    for tmp in [*(out / "shards").glob(".*.tmp"), *out.glob(".*.tmp")]:
        if str(tmp) != keep:
            tmp.unlink(missing_ok=True)


def _check_settings(out: Path, settings: dict[str, Any], write: bool, protocol: dict[str, Any] | None = None) -> None:
    """Refuse to resume into OUT when its shards were made with other settings; record them on first use, with
    the `protocol` (informational, not compared: rewritten when it changes, e.g. a run extended to more samples)."""
    path = out / "settings.json"
    settings = json.loads(json.dumps(settings))  # as it reads back (tuples become lists)
    record = {**settings, **({"protocol": json.loads(json.dumps(protocol))} if protocol is not None else {})}
    if path.exists():
        try:
            stored = validate.settings_json(json.loads(path.read_text()), str(path))
        except (OSError, json.JSONDecodeError):
            stored = None
        stored_protocol = stored.pop("protocol", None) if isinstance(stored, dict) else None
        if stored == settings and write and protocol is not None and stored_protocol != record["protocol"]:
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
        if stored != settings:
            changed = sorted(k for k in settings if not isinstance(stored, dict) or stored.get(k) != settings[k])
            raise UserError(
                f"{out} holds shards sampled with other settings ({', '.join(changed) or 'unreadable'} differ); "
                "use another --out, or delete it to start over"
            )
    elif write:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))


def _shard_size(k: int, num_samples: int, batch_size: int) -> int:
    return min(batch_size, num_samples - k * batch_size)
