"""`ditkit extract`: encode an image folder once into a latent store, and read it back for training.

Training on stored latents takes the VAE out of the training loop. For every image the store keeps the VAE
posterior N(mean, std²) of the image AND of its horizontal flip, so training can still draw a fresh flip and a
fresh posterior sample each epoch, exactly as on-the-fly encoding would.

Store layout (a folder):
    manifest.json              written last; its presence marks a complete store
    shard-00000.safetensors    images [k·S, (k+1)·S) of the sorted file list, S = shard size
        mean, std   N×2×C×h×w  (float16 or float32; [:, 0] the image, [:, 1] its flip; unscaled VAE units)
        label       N          int64
        index       N          int64 position in the sorted file list (unreadable images are left out)

Shards are written atomically, one at a time, so an interrupted extract resumes by skipping finished shards and
ends with the same bytes as an uninterrupted one. Under `torchrun` rank r encodes shards r, r+W, r+2W, ...
Shards are plain safetensors files, read here through a memory map (no copy, no full read).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import struct
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ditkit.checkpoints import atomic_write
from ditkit.data.images import center_crop_arr, check_image_size, find_images, load_rgb
from ditkit.errors import UserError
from ditkit.folder_lock import FolderLock

MANIFEST = "manifest.json"
FORMAT = "ditkit-latents"
VERSION = 1
SHARD_META_KEY = "ditkit_shard"  # one metadata key: safetensors writes a multi-key map in arbitrary order
STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_SAFETENSORS_TO_NUMPY = {"F16": np.float16, "F32": np.float32, "I64": np.int64}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def is_latent_store(path: str | os.PathLike) -> bool:
    """A latent store is recognised by its manifest file."""
    return (Path(path) / MANIFEST).is_file()


# ----------------------------------------------------------------------------------------------- shard files


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the byte offset where its tensor data starts."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(length))
        return header, 8 + length
    except (OSError, ValueError, struct.error) as err:
        raise UserError(f"{path} is not a readable shard ({err}); delete it and rerun ditkit extract") from None


def shard_metadata(path: Path) -> dict[str, Any] | None:
    """The ditkit metadata of a finished shard, or None when the file is absent or not a ditkit shard."""
    if not path.is_file():
        return None
    header, _ = _read_header(path)
    raw = (header.get("__metadata__") or {}).get(SHARD_META_KEY)
    return json.loads(raw) if raw else None


def open_shard(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a shard as read-only numpy memory maps (pages are read only when touched)."""
    header, start = _read_header(path)
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_TO_NUMPY:
            raise UserError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == begin:  # an empty tensor cannot be memory-mapped
            arrays[name] = np.zeros(shape, dtype=_SAFETENSORS_TO_NUMPY[info["dtype"]])
            continue
        arrays[name] = np.memmap(
            path, dtype=_SAFETENSORS_TO_NUMPY[info["dtype"]], mode="r", offset=start + begin, shape=shape
        )
    return arrays


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    blob = {SHARD_META_KEY: json.dumps(meta, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=blob))


# ----------------------------------------------------------------------------------------------- extraction


class _CropDataset(Dataset):
    """Item i: (i, center-cropped uint8 H×W×3 tensor of file i, or an empty tensor if it is unreadable)."""

    def __init__(self, paths: list[Path], image_size: int) -> None:
        self.paths, self.image_size = paths, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        img = load_rgb(self.paths[i])
        if img is None:
            return i, torch.empty(0, dtype=torch.uint8)
        return i, torch.from_numpy(np.array(center_crop_arr(img, self.image_size), dtype=np.uint8))


def _collate(items: list[tuple[int, torch.Tensor]]) -> tuple[list[int], list[int], torch.Tensor | None]:
    """(all positions, readable positions, stacked readable images): unreadable ones are counted, not encoded."""
    positions = [i for i, _ in items]
    good = [(i, a) for i, a in items if a.numel()]
    images = torch.stack([a for _, a in good]) if good else None
    return positions, [i for i, _ in good], images


