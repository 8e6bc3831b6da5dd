"""What the training loop reads: the data set (digits, a latent store or an image folder) and the index lists of
each rank's share of each global batch, a seeded per-epoch permutation (so a resumed run sees the same batches)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from ditkit.recipe import LatentSpace
from ditkit.train.options import TrainOptions


@dataclass
class TrainData:
    """The data set and what the recipe takes from it: the latent space and the label map."""

    dataset: Dataset
    num_classes: int
    in_channels: int
    input_size: int
    encoder: Any
    description: str
    labels: torch.Tensor | None
    latents: LatentSpace = field(default_factory=LatentSpace)
    classes: tuple[str, ...] | None = None


def open_data(opts: TrainOptions, seed: int) -> TrainData:
    """The built-in digits, a latent store, or an image folder (encoded by a VAE on the fly when --vae)."""
    if opts.data_path == "digits":
        from ditkit.data.digits import NUM_CLASSES, load_digits_split

        size = opts.image_size or 16
        images, labels = load_digits_split(size, "train")
        return TrainData(TensorDataset(images, labels), NUM_CLASSES, 1, size, None, f"digits {size}x{size}", labels,
                         classes=tuple(str(k) for k in range(NUM_CLASSES)))
    from ditkit.data import open_training_data

    data = open_training_data(opts.data_path, opts.image_size, opts.vae, seed)  # None: the store's own size
    labels = getattr(data, "labels", None)
    return TrainData(
        data.dataset,
        data.num_classes,
        data.in_channels,
        data.input_size,
        data.encoder,
        data.describe(),
        torch.as_tensor(labels) if labels is not None else None,
        data.latents,
        tuple(data.classes) if data.classes else None,
    )


class GlobalBatches:
    """Index lists of this rank's share of each global batch, from step `start` on, within one epoch."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, epoch: int, start: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
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
