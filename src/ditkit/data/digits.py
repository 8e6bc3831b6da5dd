"""The built-in data set: scikit-learn's handwritten digits (1,797 8×8 images, 10 classes), no download.

`--data-path digits` uses it. Images are upscaled to the requested side and scaled to [-1, 1] with the
background at -1 and ink towards +1, the range the diffusion models train in. A fixed stratified split keeps
20% of the images apart for evaluation (the digits classifier's test set and the Fréchet reference).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from ditkit.runtime.errors import UserError

NUM_CLASSES = 10
NATIVE_SIZE = 8  # sklearn's digits are 8×8 with values 0..16
TEST_FRACTION = 0.2
SPLITS = ("train", "test")


@functools.lru_cache(maxsize=4)
def _split_indices(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(native images float32 N×8×8 in [0, 1], labels, train indices, test indices), stratified by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    labels = data.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, random_state=seed, stratify=labels
    )
    return images, labels, np.sort(train_idx), np.sort(test_idx)


def resize_images(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize N×C×H×W images to image_size² (bilinear; antialiased when shrinking)."""
    if images.shape[-1] == image_size and images.shape[-2] == image_size:
        return images
    shrinking = image_size < max(images.shape[-2:])
    return F.interpolate(
        images, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=shrinking
    )


def load_digits_split(image_size: int, split: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of the digits at `image_size`: (images float32 N×1×S×S in [-1, 1], labels int64 N).

    `split` is "train" (1,437 images) or "test" (360 images); the split depends only on `seed`, so the
    held-out images are the same in training and evaluation.
    """
    if split not in SPLITS:
        raise UserError(f"digits: unknown split {split!r}; choose 'train' or 'test'")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise UserError(f"digits: image size must be a positive integer, got {image_size!r}")
    images, labels, train_idx, test_idx = _split_indices(int(seed))
    idx = train_idx if split == "train" else test_idx
    x = torch.from_numpy(images[idx]).unsqueeze(1)  # N×1×8×8 in [0, 1], 0 = background
    x = resize_images(x, image_size)
    # Bilinear weights are non-negative, so the range holds; the clamp guards against rounding only.
    x = (x * 2.0 - 1.0).clamp_(-1.0, 1.0)
    return x.contiguous(), torch.from_numpy(labels[idx].copy())