def _fingerprint(paths: list[Path], labels: list[int], root: Path, settings: dict[str, Any]) -> str:
    """Identifies one extract job: resuming into a store made with other settings or files is refused."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path, label in zip(paths, labels):
        h.update(f"{path.relative_to(root)}\t{label}\n".encode())
    return h.hexdigest()[:32]


def extract(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    vae: Any,
    image_size: int = 256,
    batch_size: int = 32,
    shard_size: int = 1024,
    dtype: str = "float16",
    workers: int = 4,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    barrier: Any = None,
) -> dict[str, Any] | None:
    """Encode every image of `folder` into the store `out` (resuming if shards exist); returns the manifest.

    `vae` is a `ditkit.autoencoder.VAE` (already on its device). With `world_size` > 1 this rank encodes its
    share of the shards, `barrier()` waits for the others, and rank 0 writes the manifest (others return None).
    """
    folder, out = Path(folder), Path(out)
    if dtype not in STORE_DTYPES:
        raise UserError(f"--dtype {dtype} is not supported; use one of {', '.join(STORE_DTYPES)}")
    if shard_size <= 0 or batch_size <= 0:
        raise UserError("--shard-size and --batch-size must be positive")
    check_image_size(image_size, vae.downsample)
    paths, labels, classes = find_images(folder)
    settings = dict(vae=vae.name, image_size=image_size, shard_size=shard_size, dtype=dtype, format=VERSION)
    fingerprint = _fingerprint(paths, labels, folder, settings)
    num_shards = math.ceil(len(paths) / shard_size)
    out.mkdir(parents=True, exist_ok=True)

    existing = read_manifest(out) if is_latent_store(out) else None
    if existing is not None and existing.get("fingerprint") == fingerprint:
        if rank == 0:
            print(f"ditkit extract: {out} is already complete ({existing['count']} images)", file=sys.stderr)
        return existing if rank == 0 else None
    if existing is not None:
        raise UserError(
            f"{out} already holds a latent store made from other images or settings; choose a new --out folder"
        )

    if world_size == 1:  # leftovers of a killed run; with several ranks another rank may be mid-write
        for tmp in out.glob(".shard-*.tmp"):
            tmp.unlink(missing_ok=True)
    mine = [k for k in range(num_shards) if k % world_size == rank]
    todo = [k for k in mine if not _shard_is_done(out / shard_name(k), fingerprint)]
    # Batches never straddle shards, so a shard's batches are the same whether or not the run was resumed:
    # with deterministic kernels its bytes are too.
    batches = [
        list(range(b, min(b + batch_size, (k + 1) * shard_size, len(paths))))
        for k in todo
        for b in range(k * shard_size, min((k + 1) * shard_size, len(paths)), batch_size)
    ]
    total = sum(len(b) for b in batches)
    if rank == 0 and len(todo) < len(mine):
        print(f"ditkit extract: resuming, {len(mine) - len(todo)} of {len(mine)} shards already done", file=sys.stderr)

    loader = DataLoader(
        _CropDataset(paths, image_size),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=vae.device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )
    pending: dict[int, dict[str, list]] = {}  # shard -> collected rows until the shard is complete
    seen: dict[int, int] = {}
    bar = _progress_bar(total, enabled=progress and rank == 0)
    start, encoded = time.perf_counter(), 0
    for positions, good, images in loader:
        mean = std = None
        if images is not None:
            x = images.to(vae.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
            # One batch of 2N: the images and their mirror images share the VAE call.
            m, s = vae.encode(torch.cat([x, x.flip(-1)]))
            n = x.shape[0]
            mean = torch.stack([m[:n], m[n:]], dim=1).to("cpu", STORE_DTYPES[dtype])
            std = torch.stack([s[:n], s[n:]], dim=1).to("cpu", STORE_DTYPES[dtype])
            encoded += n
        row = {i: r for r, i in enumerate(good)}
        for i in positions:
            k = i // shard_size
            entry = pending.setdefault(k, {"mean": [], "std": [], "index": [], "skipped": []})
            if i in row:
                entry["mean"].append(mean[row[i]])
                entry["std"].append(std[row[i]])
                entry["index"].append(i)
            else:
                entry["skipped"].append(str(paths[i].relative_to(folder)))
            seen[k] = seen.get(k, 0) + 1
            if seen[k] == min(shard_size, len(paths) - k * shard_size):
                _finish_shard(out, k, pending.pop(k), labels, vae, fingerprint, image_size // vae.downsample)
        if bar is not None:
            bar.update(len(positions))
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - start
    if total and rank == 0:
        rate = encoded / max(elapsed, 1e-9) * world_size
        print(f"ditkit extract: encoded {encoded} images on rank 0 in {elapsed:.1f} s "
              f"({rate:.1f} images/s over {world_size} process(es))", file=sys.stderr)
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    manifest = _build_manifest(out, num_shards, fingerprint, settings, vae, classes, folder)
    atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1) + "\n"))
    if manifest["skipped"]:
        print(f"ditkit extract: skipped {manifest['skipped']} unreadable image(s), listed in {out / MANIFEST}",
              file=sys.stderr)
    return manifest


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="extract", smoothing=0.05, file=sys.stderr)


def _shard_is_done(path: Path, fingerprint: str) -> bool:
    meta = shard_metadata(path)
    if meta is None:
        return False
    if meta.get("fingerprint") != fingerprint:
        raise UserError(
            f"{path} was written by a different extract (other images or settings); use a new --out folder"
        )
    return True


def _finish_shard(
    out: Path, k: int, rows: dict[str, list], labels: list[int], vae: Any, fingerprint: str, side: int
) -> None:
    """Write shard k with the per-channel sums that the manifest's statistics are built from."""
    index = torch.tensor(rows["index"], dtype=torch.int64)
    order = torch.argsort(index)  # rows arrive in order already; sorting makes the bytes independent of it
    mean = torch.stack(rows["mean"])[order] if rows["mean"] else torch.zeros(0, 2, vae.latent_channels, side, side)
    std = torch.stack(rows["std"])[order] if rows["std"] else torch.zeros_like(mean)
    index = index[order]
    scaled = vae.scale_latents(mean.double())
    meta = {
        "fingerprint": fingerprint,
        "shard": k,
        "count": int(index.numel()),
        "skipped": sorted(rows["skipped"]),
        # Over both flips and all positions, of the scaled posterior means (what the model sees, noise aside).
        "sum": scaled.sum(dim=(0, 1, 3, 4)).tolist(),
        "sumsq": scaled.square().sum(dim=(0, 1, 3, 4)).tolist(),
        "values_per_channel": int(scaled[:, :, 0].numel()),
    }
    tensors = {
        "mean": mean.contiguous(),
        "std": std.contiguous(),
        "label": torch.tensor([labels[i] for i in index.tolist()], dtype=torch.int64),
        "index": index.contiguous(),
    }
    _write_shard(out / shard_name(k), tensors, meta)


