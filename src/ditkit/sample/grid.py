"""A labelled grid PNG of samples: one row per class label."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditkit.runtime.errors import UserError
from ditkit.runtime.io import atomic_write
from ditkit.sample.pipeline import SamplingPipeline


def make_grid(images: np.ndarray, labels: list[int], per_label: int) -> Any:
    """A PIL image: one row per label (its samples side by side), the label written left of each row."""
    from PIL import Image, ImageDraw

    n, h, w, c = images.shape
    cell = max(1, math.ceil(64 / max(h, w)))  # tiny (e.g. 8×8 digits) images are enlarged to about 64 px
    ch, cw = h * cell, w * cell
    pad, margin = 2, 72
    grid = Image.new("RGB", (margin + per_label * (cw + pad) + pad, len(labels) * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for row, label in enumerate(labels):
        top = pad + row * (ch + pad)
        draw.text((4, top + ch // 2 - 6), f"class {label}", fill="black")
        for col in range(per_label):
            img = images[row * per_label + col]
            tile = Image.fromarray(img[..., 0] if c == 1 else img, "L" if c == 1 else "RGB").convert("RGB")
            grid.paste(tile.resize((cw, ch), Image.NEAREST), (margin + pad + col * (cw + pad), top))
    return grid


def _save_png(image: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def sample_grid(
    sampler: SamplingPipeline, labels: list[int], per_label: int, seed: int, out: Path, save_images: bool
) -> Path:
    """Sample `per_label` images for each label and write OUT/grid.png (and OUT/images/*.png)."""
    from PIL import Image

    num_classes = sampler.model.config.num_classes
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise UserError(f"class label {bad[0]} is out of range: this model has classes 0..{num_classes - 1}")
    ys = torch.tensor([y for y in labels for _ in range(per_label)], dtype=torch.long)
    generator = torch.Generator(device=sampler.device).manual_seed(seed)
    images = sampler.images(ys, generator).numpy()
    grid_path = out / "grid.png"
    _save_png(make_grid(images, labels, per_label), grid_path)
    if save_images:
        for i, (img, y) in enumerate(zip(images, ys.tolist())):
            tile = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
            _save_png(tile, out / "images" / f"{i:04d}_class{y}.png")
    return grid_path
