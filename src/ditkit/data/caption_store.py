"""Captions encoded once beside a latent store, so that training reads neither the images nor the text encoder.

`ditkit extract FOLDER --out STORE --text-encoder T5` first writes the latent shards, then, for latent shard k,
`captions-0000k.safetensors` with the same rows in the same order:

    caption       N×L×C   float16 text-encoder features of the image's caption (L = max_tokens)
    caption_mask  N×L     float16 1 for a real token, 0 for padding
    index         N       int64   position in the sorted file list (the latent shard's `index`, checked)

and adds `"captions": {"text_encoder", "max_tokens", "channels", "files"}` to the manifest. Each caption shard is
written atomically and skipped when it is already there for the same captions and encoder, so an interrupted
run resumes. Captions come from data/captions.py (sidecar .txt or a metadata table).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditkit.data.captions import read_captions
from ditkit.data.images import find_images
from ditkit.data.store import (
    MANIFEST,
    SHARD_META_KEY,
    SidecarShards,
    by_shard,
    open_shard,
    read_manifest,
    shard_metadata,
)
from ditkit.runtime.errors import UserError
from ditkit.runtime.io import atomic_write


def caption_file(k: int) -> str:
    return f"captions-{k:05d}.safetensors"


def _fingerprint(captions: list[str], encoder: Any) -> str:
    h = hashlib.sha256(f"{encoder.name}\t{encoder.max_tokens}\t{encoder.channels}\n".encode())
    for text in captions:
        h.update(text.encode() + b"\n")
    return h.hexdigest()[:32]


def extract_captions(folder: str | Path, out: str | Path, encoder: Any, batch_size: int = 64) -> dict[str, Any]:
    """Encode the captions of the images of latent store `out` (made from `folder`); returns the manifest."""
    from safetensors.torch import save_file

    folder, out = Path(folder), Path(out)
    manifest = read_manifest(out)
    paths, _, _ = find_images(folder)
    captions = read_captions(folder, paths)  # every image's caption, or one line naming the first without
    fingerprint = _fingerprint(captions, encoder)
    files = []
    for k, shard in enumerate(manifest["shards"]):
        name = caption_file(k)
        files.append(name)
        meta = shard_metadata(out / name)
        if meta is not None and meta.get("fingerprint") == fingerprint:
            continue
        index = torch.from_numpy(np.array(open_shard(out / shard["file"])["index"]))
        feats, mask = (encoder.encode([captions[i] for i in index.tolist()], batch_size)
                       if len(index) else (torch.zeros(0, encoder.max_tokens, encoder.channels),
                                           torch.zeros(0, encoder.max_tokens, dtype=torch.bool)))
        tensors = {"caption": feats.to("cpu", torch.float16).contiguous(),
                   "caption_mask": mask.to("cpu", torch.float16).contiguous(), "index": index.contiguous()}
        blob = {SHARD_META_KEY: json.dumps({"fingerprint": fingerprint, "shard": k, "count": len(index)})}
        atomic_write(out / name, lambda tmp, t=tensors, b=blob: save_file(t, tmp, metadata=b))
    manifest["captions"] = {"text_encoder": encoder.name, "max_tokens": encoder.max_tokens,
                            "channels": encoder.channels, "files": files, "fingerprint": fingerprint}
    atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1) + "\n"))
    print(f"ditkit extract: captions of {manifest['count']} images encoded by {encoder.name} "
          f"({encoder.max_tokens} tokens × {encoder.channels})", file=sys.stderr)
    return manifest


class StoredCaptions(SidecarShards):
    """The encoded captions of a latent store: `batch(indices)` → (float32 N×L×C features, bool N×L mask)."""

    def __init__(self, root: str | Path):
        manifest = read_manifest(root)
        info = manifest.get("captions")
        if not info:
            raise UserError(f"{root} has no encoded captions; run ditkit extract with --text-encoder")
        super().__init__(root, manifest, info, "caption file", "rerun ditkit extract --text-encoder")

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n, tokens, channels = idx.size, int(self.info["max_tokens"]), int(self.info["channels"])
        feats = np.empty((n, tokens, channels), dtype=np.float32)
        mask = np.empty((n, tokens), dtype=bool)
        for k, sel, rows in by_shard(self.offsets, idx):
            arrays = self._shard(k)
            feats[sel] = arrays["caption"][rows]
            mask[sel] = arrays["caption_mask"][rows] != 0
        return torch.from_numpy(feats), torch.from_numpy(mask)


class CaptionedLatents:
    """A latent store's training items with their stored captions: item i is (latent, packed caption), the
    caption packed as one float32 L×(C+1) tensor whose last channel is the token mask (1 = real token), so that
    the DataLoader's default collation and the training loop's device copy handle it like a label."""

    def __init__(self, store: Any, captions: StoredCaptions):
        self.store, self.captions = store, captions

    def __len__(self) -> int:
        return len(self.store)

    def set_epoch(self, epoch: int) -> None:
        self.store.set_epoch(epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        items = self.store.__getitems__(indices)
        feats, mask = self.captions.batch(indices)
        packed = torch.cat([feats, mask.float()[..., None]], dim=-1)
        return [(x, packed[j]) for j, (x, _) in enumerate(items)]


def unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features N×L×C, mask N×L bool) of a batch of packed captions."""
    return packed[..., :-1], packed[..., -1] > 0.5
