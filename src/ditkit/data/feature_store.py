"""REPA's encoder features stored beside a latent store, so that training reads neither images nor the encoder.

`ditkit extract FOLDER --out STORE --repa-encoder NAME` first writes the latent shards, then, for latent shard k,
`features-0000k.safetensors` with the same rows in the same order:

    features  N×2×T×F  float16  the frozen encoder's patch features of the image [:, 0] and of its horizontal
                                flip [:, 1] (the encoder run on the mirrored image: encoders are not exactly
                                mirror-symmetric, so the features are not flipped on the grid)
    index     N        int64    position in the sorted file list (the latent shard's `index`, checked)

and adds `"features": {"encoder", "tokens", "channels", "dtype", "files", "fingerprint"}` to the manifest.
The encoder sees what the on-the-fly path gives it: the store's centre crop in [-1, 1] (its own resize inside).

float16, not bfloat16: numpy memory-maps it (numpy has no bfloat16) and it keeps 3 more mantissa bits (relative
round-off 2^-11 against 2^-8); its range (±65,504) is ample for layer-normed features, and a value beyond it is
refused when the shard is written. DINOv2-B at 256 px: 256 patches × 768 × 2 bytes × 2 flips = 786 KB an image.

Each feature shard is written atomically and skipped when it is there, whole, for the same store and encoder,
so an interrupted run resumes; features can be added to a finished store (the latents are not re-encoded).
Training (`AlignedLatents`) reads the features of the flip that the latent store drew for the same item.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ditkit.data.store import (
    MANIFEST,
    SHARD_META_KEY,
    SidecarShards,
    by_shard,
    finished_shard_metadata,
    open_shard,
    read_manifest,
    shard_name,
)
from ditkit.runtime.errors import UserError
from ditkit.runtime.io import atomic_write

FEATURE_DTYPE = "float16"


def feature_file(k: int) -> str:
    return f"features-{k:05d}.safetensors"


def _fingerprint(store_fingerprint: str, encoder_name: str) -> str:
    """One store's latents and one encoder: features of another store or encoder are never taken as done."""
    text = f"{store_fingerprint}\t{encoder_name}\t{FEATURE_DTYPE}\n"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@torch.no_grad()
def encode_with_flip(encoder: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """float16 N×2×T×F features (on the CPU) of uint8 N×H×W×3 images ([:, 0]) and their mirror images ([:, 1]).

    On a GPU the encoder runs under bf16 autocast, as `ditkit train`'s on-the-fly targets do by default."""
    x = images.to(device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    low = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with low:
        f = encoder(torch.cat([x, x.flip(-1)]))  # one call of 2N: the images and their mirrors
    n = x.shape[0]
    out = torch.stack([f[:n], f[n:]], dim=1).float()
    if not torch.isfinite(out).all() or out.abs().max() > torch.finfo(torch.float16).max:
        raise UserError("the REPA encoder gave non-finite features or features beyond float16's range; "
                        "check the encoder (--repa-encoder) before storing its features")
    return out.to("cpu", torch.float16)


def extract_features(folder: str | Path, out: str | Path, encoder: nn.Module, name: str, *, batch_size: int = 64,
                     workers: int = 4, rank: int = 0, world_size: int = 1, barrier: Any = None,
                     progress: bool = True) -> dict[str, Any] | None:
    """Store `encoder`'s features (named `name`) of the images of latent store `out` (made from `folder`).

    Rank r of `world_size` encodes feature shards r, r+W, ...; after `barrier()` rank 0 records them in the
    manifest and returns it (other ranks return None). The encoder is already on its device."""
    from ditkit.data.images import find_images  # Pillow: needed to extract, not to train on the features

    folder, out = Path(folder), Path(out)
    manifest = read_manifest(out)
    paths, _, _ = find_images(folder)
    fingerprint = _fingerprint(str(manifest["fingerprint"]), name)
    device = next(iter(encoder.parameters()), torch.empty(0)).device
    todo = [k for k in range(len(manifest["shards"]))
            if k % world_size == rank and not _feature_shard_done(out / feature_file(k), fingerprint)]
    for k in todo:
        index = torch.from_numpy(np.array(open_shard(out / shard_name(k))["index"]))
        feats = _encode_rows(paths, index, manifest, encoder, device, batch_size, workers)
        tensors = {"features": feats.contiguous(), "index": index.contiguous()}
        meta = {SHARD_META_KEY: json.dumps({"fingerprint": fingerprint, "shard": k, "count": len(index)})}
        atomic_write(out / feature_file(k), lambda tmp, t=tensors, m=meta: _save(t, tmp, m))
        if progress and rank == 0:
            print(f"ditkit extract: REPA features of shard {k + 1}/{len(manifest['shards'])} written",
                  file=sys.stderr)
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    return _record(out, manifest, name, fingerprint)


def _save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)


def _feature_shard_done(path: Path, fingerprint: str) -> bool:
    meta = finished_shard_metadata(path)
    return meta is not None and meta.get("fingerprint") == fingerprint


def _encode_rows(paths: list[Path], index: torch.Tensor, manifest: dict[str, Any], encoder: nn.Module,
                 device: torch.device, batch_size: int, workers: int) -> torch.Tensor:
    """The features N×2×T×F of the images at positions `index`, cropped as the store's latents were."""
    from ditkit.data.images import CropDataset

    rows = index.tolist()
    batches = [rows[b:b + batch_size] for b in range(0, len(rows), batch_size)]
    dataset = CropDataset(paths, int(manifest["image_size"]), bool(manifest.get("exif_transpose", False)))
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=_stack)
    parts = [encode_with_flip(encoder, images, device) for images in loader]
    if not parts:
        return torch.zeros(0, 2, 1, 1, dtype=torch.float16)
    return torch.cat(parts)