def _build_manifest(
    out: Path, num_shards: int, fingerprint: str, settings: dict[str, Any], vae: Any, classes: list[str],
    folder: Path,
) -> dict[str, Any]:
    shards, skipped = [], []
    total, sums, sumsq, values = 0, None, None, 0
    for k in range(num_shards):
        meta = shard_metadata(out / shard_name(k))
        if meta is None or meta.get("fingerprint") != fingerprint:
            raise UserError(f"{out / shard_name(k)} is missing or stale; rerun the same ditkit extract to finish")
        shards.append({"file": shard_name(k), "count": meta["count"]})
        skipped.extend(meta["skipped"])
        total += meta["count"]
        s, q = np.asarray(meta["sum"]), np.asarray(meta["sumsq"])
        sums, sumsq = (s, q) if sums is None else (sums + s, sumsq + q)
        values += meta["values_per_channel"]
    if total == 0:
        raise UserError(f"none of the images in {folder} could be read; the store {out} is empty")
    channel_mean = sums / values
    channel_std = np.sqrt(np.maximum(sumsq / values - channel_mean**2, 0.0))
    side = settings["image_size"] // vae.downsample
    return {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint,
        "vae": settings["vae"],
        "scale": vae.scale,
        "shift": vae.shift,
        "image_size": settings["image_size"],
        "latent_shape": [vae.latent_channels, side, side],
        "dtype": settings["dtype"],
        "count": total,
        "num_classes": max(1, len(classes)),
        "classes": classes,
        "shard_size": settings["shard_size"],
        "shards": shards,
        "channel_mean": [round(float(v), 6) for v in channel_mean],
        "channel_std": [round(float(v), 6) for v in channel_std],
        "skipped": len(skipped),
        "skipped_paths": skipped,
        "source": str(folder.resolve()),
    }


