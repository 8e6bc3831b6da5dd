"""`ditkit extract`: encode an image folder once into a latent store (the format is in `ditkit.data.store`).

Training on stored latents takes the VAE out of the training loop. Shards are written atomically, one at a
time, so an interrupted extract resumes by skipping finished shards and ends with the same bytes as an
uninterrupted one. Under `torchrun` rank r encodes shards r, r+W, r+2W, ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ditkit.data.images import CropDataset, check_image_size, find_images
from ditkit.data.store import (
    FORMAT,
    MANIFEST,
    SHARD_META_KEY,
    STORE_DTYPES,
    VERSION,
    finished_shard_metadata,
    is_latent_store,
    read_manifest,
    shard_metadata,
    shard_name,
    shard_problem,
)
from ditkit.recipe import SD_VAE, Conditioning, LatentSpace, parts_to_dict
from ditkit.runtime import counts
from ditkit.runtime.errors import UserError
from ditkit.runtime.folder_lock import FolderLock
from ditkit.runtime.io import atomic_write
from ditkit.runtime.path_guard import refuse_overlap


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    blob = {SHARD_META_KEY: json.dumps(meta, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=blob))


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
    exif_transpose: bool = False,
) -> dict[str, Any] | None:
    """Encode every image of `folder` into the store `out` (resuming if shards exist); returns the manifest.

    `vae` is a `ditkit.encoders.autoencoder.VAE` (already on its device). With `world_size` > 1 this rank encodes its
    share of the shards, `barrier()` waits for the others, and rank 0 writes the manifest (others return None).
    """
    folder, out = Path(folder), Path(out)
    _check_settings(dtype, shard_size, batch_size, image_size, vae)
    paths, labels, classes = find_images(folder)
    settings = dict(vae=vae.name, image_size=image_size, shard_size=shard_size, dtype=dtype, format=VERSION)
    if exif_transpose:  # only when on: stores extracted before the option existed keep their fingerprint
        settings["exif_transpose"] = True
    fingerprint = _fingerprint(paths, labels, folder, settings)
    num_shards = math.ceil(len(paths) / shard_size)
    out.mkdir(parents=True, exist_ok=True)

    existing = _complete_store(out, fingerprint, num_shards)
    if existing is not None:
        if rank == 0:
            print(f"ditkit extract: {out} is already complete ({existing['count']} images)", file=sys.stderr)
        return existing if rank == 0 else None

    if world_size == 1:  # leftovers of a killed run; with several ranks another rank may be mid-write
        for tmp in out.glob(".shard-*.tmp"):
            tmp.unlink(missing_ok=True)
    mine = [k for k in range(num_shards) if k % world_size == rank]
    todo = [k for k in mine if not _shard_is_done(out / shard_name(k), fingerprint)]
    batches = _plan_batches(todo, shard_size, batch_size, len(paths))
    total = sum(len(b) for b in batches)
    if rank == 0 and len(todo) < len(mine):
        print(f"ditkit extract: resuming, {len(mine) - len(todo)} of {len(mine)} shards already done", file=sys.stderr)

    loader = DataLoader(
        CropDataset(paths, image_size, exif_transpose),
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
            mean, std = _encode_with_flip(vae, images, STORE_DTYPES[dtype])
            encoded += images.shape[0]
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


def _complete_store(out: Path, fingerprint: str, num_shards: int) -> dict[str, Any] | None:
    """The manifest of a finished, intact store made by this same job; None when there is work to do (no store
    yet, or a damaged one: its broken shards are encoded again and the manifest rewritten); one line when `out`
    holds a store made from other images or settings."""
    existing = read_manifest(out) if is_latent_store(out) else None
    if existing is None:
        return None
    if existing.get("fingerprint") != fingerprint:
        raise UserError(
            f"{out} already holds a latent store made from other images or settings; choose a new --out folder"
        )
    return existing if _intact(out, existing, num_shards) else None


def _check_settings(dtype: str, shard_size: int, batch_size: int, image_size: int, vae: Any) -> None:
    if dtype not in STORE_DTYPES:
        raise UserError(f"--dtype {dtype} is not supported; use one of {', '.join(STORE_DTYPES)}")
    if shard_size <= 0 or batch_size <= 0:
        raise UserError("--shard-size and --batch-size must be positive")
    check_image_size(image_size, vae.downsample)


def _plan_batches(todo: list[int], shard_size: int, batch_size: int, count: int) -> list[list[int]]:
    """The image positions of each batch of the shards `todo`. Batches never straddle shards, so a shard's
    batches are the same whether or not the run was resumed: with deterministic kernels its bytes are too."""
    return [
        list(range(b, min(b + batch_size, (k + 1) * shard_size, count)))
        for k in todo
        for b in range(k * shard_size, min((k + 1) * shard_size, count), batch_size)
    ]


def _encode_with_flip(vae: Any, images: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) N×2×C×h×w of uint8 N×H×W×3 images and their mirror images, on the CPU in `dtype`."""
    x = images.to(vae.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    # One batch of 2N: the images and their mirror images share the VAE call.
    m, s = vae.encode(torch.cat([x, x.flip(-1)]))
    n = x.shape[0]
    return torch.stack([m[:n], m[n:]], dim=1).to("cpu", dtype), torch.stack([s[:n], s[n:]], dim=1).to("cpu", dtype)


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="extract", smoothing=0.05, file=sys.stderr)