def _stack(items: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    for i, image in items:
        if not image.numel():
            raise UserError(f"image {i} of the store's file list is no longer readable; the folder changed "
                            "since ditkit extract wrote the latents: extract it again into a new --out")
    return torch.stack([image for _, image in items])


def _record(out: Path, manifest: dict[str, Any], name: str, fingerprint: str) -> dict[str, Any]:
    """Add the features to the manifest (read afresh: captions may have been recorded meanwhile)."""
    files = [feature_file(k) for k in range(len(manifest["shards"]))]
    arrays = [open_shard(out / f)["features"] for f in files]
    shapes = {tuple(a.shape[2:]) for a in arrays if a.shape[0]}  # a shard of unreadable images only holds none
    if len(shapes) != 1:
        raise UserError(f"the feature shards of {out} differ in shape {sorted(shapes)}; delete features-*.safetensors "
                        "and rerun ditkit extract --repa-encoder")
    tokens, channels = shapes.pop()
    manifest = read_manifest(out)
    manifest["features"] = {"encoder": name, "tokens": int(tokens), "channels": int(channels),
                            "dtype": FEATURE_DTYPE, "files": files, "fingerprint": fingerprint}
    atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1) + "\n"))
    print(f"ditkit extract: REPA features of {manifest['count']} images (and their flips) from {name}: "
          f"{tokens} patches × {channels}, {FEATURE_DTYPE}", file=sys.stderr)
    return manifest


def check_stored_features(manifest: dict[str, Any], encoder: str, where: str) -> dict[str, Any]:
    """The manifest's features entry for REPA with `encoder`; one line when the store has none or another's."""
    info = manifest.get("features")
    if not info:
        raise UserError(f"--repa-encoder needs the images, and the latent store {where} holds latents only; run "
                        f"ditkit extract --repa-encoder {encoder} to store its features beside the latents, or train "
                        "on the image folder with --vae (features computed on the fly)")
    if info["encoder"] != encoder:
        raise UserError(f"--repa-encoder {encoder}, but the latent store {where} holds features of "
                        f"{info['encoder']}; pass --repa-encoder {info['encoder']}, or run ditkit extract "
                        f"--repa-encoder {encoder} to store that encoder's features")
    return info


class StoredFeatures(SidecarShards):
    """The stored features of a latent store: `batch(indices, flips)` → float16 N×T×F, each row of its flip."""

    def __init__(self, root: str | Path, manifest: dict[str, Any]):
        info = manifest["features"]
        super().__init__(root, manifest, info, "REPA feature file",
                         f"rerun ditkit extract --repa-encoder {info['encoder']}")

    def batch(self, indices: list[int], flips: np.ndarray) -> torch.Tensor:
        """float16 N×T×F features of items `indices`, row j of flip `flips[j]`; in a DataLoader worker gathered
        straight into shared memory, so the batch crosses to the trainer without another 50 MB copy (b128)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        shape = (idx.size, int(self.info["tokens"]), int(self.info["channels"]))
        feats = _empty_batch(shape, torch.float16)
        out = feats.numpy()
        for k, sel, rows in by_shard(self.offsets, idx):
            out[sel] = self._shard(k)["features"][rows, flips[sel]]
        return feats


def _empty_batch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor, in shared memory inside a DataLoader worker (as torch's default collate makes
    its output there): a tensor in ordinary memory is copied into shared memory when sent to the trainer."""
    from torch.utils.data import get_worker_info

    if get_worker_info() is None or not math.prod(shape):
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


class StackedItems(list):
    """A batch's items, as `__getitems__` returns them, that also holds the batch already stacked, so that
    `collate_stacked` hands that on instead of splitting it into items and stacking them again (a copy)."""

    def __init__(self, items: list[Any], stacked: list[torch.Tensor]):
        super().__init__(items)
        self.stacked = stacked


def collate_stacked(items: list[Any]) -> Any:
    """The DataLoader's collate for datasets whose `__getitems__` may give `StackedItems`: the same tensors
    as torch's default collate (values, dtypes, shapes), without the re-stacking; other batches go to it."""
    from torch.utils.data import default_collate

    if isinstance(items, StackedItems):
        return list(items.stacked)
    return default_collate(items)


class AlignedLatents:
    """A latent store's training items with REPA's stored targets: item i is (latent, label, float16 T×F
    features of the same flip as the latent)."""

    def __init__(self, store: Any, features: StoredFeatures):
        self.store, self.features = store, features

    def __len__(self) -> int:
        return len(self.store)

    def __getattr__(self, name: str) -> Any:
        if name in ("store", "features"):  # not set yet (unpickling): no recursion through self.store
            raise AttributeError(name)
        return getattr(self.store, name)  # manifest, labels, set_epoch, latent_shape, ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
        """The items (latent, label, features); as `StackedItems`, so `collate_stacked` takes the batch whole."""
        x, flips = self.store.latents_and_flips(indices)
        feats = self.features.batch(indices, flips)
        labels = self.store.labels[np.asarray(indices, dtype=np.int64).reshape(-1)].tolist()
        stacked = [x, torch.tensor(labels, dtype=torch.int64), feats]  # what default_collate would make
        return StackedItems([(x[j], labels[j], feats[j]) for j in range(len(labels))], stacked)

    collate = staticmethod(collate_stacked)  # the DataLoader's collate_fn (train/loop.py)
