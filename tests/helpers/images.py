"""Generated test images: smooth noisy gradients, and an ImageFolder of odd sizes, modes and formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# name -> (class folder, width, height, mode, format). Odd sizes on purpose; several need the BOX halving.
IMAGES = {
    "a0.png": ("cat", 77, 45, "RGB", "PNG"),
    "a1.jpg": ("cat", 150, 97, "RGB", "JPEG"),
    "a2.png": ("cat", 300, 260, "RGBA", "PNG"),
    "b0.jpg": ("dog", 41, 90, "RGB", "JPEG"),
    "b1.png": ("dog", 33, 33, "L", "PNG"),  # grayscale
    "b2.png": ("dog", 131, 67, "P", "PNG"),  # palette
    "c0.jpg": ("eel", 64, 200, "RGB", "JPEG"),
    "c1.png": ("eel", 95, 96, "RGB", "PNG"),
}
CORRUPT = ("eel", "c9.jpg")  # a truncated JPEG
GRAYSCALE = ("dog", "b1.png")


def smooth_image(width: int, height: int, seed: int) -> np.ndarray:
    """A uint8 H×W×3 image with smooth gradients plus noise (so crops are not trivially constant)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    chans = [
        127 + 100 * np.sin(xx / (3 + 7 * rng.random()) + rng.random() * 6) * np.cos(yy / (4 + 9 * rng.random()))
        for _ in range(3)
    ]
    arr = np.stack(chans, axis=-1) + rng.normal(0, 12, size=(height, width, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, flat: bool = False, corrupt: bool = True) -> Path:
    """ImageFolder layout with 3 classes (or flat), odd sizes, PNG and JPEG, grayscale/palette/RGBA, 1 corrupt."""
    root.mkdir(parents=True, exist_ok=True)
    for seed, (name, (cls, w, h, mode, fmt)) in enumerate(sorted(IMAGES.items())):
        folder = root if flat else root / cls
        folder.mkdir(exist_ok=True)
        img = Image.fromarray(smooth_image(w, h, seed))
        if mode == "L":
            img = img.convert("L")
        elif mode == "P":
            img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        elif mode == "RGBA":
            img = img.convert("RGBA")
        img.save(folder / name, format=fmt)
    if corrupt:
        cls, name = CORRUPT
        folder = root if flat else root / cls
        good = folder / "tmp.jpg"
        Image.fromarray(smooth_image(80, 80, 99)).save(good, format="JPEG")
        data = good.read_bytes()
        good.unlink()
        (folder / name).write_bytes(data[: len(data) // 3])  # header intact, scan data cut off
    (root / ".hidden_notes.txt").write_text("not an image")
    return root