def read_manifest(store: str | os.PathLike) -> dict[str, Any]:
    path = Path(store) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{store} is not a latent store (no {MANIFEST}); create one with ditkit extract") from None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is unreadable ({err}); rerun ditkit extract to rewrite it") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a ditkit latent-store manifest (format {manifest.get('format')!r})")
    return manifest


# ----------------------------------------------------------------------------------------------- reading


class LatentStore(Dataset):
    """Training items from a latent store: item i is (float32 C×h×w scaled latent, int64 label).

    Each epoch, item i uses the image or its flip (random_flip) and a fresh posterior sample mean + std·ε
    (resample), both drawn from (seed, epoch, i), so a resumed run sees the same data whatever the batch size
    or worker count; call `set_epoch`. Batches are gathered with `__getitems__` (one read per shard).
    With both off, item i is the scaled posterior mean of the unflipped image. No VAE is loaded.
    """

    def __init__(self, root: str | os.PathLike, seed: int = 0, random_flip: bool = True, resample: bool = True):
        self.root = Path(root)
        self.manifest = read_manifest(root)
        self.seed, self.random_flip, self.resample = seed, random_flip, resample
        self.epoch = 0
        self.scale = float(self.manifest["scale"])
        self.shift = float(self.manifest.get("shift", 0.0))
        self.files = [self.root / s["file"] for s in self.manifest["shards"]]
        counts = [int(s["count"]) for s in self.manifest["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
        self._arrays: dict[int, dict[str, np.ndarray]] = {}
        labels = []
        for k, f in enumerate(self.files):
            if not f.is_file():
                raise UserError(f"{f} is missing from the latent store; rerun ditkit extract to rewrite it")
            arrays = self._shard(k)
            if len(arrays["label"]) != counts[k]:
                raise UserError(f"{f} holds {len(arrays['label'])} items but the manifest says {counts[k]}")
            labels.append(np.asarray(arrays["label"]))
        self.labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
        self._arrays.clear()  # reopened lazily in each DataLoader worker

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["latent_shape"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard(self, k: int) -> dict[str, np.ndarray]:
        if k not in self._arrays:
            self._arrays[k] = open_shard(self.files[k])
        return self._arrays[k]

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps would be pickled as full copies when sent to spawned workers; send paths instead.
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A whole batch at once (the DataLoader calls this when present): one gather per shard, not per item."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for a store of {len(self)} items")
        n = idx.size
        shape = self.latent_shape
        flips = np.zeros(n, dtype=np.int64)
        noise = torch.empty((n, *shape)) if self.resample else None
        gen = torch.Generator()
        for j, i in enumerate(idx.tolist()):
            # Each item's own stream, so its flip and noise do not depend on batch composition or workers.
            gen.manual_seed(item_seed(self.seed, self.epoch, i))
            if self.random_flip:
                flips[j] = int(torch.randint(2, (1,), generator=gen))
            if noise is not None:
                noise[j].normal_(generator=gen)
        mean = np.empty((n, *shape), dtype=np.float32)
        std = np.empty((n, *shape), dtype=np.float32) if noise is not None else None
        shard_of = np.searchsorted(self.offsets, idx, side="right") - 1
        for k in np.unique(shard_of).tolist():
            sel = np.nonzero(shard_of == k)[0]
            rows = idx[sel] - self.offsets[k]
            arrays = self._shard(k)
            mean[sel] = arrays["mean"][rows, flips[sel]]
            if std is not None:
                std[sel] = arrays["std"][rows, flips[sel]]
        x = torch.from_numpy(mean)
        if noise is not None:
            x.addcmul_(torch.from_numpy(std), noise)
        x.sub_(self.shift).mul_(self.scale)
        labels = self.labels[idx].tolist()
        return [(x[j], labels[j]) for j in range(n)]


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed from (seed, epoch, index) (splitmix64 finaliser): nearby items get unrelated streams."""
    mask = (1 << 64) - 1
    x = (seed * 0x9E3779B97F4A7C15 + (epoch + 1) * 0xBF58476D1CE4E5B9 + (index + 1) * 0x94D049BB133111EB) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return (x ^ (x >> 31)) >> 1


# ----------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="image folder: one sub-folder per class, or a flat folder")
    parser.add_argument("--out", required=True, help="latent store folder to create (or resume)")
    parser.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                        help="AutoencoderKL folder or Hugging Face id in the local cache (offline)")
    parser.add_argument("--image-size", type=int, default=256, help="crop side in pixels (default 256)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per VAE call, per GPU (default 32)")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard file (default 1024)")
    parser.add_argument("--dtype", choices=sorted(STORE_DTYPES), default="float16",
                        help="storage type of mean/std (default float16: half the disk, ample precision)")
    parser.add_argument("--vae-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="compute type of the VAE (default float32)")
    parser.add_argument("--workers", type=int, default=4, help="image decoding processes per GPU (default 4)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ditkit import distributed
    from ditkit.autoencoder import load_vae

    if not Path(args.folder).is_dir():  # before spending seconds on loading the VAE
        raise UserError(f"image folder not found: {args.folder}; give a folder of images (one sub-folder per class)")
    if args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")
    try:
        chosen = torch.device(args.device) if args.device is not None else None
    except RuntimeError:
        raise UserError(f"bad --device {args.device!r}; use cpu, cuda or cuda:N") from None
    if chosen is not None and chosen.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda given but no GPU is visible; use --device cpu")
    info = distributed.env_info(device=chosen)
    if info.device.type == "cuda":
        # Deterministic convolutions: a resumed extract then writes the same bytes as an uninterrupted one.
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    # One writer per store (rank 0 holds it for all ranks); a read-only or file --out is named before any work.
    lock = FolderLock(args.out, "ditkit extract", "--out") if info.rank == 0 else None
    barrier = None
    if info.distributed:
        # Ranks that finish their shards early wait for the slowest; allow hours, not the 10-minute default.
        distributed.init(device=info.device, timeout=timedelta(hours=6))
        barrier = distributed.barrier
    try:
        vae = load_vae(args.vae, device=info.device, dtype=getattr(torch, args.vae_dtype))
        manifest = extract(
            args.folder, args.out, vae, image_size=args.image_size, batch_size=args.batch_size,
            shard_size=args.shard_size, dtype=args.dtype, workers=args.workers, rank=info.rank,
            world_size=info.world_size, progress=not args.no_progress, barrier=barrier,
        )
    finally:
        if lock is not None:
            lock.release()
        distributed.cleanup()
    if manifest is not None:
        print(f"latent store {args.out}: {manifest['count']} images, {manifest['num_classes']} classes, "
              f"latents {'x'.join(map(str, manifest['latent_shape']))}, {manifest['skipped']} skipped")
    return 0
