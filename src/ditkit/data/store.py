"""The latent store: the folder `ditkit extract` writes, read back as a training Dataset (`LatentStore`).

For every image the store keeps the VAE posterior N(mean, std²) of the image AND of its horizontal flip, so
training can still draw a fresh flip and a fresh posterior sample each epoch, exactly as on-the-fly encoding
would.

Store layout (a folder):
    manifest.json              written last; its presence marks a complete store
    shard-00000.safetensors    images [k·S, (k+1)·S) of the sorted file list, S = shard size
        mean, std   N×2×C×h×w  (float16 or float32; [:, 0] the image, [:, 1] its flip; unscaled VAE units)
        label       N          int64
        index       N          int64 position in the sorted file list (unreadable images are left out)

Shards are plain safetensors files, read here through a memory map (no copy, no full read).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ditkit.recipe import Conditioning, LatentSpace, parts_from_dict
from ditkit.runtime import validate
from ditkit.runtime.errors import UserError

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


def shard_problem(path: Path) -> str | None:
    """What is wrong with a shard file, or None: missing, an unreadable header, or fewer bytes than its header
    describes (a copy cut short, a full disk). Costs one header read, not a pass over the data."""
    if not path.is_file():
        return "the file is missing"
    try:
        header, start = _read_header(path)
        end = max((info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"), default=0)
    except (UserError, KeyError, TypeError, IndexError):
        return "its header is unreadable"
    size = path.stat().st_size
    if size != start + end:
        return f"it is {size:,} bytes where its header describes {start + end:,}"
    return None


def finished_shard_metadata(path: Path, verb: str = "ditkit extract") -> dict[str, Any] | None:
    """The metadata of a shard an earlier run finished, or None when it must be written (again): absent, not a
    ditkit shard, or damaged (said on stderr, so that a resumed extract shows what it redoes)."""
    if not path.exists():
        return None
    problem = shard_problem(path)
    if problem is not None:
        print(f"{verb}: {path} is damaged ({problem}); encoding it again", file=sys.stderr)
        return None
    return shard_metadata(path)


def by_shard(offsets: list[int], idx: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """For global item positions `idx` of shards starting at `offsets` (with the total last): (k, sel, rows)
    per shard k holding any of them, `sel` the positions in `idx` that it holds, `rows` their rows in shard k."""
    shard_of = np.searchsorted(offsets, idx, side="right") - 1
    for k in np.unique(shard_of).tolist():
        sel = np.nonzero(shard_of == k)[0]
        yield k, sel, idx[sel] - offsets[k]


class SidecarShards:
    """Files written beside a latent store's shards, one per shard, row for row (the encoded captions, REPA's
    features): checked whole and matched to their latent shard on opening, then memory-mapped lazily in each
    process (a DataLoader worker is handed the paths, not the maps). `rerun` is the command that rewrites them."""

    def __init__(self, root: str | Path, manifest: dict[str, Any], info: dict[str, Any], what: str, rerun: str):
        self.root, self.info = Path(root), info
        self.offsets = np.concatenate([[0], np.cumsum([int(s["count"]) for s in manifest["shards"]])]).tolist()
        self._arrays: dict[int, dict[str, np.ndarray]] = {}
        for k, name in enumerate(info["files"]):
            problem = shard_problem(self.root / name)
            if problem is not None:
                raise UserError(f"{what} {self.root / name} is damaged ({problem}); {rerun} (same arguments) to "
                                "encode it again")
            if len(self._shard(k)["index"]) != self.offsets[k + 1] - self.offsets[k]:
                raise UserError(f"{self.root / name} does not match its latent shard; {rerun}")
        self._arrays.clear()  # reopened lazily in each DataLoader worker

    def _shard(self, k: int) -> dict[str, np.ndarray]:
        if k not in self._arrays:
            self._arrays[k] = open_shard(self.root / self.info["files"][k])
        return self._arrays[k]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": {}}  # paths to worker processes, not copies of the maps


def open_shard(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a shard as read-only numpy memory maps (pages are read only when touched)."""
    header, start = _read_header(path)
    validate.shard_header(header, path.stat().st_size - start, str(path))  # shapes fit the bytes, before a map
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


def store_recipe(manifest: dict[str, Any]) -> tuple[LatentSpace, Conditioning]:
    """The latent space and conditioning of a store: its manifest's `recipe` part, or (stores extracted before
    recipes existed) the same facts read from the manifest's older fields."""
    if "recipe" in manifest:
        return parts_from_dict(manifest["recipe"], "manifest.json recipe")
    side = int(manifest["latent_shape"][1])
    latents = LatentSpace(vae=manifest["vae"], scale=float(manifest["scale"]), shift=float(manifest.get("shift", 0.0)),
                          downsample=max(1, int(manifest["image_size"]) // side))
    return latents, Conditioning(classes=tuple(manifest.get("classes") or ()) or None)


def read_manifest(store: str | os.PathLike) -> dict[str, Any]:
    path = Path(store) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{store} is not a latent store (no {MANIFEST}); create one with ditkit extract") from None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is unreadable ({err}); rerun ditkit extract to rewrite it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise UserError(f"{path} is not a ditkit latent-store manifest (format {found!r})")
    validate.store_manifest(manifest, store, str(path))  # types, ranges, file names inside the store
    return manifest


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
        self.channel_norm: Any = None  # set by the trainer for --latent-norm (train/batches.with_channel_norm)
        self.shift = float(self.manifest.get("shift", 0.0))
        self.files = [self.root / s["file"] for s in self.manifest["shards"]]
        counts = [int(s["count"]) for s in self.manifest["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
        self._arrays: dict[int, dict[str, np.ndarray]] = {}
        if sum(counts) != int(self.manifest["count"]):
            raise UserError(
                f"{self.root / MANIFEST} says {self.manifest['count']} images but its shards hold {sum(counts)}; "
                "rerun ditkit extract (same arguments) to rewrite it"
            )
        labels = []
        for k, f in enumerate(self.files):
            problem = shard_problem(f)
            if problem is not None:
                raise UserError(
                    f"latent store shard {f} is damaged ({problem}); rerun ditkit extract (same arguments) to "
                    "encode it again"
                )
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
        x, _ = self.latents_and_flips(indices)
        labels = self.labels[np.asarray(indices, dtype=np.int64).reshape(-1)].tolist()
        return [(x[j], labels[j]) for j in range(len(labels))]

    def latents_and_flips(self, indices: list[int]) -> tuple[torch.Tensor, np.ndarray]:
        """The batch's float32 N×C×h×w latents and which of them are the flipped image (N int64, 1 = flipped),
        so that what is stored beside the latents (REPA's features) can be read for the same flip."""
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
        for k, sel, rows in by_shard(self.offsets, idx):
            arrays = self._shard(k)
            mean[sel] = arrays["mean"][rows, flips[sel]]
            if std is not None:
                std[sel] = arrays["std"][rows, flips[sel]]
        x = torch.from_numpy(mean)
        if noise is not None:
            x.addcmul_(torch.from_numpy(std), noise)
        x.sub_(self.shift).mul_(self.scale)
        if self.channel_norm is not None:  # --latent-norm: per-channel statistics (a LatentSpace with mean/std)
            x = self.channel_norm.normalize(x)
        return x, flips


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed from (seed, epoch, index) (splitmix64 finaliser): nearby items get unrelated streams."""
    mask = (1 << 64) - 1
    x = (seed * 0x9E3779B97F4A7C15 + (epoch + 1) * 0xBF58476D1CE4E5B9 + (index + 1) * 0x94D049BB133111EB) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return (x ^ (x >> 31)) >> 1


