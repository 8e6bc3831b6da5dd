"""What the training loop reads: the data set (digits, a latent store or an image folder) and the index lists of
each rank's share of each global batch, a seeded per-epoch permutation (so a resumed run sees the same batches)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from ditkit.data import TrainingData
from ditkit.runtime.errors import UserError
from ditkit.runtime.seeding import generator
from ditkit.train.options import TrainOptions


def open_data(opts: TrainOptions, seed: int) -> TrainingData:
    """The built-in digits, a latent store, or an image folder (encoded by a VAE on the fly when --vae)."""
    if opts.data_path == "digits":
        from ditkit.data.digits import NUM_CLASSES, load_digits_split

        size = opts.image_size or 16
        check_patch(opts, size, size, latent_store=False)
        images, labels = load_digits_split(size, "train")
        return TrainingData(TensorDataset(images, labels), NUM_CLASSES, 1, size, None, f"digits {size}x{size}",
                            labels, classes=[str(k) for k in range(NUM_CLASSES)])
    from ditkit.data import open_training_data

    # The resolved path: `clean`, `./clean/` and `/abs/clean` are one data set, and the run's record says so.
    path = str(Path(os.path.expanduser(opts.data_path)).resolve())
    data = open_training_data(path, opts.image_size, opts.vae, seed,  # None: the store's own size
                              exif_transpose=opts.exif_transpose)
    store = hasattr(data.dataset, "manifest")
    if opts.latent_norm:
        data = with_channel_norm(data, opts.data_path)
    check_patch(opts, opts.image_size or (256 if not store else data.input_size), data.input_size, store)
    labels = getattr(data, "labels", None)
    dataset, captions = data.dataset, None
    if store and data.dataset.manifest.get("captions"):
        from ditkit.data.caption_store import CaptionedLatents, StoredCaptions

        stored = StoredCaptions(opts.data_path)  # items become (latent, packed caption): a text model trains
        dataset, captions = CaptionedLatents(data.dataset, stored), stored.info
    description, features = data.describe(), None
    if store and opts.repa_encoder:  # REPA's targets read beside the latents, of each item's drawn flip
        from ditkit.data.feature_store import AlignedLatents, StoredFeatures, check_stored_features

        features = check_stored_features(data.dataset.manifest, opts.repa_encoder, opts.data_path)
        dataset = AlignedLatents(dataset, StoredFeatures(path, data.dataset.manifest))
        description += f", REPA targets stored beside the latents ({features['encoder']}, {features['dtype']})"
    return dataclasses.replace(data, dataset=dataset, description=description, classes=data.classes or None,
                               labels=torch.as_tensor(labels) if labels is not None else None, captions=captions,
                               features=features)


def with_channel_norm(data: Any, where: str) -> Any:
    """The data with each latent channel normalised by its store's statistics (the manifest's channel_mean and
    channel_std, of the scaled posterior means; LightningDiT's latent_norm), recorded in its latent space."""
    manifest = getattr(data.dataset, "manifest", None)
    if manifest is None or "channel_mean" not in manifest:
        raise UserError(f"--latent-norm needs a latent store (its manifest holds the channel statistics); {where} "
                        "is not one: run ditkit extract first, or drop --latent-norm")
    mean, std = tuple(manifest["channel_mean"]), tuple(manifest["channel_std"])
    if min(std) <= 0:
        raise UserError(f"--latent-norm: a latent channel of {where} has std 0 (constant); drop --latent-norm")
    latents = dataclasses.replace(data.latents, mean=mean, std=std)
    data.dataset.channel_norm = latents
    return dataclasses.replace(data, latents=latents)


def check_patch(opts: TrainOptions, image_size: int, input_size: int, latent_store: bool) -> None:
    """The model's patch must tile the side it sees (`input_size`); for images say so in pixels, where the
    step is the VAE's downsampling factor times the patch (a factor-8 VAE and patch 2 need multiples of 16)."""
    patch = int(opts.model.rsplit("/", 1)[1])
    if input_size % patch == 0:
        return
    if latent_store:
        raise UserError(
            f"the latent store's latents are {input_size}x{input_size}, not divisible by the patch size {patch} of "
            f"{opts.model}; choose a model whose patch size divides {input_size}"
        )
    factor = max(1, image_size // input_size)
    step = factor * patch
    low = max(step, image_size // step * step)
    what = f"VAE factor {factor} × patch {patch}" if factor > 1 else f"the patch size of {opts.model}"
    raise UserError(f"--image-size {image_size} is not a multiple of {step} ({what}); use e.g. {low} or {low + step}")


class GlobalBatches:
    """Index lists of this rank's share of each global batch, from step `start` on, within one epoch."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, epoch: int, start: int):
        g = generator(seed, epoch)
        self.perm = torch.randperm(n, generator=g)
        self.global_batch, self.local = global_batch, global_batch // world
        self.rank, self.start = rank, start
        self.steps = n // global_batch

    def __iter__(self) -> Iterator[list[int]]:
        for s in range(self.start, self.steps):
            batch = self.perm[s * self.global_batch : (s + 1) * self.global_batch]
            yield batch[self.rank * self.local : (self.rank + 1) * self.local].tolist()

    def __len__(self) -> int:
        return self.steps - self.start
