"""Image folders: the ADM crop against an independent float64 resampler, layouts, bad files, flips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.data.images import ImageFolderDataset, center_crop_arr, find_images, load_rgb, to_tensor
from ditkit.runtime.errors import UserError
from helpers.images import CORRUPT, GRAYSCALE, IMAGES, make_image_folder, smooth_image

# ----------------------------------------------------------------------------------------------- reference
# Pillow resamples separably (horizontal pass, then vertical), each output pixel a normalised weighted sum over
# the input pixels within the kernel support widened by the downscale factor, rounded (half up) to 8 bits after
# each pass. Written here from that description in float64.


def _box(x: np.ndarray) -> np.ndarray:
    return ((x > -0.5) & (x <= 0.5)).astype(np.float64)


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _weights(in_size: int, out_size: int, kernel, support: float) -> np.ndarray:
    scale = in_size / out_size
    widen = max(scale, 1.0)
    reach = support * widen
    w = np.zeros((out_size, in_size))
    for o in range(out_size):
        center = (o + 0.5) * scale
        lo = max(int(center - reach + 0.5), 0)
        hi = min(int(center + reach + 0.5), in_size)
        taps = kernel((np.arange(lo, hi) - center + 0.5) / widen)
        w[o, lo:hi] = taps / taps.sum()
    return w


def _resize(arr: np.ndarray, width: int, height: int, kernel, support: float, vertical_first: bool) -> np.ndarray:
    h, w = arr.shape[:2]
    out = arr
    passes = ["h", "v"][:: -1 if vertical_first else 1]
    for axis in passes:
        if axis == "h" and width != w:
            out = np.einsum("ow,hwc->hoc", _weights(w, width, kernel, support), out)
        elif axis == "v" and height != h:
            out = np.einsum("oh,hwc->owc", _weights(h, height, kernel, support), out)
        else:
            continue
        out = np.clip(np.floor(out + 0.5), 0, 255)
    return out


def reference_center_crop(arr: np.ndarray, size: int, vertical_first: bool) -> np.ndarray:
    out = arr.astype(np.float64)
    while min(out.shape[:2]) >= 2 * size:
        out = _resize(out, out.shape[1] // 2, out.shape[0] // 2, _box, 0.5, vertical_first)
    h, w = out.shape[:2]
    factor = size / min(h, w)
    out = _resize(out, round(w * factor), round(h * factor), _bicubic, 2.0, vertical_first)
    top, left = (out.shape[0] - size) // 2, (out.shape[1] - size) // 2
    return out[top : top + size, left : left + size]


@pytest.mark.parametrize(
    "width,height,size",
    [(77, 45, 32), (150, 97, 32), (300, 260, 32), (41, 90, 16), (33, 33, 32), (64, 200, 16), (257, 256, 64)],
)
def test_center_crop_matches_reference(width, height, size):
    arr = smooth_image(width, height, seed=width * 7 + height)
    got = center_crop_arr(Image.fromarray(arr), size)
    assert got.shape == (size, size, 3) and got.dtype == np.uint8
    # Pillow's pass order has changed between versions (13 resizes vertically first): accept either order,
    # but then pixel-exact up to rare fixed-point rounding.
    diffs = [
        np.abs(got.astype(np.float64) - reference_center_crop(arr, size, vertical_first))
        for vertical_first in (True, False)
    ]
    best = min(diffs, key=lambda d: (d > 0).mean())
    assert best.max() <= 1.0, f"max difference {best.max()} grey levels"
    assert (best > 0).mean() < 0.01, f"fraction of differing values per pass order: {[(d > 0).mean() for d in diffs]}"


def test_center_crop_is_central():
    # A 3:1 image whose middle third is white and outer thirds black: the crop must be the white part.
    arr = np.zeros((40, 120, 3), dtype=np.uint8)
    arr[:, 40:80] = 255
    got = center_crop_arr(Image.fromarray(arr), 40)
    assert got.shape == (40, 40, 3)
    assert got[:, 2:-2].min() == 255  # interior exactly white; edges may ring from bicubic


def test_find_images_layouts(tmp_path):
    root = make_image_folder(tmp_path / "cls")
    paths, labels, classes = find_images(root)
    assert classes == ["cat", "dog", "eel"]
    assert len(paths) == len(IMAGES) + 1  # the corrupt file is found; it is skipped only when read
    for path, label in zip(paths, labels):
        assert classes[label] == path.parent.name
    flat = make_image_folder(tmp_path / "flat", flat=True)
    paths, labels, classes = find_images(flat)
    assert classes == [] and set(labels) == {0} and len(paths) == len(IMAGES) + 1


def test_find_images_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        find_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        find_images(tmp_path / "empty")
    mixed = make_image_folder(tmp_path / "mixed", corrupt=False)
    Image.fromarray(smooth_image(9, 9, 0)).save(mixed / "loose.png")
    with pytest.raises(UserError, match="both at its top level"):
        find_images(mixed)
    for err in (UserError("x"),):
        assert "\n" not in str(err)


def test_unreadable_and_non_rgb_images(tmp_path, capsys):
    root = make_image_folder(tmp_path)
    cls, name = CORRUPT
    assert load_rgb(root / cls / name) is None
    assert str(root / cls / name) in capsys.readouterr().err
    gray = load_rgb(root / GRAYSCALE[0] / GRAYSCALE[1])
    assert gray.mode == "RGB"
    arr = np.asarray(gray)
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
    for name, (cls, *_rest) in IMAGES.items():
        assert load_rgb(root / cls / name).mode == "RGB"


def test_dataset_items_flip_and_skip(tmp_path):
    root = make_image_folder(tmp_path)
    ds = ImageFolderDataset(root, 16, seed=3)
    assert ds.num_classes == 3 and len(ds) == len(IMAGES) + 1
    flips = []
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert -1.0 <= x.min() and x.max() <= 1.0
        img = load_rgb(ds.paths[i])
        if img is None:  # the corrupt file: replaced by the next readable image, counted
            assert ds.num_skipped >= 1
            continue
        plain = to_tensor(center_crop_arr(img, 16))
        assert y == ds.labels[i]
        if torch.equal(x, plain):
            flips.append(False)
        else:
            assert torch.equal(x, plain.flip(-1))
            flips.append(True)
    # Reproducible per (seed, epoch, index), and different across epochs for some item.
    again = [ImageFolderDataset(root, 16, seed=3)[i][0] for i in range(3)]
    assert all(torch.equal(a, ds[i][0]) for i, a in enumerate(again))
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i][0], again[i]) for i in range(3)) or len(set(flips)) == 1
    assert 0 < sum(flips) < len(flips)  # 8 fair coins: all-equal has probability 1/128, fixed by the seed
