"""Training data: image folders (ADM crop + flip), the latent store, and one entry point for the trainer.

    data = open_training_data("/data/imagenet-256-latents", image_size=256, vae=None, seed=0)
    data.dataset[i]   # (float32 C×H×W, int64 label); call data.dataset.set_epoch(e) every epoch
    data.encoder      # None, or batch → scaled latents, run on the training device (folder + --vae)

The per-item randomness (flip, posterior sample) is drawn from (seed, epoch, index), so a resumed run sees the
same data whatever the number of workers. Heavy modules (diffusers) are imported only when a VAE is used.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ditkit.data.store import LatentStore, is_latent_store, store_recipe
from ditkit.recipe import LatentSpace
from ditkit.runtime.errors import UserError

__all__ = ["ImageFolderDataset", "LatentStore", "OnTheFlyEncoder", "TrainingData", "open_training_data"]


def __getattr__(name: str):
    # Image folders need Pillow; imported on first use, so that training on a latent store (and everything that
    # imports ditkit.data on the way, e.g. the training loop) runs where Pillow is not installed.
    if name == "ImageFolderDataset":
        from ditkit.data.images import ImageFolderDataset

        return ImageFolderDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class TrainingData:
    """What the training loop needs to know about its data.

    `input_size` is the side the model sees (latent side for stores and VAE folders, pixels otherwise);
    `encoder` is None or a callable run on the training device on each batch of images in [-1, 1];
    `labels` holds the label of every item (int64), for class-balanced evaluation without reading the data;
    `classes` names label k (the image folder's sorted sub-folder names, empty ones included; [] when flat).
    The one record of the data, from opening it (`open_training_data`) to the loop (`train.batches.open_data`
    fills `captions`, labels as a tensor).
    """

    dataset: Dataset
    num_classes: int
    in_channels: int
    input_size: int
    encoder: Callable[[torch.Tensor], torch.Tensor] | None
    description: str
    labels: np.ndarray | torch.Tensor | None = None
    classes: list[str] | None = None
    latents: LatentSpace = field(default_factory=LatentSpace)  # how the model's inputs decode to images
    captions: dict | None = None  # a captioned latent store's text encoder, max_tokens, channels
    features: dict | None = None  # a latent store's stored REPA features: encoder, tokens, channels (feature_store)

    def describe(self) -> str:
        """One line for logs."""
        return self.description


class OnTheFlyEncoder:
    """Batch of images in [-1, 1] → scaled latents sampled from the VAE posterior, as the authors' train.py does.

    The VAE is loaded (on the CPU) when the data is opened, so a missing VAE fails at start-up; it moves to the
    batch's device on the first call. The posterior noise comes from the device's global RNG (which the
    trainer seeds), as in the authors' code.
    """

    def __init__(self, vae_path_or_id: str) -> None:
        from ditkit.encoders.autoencoder import load_vae

        self.vae = load_vae(vae_path_or_id, device="cpu")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.vae.device != images.device:
            self.vae.to(images.device)
        return self.vae.sample_latents(images, sample=True)


def open_training_data(data_path: str, image_size: int | None, vae: str | None, seed: int,
                       exif_transpose: bool = False) -> TrainingData:
    """Open a latent store (detected by its manifest), or an image folder (pixels, or latents via `vae`).

    `image_size` None means the store's resolution, or 256 for an image folder. exif_transpose: turn each image
    by its EXIF orientation first (for a store, it must be how the store was extracted).
    """
    path = Path(os.path.expanduser(str(data_path)))
    if not path.exists():
        raise UserError(f"--data-path {data_path} does not exist; give an image folder or a latent store")
    if is_latent_store(path):
        store = LatentStore(path, seed=seed)
        m = store.manifest
        image_size = int(m["image_size"]) if image_size is None else image_size
        if int(m["image_size"]) != image_size:
            raise UserError(
                f"the latent store {data_path} was extracted at {m['image_size']}px but --image-size is "
                f"{image_size}; pass --image-size {m['image_size']} or extract again"
            )
        if bool(m.get("exif_transpose", False)) != exif_transpose:
            said = "with" if m.get("exif_transpose") else "without"
            raise UserError(
                f"the latent store {data_path} was extracted {said} --exif-transpose; the images are encoded "
                f"already, so {'pass' if said == 'with' else 'drop'} --exif-transpose (or extract again)"
            )
        if len(store) == 0:
            raise UserError(f"the latent store {data_path} holds no images; extract a non-empty folder")
        channels, side, _ = store.latent_shape
        note = f" (store VAE {m['vae']}; --vae {vae} ignored)" if vae and vae != m["vae"] else ""
        return TrainingData(
            dataset=store,
            num_classes=store.num_classes,
            in_channels=channels,
            input_size=side,
            encoder=None,
            labels=store.labels,
            classes=list(m.get("classes") or []),
            latents=store_recipe(m)[0],
            description=(
                f"latent store {data_path}: {len(store)} images, {store.num_classes} classes, latents "
                f"{channels}x{side}x{side} from {m['vae']} at {image_size}px, random flip + posterior resampling"
                f"{note}"
            ),
        )
    from ditkit.data.images import ImageFolderDataset, check_image_size

    image_size = 256 if image_size is None else image_size
    dataset = ImageFolderDataset(path, image_size, seed=seed, exif_transpose=exif_transpose)
    labels = np.asarray(dataset.labels, dtype=np.int64)
    kind = f"{dataset.num_classes} classes" if dataset.classes else "unconditional (flat folder)"
    if exif_transpose:
        kind += ", EXIF orientation applied"
    if vae is None:
        return TrainingData(
            dataset=dataset,
            num_classes=dataset.num_classes,
            in_channels=3,
            input_size=image_size,
            encoder=None,
            labels=labels,
            classes=list(dataset.classes),
            description=f"image folder {data_path}: {len(dataset)} images, {kind}, {image_size}px pixels, random flip",
        )
    encoder = OnTheFlyEncoder(vae)
    check_image_size(image_size, encoder.vae.downsample)
    side = image_size // encoder.vae.downsample
    return TrainingData(
        dataset=dataset,
        num_classes=dataset.num_classes,
        in_channels=encoder.vae.latent_channels,
        input_size=side,
        encoder=encoder,
        labels=labels,
        classes=list(dataset.classes),
        latents=LatentSpace(vae=vae, scale=encoder.vae.scale, shift=encoder.vae.shift,
                            downsample=encoder.vae.downsample),
        description=(
            f"image folder {data_path}: {len(dataset)} images, {kind}, {image_size}px, random flip, encoded on "
            f"the fly by {vae} to {encoder.vae.latent_channels}x{side}x{side} (extract a store to train faster)"
        ),
    )