def _intact(out: Path, manifest: dict[str, Any], num_shards: int) -> bool:
    """Whether a finished store still holds every shard whole and its manifest adds up."""
    counts = [int(s["count"]) for s in manifest.get("shards", [])]
    return len(counts) == num_shards and sum(counts) == manifest.get("count") and all(
        shard_problem(out / shard_name(k)) is None for k in range(num_shards)
    )


def _shard_is_done(path: Path, fingerprint: str) -> bool:
    meta = finished_shard_metadata(path)
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
        "exif_transpose": bool(settings.get("exif_transpose", False)),
        "shard_size": settings["shard_size"],
        "shards": shards,
        "channel_mean": [round(float(v), 6) for v in channel_mean],
        "channel_std": [round(float(v), 6) for v in channel_std],
        "skipped": len(skipped),
        "skipped_paths": skipped,
        "source": str(folder.resolve()),
        # How the latents must be decoded and what the labels mean, as every checkpoint trained on them records.
        "recipe": parts_to_dict(
            LatentSpace(vae=settings["vae"], scale=vae.scale, shift=vae.shift, downsample=vae.downsample),
            Conditioning(classes=tuple(classes) or None),
        ),
    }


# ----------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="image folder: one sub-folder per class, or a flat folder")
    parser.add_argument("--out", required=True, help="latent store folder to create (or resume)")
    parser.add_argument("--vae", default=SD_VAE,
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
    parser.add_argument("--exif-transpose", action="store_true",
                        help="turn each image by its EXIF orientation tag before cropping (default: pixels as "
                        "stored, as the authors' preprocessing)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--text-encoder", help="also encode each image's caption (NAME.txt or metadata.jsonl/.csv) "
                        "with this T5/CLIP folder or cached Hugging Face id, for text models")
    parser.add_argument("--max-tokens", type=int, help="caption tokens with --text-encoder (default T5 120, CLIP 77)")
    parser.add_argument("--repa-encoder", help="also store this frozen encoder's patch features of each image and "
                        "its flip (float16), for ditkit train --repa-encoder on the store: 'digits-mae' or a "
                        "transformers folder / cached Hugging Face id, e.g. facebook/dinov2-base")


def run(args: argparse.Namespace) -> int:
    from ditkit.encoders.autoencoder import load_vae
    from ditkit.runtime import distributed

    if not Path(args.folder).is_dir():  # before spending seconds on loading the VAE
        raise UserError(f"image folder not found: {args.folder}; give a folder of images (one sub-folder per class)")
    if args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")
    counts.extract_flags(args)
    refuse_overlap({"FOLDER": args.folder, "--vae": args.vae, "--text-encoder": args.text_encoder}, args.out,
                   "--out", allow=("contains",))
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
        encoder = None
        if args.text_encoder:  # captions and encoder checked before the VAE's long pass, not after it
            from ditkit.data.captions import read_captions
            from ditkit.encoders.text import load_text_encoder

            read_captions(args.folder, find_images(args.folder)[0])
            encoder = load_text_encoder(args.text_encoder, max_tokens=args.max_tokens, device=info.device)
        repa = None
        if args.repa_encoder:  # a missing encoder is named before the VAE's long pass, not after it
            from ditkit.encoders.features import load_encoder

            repa = load_encoder(args.repa_encoder).to(info.device)
        vae = load_vae(args.vae, device=info.device, dtype=getattr(torch, args.vae_dtype))
        manifest = extract(
            args.folder, args.out, vae, image_size=args.image_size, batch_size=args.batch_size,
            shard_size=args.shard_size, dtype=args.dtype, workers=args.workers, rank=info.rank,
            world_size=info.world_size, progress=not args.no_progress, barrier=barrier,
            exif_transpose=args.exif_transpose,
        )
        if manifest is not None and encoder is not None:
            from ditkit.data.caption_store import extract_captions

            manifest = extract_captions(args.folder, args.out, encoder, batch_size=args.batch_size)
        if repa is not None:
            manifest = _store_features(args, repa, info, barrier) or manifest
    finally:
        if lock is not None:
            lock.release()
        distributed.cleanup()
    if manifest is not None:
        print(f"latent store {args.out}: {manifest['count']} images, {manifest['num_classes']} classes, "
              f"latents {'x'.join(map(str, manifest['latent_shape']))}, {manifest['skipped']} skipped")
    return 0


def _store_features(args: argparse.Namespace, encoder: Any, info: Any, barrier: Any) -> dict[str, Any] | None:
    """REPA's encoder features beside the latents (data/feature_store.py), shared over the ranks like the shards."""
    from ditkit.data.feature_store import extract_features

    if barrier is not None:
        barrier()  # every rank reads the manifest that rank 0 has just written
    return extract_features(args.folder, args.out, encoder, args.repa_encoder, batch_size=args.batch_size,
                            workers=args.workers, rank=info.rank, world_size=info.world_size, barrier=barrier,
                            progress=not args.no_progress)
