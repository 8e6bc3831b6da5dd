"""A latent store of random latents (and, when asked, random REPA features) in ditkit's real format, for timing.

The benchmarks read it through the same code as training (`ditkit.data.store.LatentStore`, `ditkit.data.
feature_store`), so what they time is the real read path; only the numbers are random. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import _src  # noqa: F401  (puts src/ on sys.path when run from a checkout)
from ditkit.data.feature_store import FEATURE_DTYPE, feature_file
from ditkit.data.store import FORMAT, MANIFEST, SHARD_META_KEY, VERSION, shard_name
from ditkit.recipe import SD_VAE, Conditioning, LatentSpace, parts_to_dict

SD_SCALE = 0.18215


def make_store(root: str | Path, count: int, side: int = 32, channels: int = 4, num_classes: int = 1000,
               features: tuple[int, int] | None = None, encoder: str = "random-dinov2-b",
               shard_size: int = 256, seed: int = 0) -> Path:
    """Write a store of `count` random items (latents channels×side×side for 8×side px images, float16) into
    `root`; with `features` (tokens, channels) also float16 REPA features named `encoder`. Returns `root`."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards, fingerprint = [], f"synthetic-{count}-{side}-{seed}"
    for k, start in enumerate(range(0, count, shard_size)):
        n = min(shard_size, count - start)
        index = torch.arange(start, start + n, dtype=torch.int64)
        latents = {"mean": torch.randn(n, 2, channels, side, side, generator=gen).half(),
                   "std": torch.full((n, 2, channels, side, side), 0.1).half(),
                   "label": torch.randint(0, num_classes, (n,), generator=gen), "index": index}
        meta = {"fingerprint": fingerprint, "shard": k, "count": n, "skipped": []}
        save_file(latents, str(root / shard_name(k)), metadata={SHARD_META_KEY: json.dumps(meta)})
        if features is not None:
            f = torch.randn(n, 2, *features, generator=gen).half()
            meta = {"fingerprint": fingerprint + encoder, "shard": k, "count": n}
            save_file({"features": f, "index": index}, str(root / feature_file(k)),
                      metadata={SHARD_META_KEY: json.dumps(meta)})
        shards.append({"file": shard_name(k), "count": n})
    manifest = _manifest(count, side, channels, num_classes, shards, fingerprint)
    if features is not None:
        manifest["features"] = {"encoder": encoder, "tokens": features[0], "channels": features[1],
                                "dtype": FEATURE_DTYPE, "files": [feature_file(k) for k in range(len(shards))],
                                "fingerprint": fingerprint + encoder}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return root


def _manifest(count: int, side: int, channels: int, num_classes: int, shards: list[dict], fingerprint: str) -> dict:
    """The manifest `ditkit extract` would write for these shards (statistics of the unit-normal latents)."""
    return {
        "format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "vae": SD_VAE, "scale": SD_SCALE,
        "shift": 0.0, "image_size": 8 * side, "latent_shape": [channels, side, side], "dtype": "float16",
        "count": count, "num_classes": num_classes, "classes": [], "exif_transpose": False,
        "shard_size": shards[0]["count"], "shards": shards, "channel_mean": [0.0] * channels,
        "channel_std": [SD_SCALE] * channels, "skipped": 0, "skipped_paths": [], "source": "synthetic",
        "recipe": parts_to_dict(LatentSpace(vae=SD_VAE, scale=SD_SCALE, shift=0.0, downsample=8),
                                Conditioning(classes=None)),
    }
