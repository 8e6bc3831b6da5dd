"""Image folders: finding the files, the ADM center crop, and a `Dataset` of cropped, flipped images.

Layout (the ImageFolder convention): `ROOT/CLASS_NAME/**/IMAGE` gives one class per sub-folder, labels in
sorted folder-name order (so ImageNet's `n01440764` … folders get the usual 0…999); a flat `ROOT/IMAGE` folder
is unconditional data (one class, label 0).

A corrupt or truncated image is reported by its path and skipped rather than ending a run hours in. Every
mode is converted to 8-bit RGB by a stated rule (`to_rgb8`: 16-bit scaled by 1/257, floats by their range,
transparency onto white), or the file is skipped with a line naming it and its mode. The EXIF orientation tag
is ignored unless asked for (`exif_transpose`), as in the authors' preprocessing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ditkit.runtime.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------- finding files


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _file_problem(path: Path) -> str | None:
    """Why an image-named entry cannot be used as an image file, or None: not a regular file (a FIFO, socket or
    device would block or mislead the reader), a broken link, or a name that is not valid UTF-8."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8; rename it"
    if path.is_file():
        return None
    return "a broken link" if path.is_symlink() and not path.exists() else "not a regular file"


def _walk_images(folder: Path, seen: set, skipped: list[str]) -> list[Path]:
    """Image files under `folder`, recursively, sorted so that every run (and every rank) sees the same order.

    Links to folders are followed, but every folder is read once (by device and inode, in `seen`): a link back
    up the tree (a loop) or a second link to a folder already read is skipped and named in `skipped`, as are
    image-named entries that are not usable files (`_file_problem`)."""
    if _identity(folder) in seen:
        skipped.append(f"{folder} (a link to a folder already read)")
        return []
    seen.add(_identity(folder))
    found, stack = [], [folder]
    while stack:
        current = stack.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as err:
            skipped.append(f"{current} ({err.strerror})")
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                continue
            if path.is_dir():
                ident = _identity(path)
                if ident is None or ident in seen:
                    skipped.append(f"{path} (a link back to a folder already read)")
                else:
                    seen.add(ident)
                    stack.append(path)
            elif _is_image(entry.name):
                problem = _file_problem(path)
                if problem is None:
                    found.append(path)
                else:
                    skipped.append(f"{path} ({problem})")
    return sorted(found)


def _printable(text: str) -> str:
    """`text` with the undecodable bytes of a non-UTF-8 file name shown as \\xNN (any stream can print it)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _report_skipped(root: Path, skipped: list[str]) -> None:
    if skipped:
        shown = _printable("; ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
        print(f"ditkit: warning: skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} in {root}: "
              f"{shown}", file=sys.stderr)


def find_images(root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """(paths, labels, class names) of an image folder; class names are [] for a flat, unconditional folder.

    When any sub-folder holds images, every sub-folder is a class, empty ones included (each named in a
    warning): label k is the k-th sub-folder name in sorted order whatever the folders hold, so emptying or
    filling one never renumbers the others. Images lying directly in `root` next to class folders are an
    error (the labels would be ambiguous). A missing or image-less folder raises a one-line UserError.
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"data folder not found: {root}; pass --data-path with an image folder or a latent store")
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; pass --data-path with an image folder or a latent store")
    skipped: list[str] = []
    top = sorted(p for p in root.iterdir() if _is_image(p.name) and not p.is_dir())
    top_images = [p for p in top if _file_problem(p) is None]
    skipped += [f"{p} ({_file_problem(p)})" for p in top if _file_problem(p) is not None]
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for d in class_dirs:
        if _file_problem(d) == "its name is not valid UTF-8; rename it":  # it would become a class name
            raise UserError(f"class folder {_printable(str(d))} has a name that is not valid UTF-8; rename it")
    seen = {_identity(root)}
    class_files = [(d, _walk_images(d, seen, skipped)) for d in class_dirs]
    _report_skipped(root, skipped)
    if not any(files for _, files in class_files):
        class_files = []  # stray empty sub-folders next to loose images: a flat folder
    if class_files and top_images:
        raise UserError(
            f"{root} has images both at its top level ({top_images[0].name}, ...) and in class sub-folders; "
            "move the loose images into a class folder, or point at a folder of one kind"
        )
    if class_files:
        empty = [d.name for d, files in class_files if not files]
        if empty:
            print(f"ditkit: warning: class folder(s) with no images in {root}: {', '.join(empty[:10])}"
                  f"{' ...' if len(empty) > 10 else ''}; kept as classes with no examples, so the labels of the "
                  "others do not shift", file=sys.stderr)
        paths, labels = [], []
        for label, (_, files) in enumerate(class_files):
            paths.extend(files)
            labels.extend([label] * len(files))
        return paths, labels, [d.name for d, _ in class_files]
    if top_images:
        return top_images, [0] * len(top_images), []
    raise UserError(
        f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)} files, in class sub-folders or "
        "at the top level); check the path"
    )


# ----------------------------------------------------------------------------------------------- decoding


# Modes that Pillow converts to RGB by a defined formula (palette lookup, 0/255 for 1-bit, BT.601 for YCbCr,
# CIELAB to sRGB, the naive R = (255 - C)(255 - K)/255 for CMYK without a colour profile).
_DIRECT_MODES = ("RGB", "RGBX", "L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")


class UnsupportedImage(ValueError):
    """A decoded image that has no defined 8-bit RGB form (its mode, or NaN/infinite float pixels)."""


def _deep_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """8-bit values of a 16-bit, 32-bit integer or float single-channel image (mode I;16*, I or F).

    16-bit (and I holding 0..65535, how 16-bit files used to decode) is divided by 257, rounded: 65535 → 255.
    F in [0, 1] is the unit range (× 255); any other I or F image is stretched from its minimum to its maximum.
    """
    if mode == "F":
        values = arr.astype(np.float64)
        if not np.isfinite(values).all():
            raise UnsupportedImage("its float pixels include NaN or infinity; save it without them")
        if values.min() >= 0.0 and values.max() <= 1.0:
            return np.floor(values * 255.0 + 0.5).astype(np.uint8)
    else:
        values = arr.astype(np.int64)
        if mode.startswith("I;16") or (values.min() >= 0 and values.max() <= 65535):
            return ((values + 128) // 257).astype(np.uint8)
    low, high = values.min(), values.max()
    if high == low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.floor((values - low) * (255.0 / (high - low)) + 0.5).astype(np.uint8)


def to_rgb8(img: Image.Image) -> Image.Image:
    """A decoded image of any mode as 8-bit RGB; UnsupportedImage naming the mode when there is no defined way.

    Transparent pixels are composited onto white (transparency usually means "background").
    """
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in ("I", "F") or mode.startswith("I;16"):
        return Image.fromarray(_deep_to_uint8(np.asarray(img), mode), mode="L").convert("RGB")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if mode in _DIRECT_MODES:
        return img.convert("RGB")
    raise UnsupportedImage(f"image mode {mode!r} has no defined conversion to 8-bit RGB; save the file as RGB")


def load_rgb(path: str | os.PathLike, exif_transpose: bool = False) -> Image.Image | None:
    """The image at `path` as 8-bit RGB (`to_rgb8`), fully decoded; None, with a one-line warning naming it,
    when it is unreadable or of a mode that has no defined conversion.

    `Image.open` only reads the header, so a truncated file would fail later, inside a resize; `load()` decodes
    everything now, where the failure can be reported with the path. exif_transpose: apply the EXIF
    orientation tag (off by default, as in the authors' preprocessing, which ignores it).
    """
    try:
        with Image.open(path) as img:
            img.load()
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            return to_rgb8(img)
    except UnsupportedImage as err:
        print(f"ditkit: skipping image {path}: {err}", file=sys.stderr)
        return None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"ditkit: skipping unreadable image {path}: {msg[:160]}", file=sys.stderr)
        return None


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's center crop (guided-diffusion `center_crop_arr`): uint8 array image_size×image_size×C.

    While the short side is at least twice the target, halve the image with a BOX filter (a cheap, alias-free
    downsample); then resize with BICUBIC so the short side equals `image_size`; then cut the central square.
    Kept bit-for-bit equal to the authors' preprocessing, since FID against ADM reference batches depends on it.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(side * scale) for side in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 H×W×3 → float32 3×H×W in [-1, 1] (the range the VAE and pixel-space models take)."""
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one item in one epoch: a resumed run redraws exactly the same flips and noise."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, index])


# ----------------------------------------------------------------------------------------------- dataset


class ImageFolderDataset(Dataset):
    """Center-cropped images with a random horizontal flip: item i is (float32 3×S×S in [-1, 1], int64 label).

    The flip of item i in epoch e is drawn from (seed, e, i), so it does not depend on worker count or order;
    call `set_epoch(e)` at each epoch (every DataLoader worker gets the epoch when the iterator is created).
    An unreadable image is replaced by the next readable one (and named on stderr); `num_skipped` counts
    those events across workers.
    """

    def __init__(self, root: str | os.PathLike, image_size: int, seed: int = 0, random_flip: bool = True,
                 exif_transpose: bool = False) -> None:
        if image_size <= 0:
            raise UserError(f"--image-size must be positive, got {image_size}")
        self.root = Path(root)
        self.paths, self.labels, self.classes = find_images(root)
        self.image_size = image_size
        self.seed = seed
        self.random_flip = random_flip
        self.exif_transpose = exif_transpose
        self.epoch = 0
        # A tensor in shared memory is visible to DataLoader workers (fork or spawn), unlike a plain int.
        self._skipped = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def num_classes(self) -> int:
        """Number of class folders; 1 for a flat (unconditional) folder."""
        return max(1, len(self.classes))

    @property
    def num_skipped(self) -> int:
        return int(self._skipped.item())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self.paths)):
            i = (index + offset) % len(self.paths)
            img = load_rgb(self.paths[i], self.exif_transpose)
            if img is not None:
                break
            self._skipped += 1
        else:
            raise UserError(f"none of the {len(self.paths)} images in {self.root} could be read")
        arr = center_crop_arr(img, self.image_size)
        if self.random_flip and item_rng(self.seed, self.epoch, index).random() < 0.5:
            arr = arr[:, ::-1]
        return to_tensor(arr), self.labels[i]


def check_image_size(image_size: int, factor: int = 8) -> None:
    """A one-line error for an image size the autoencoder cannot halve `log2(factor)` times."""
    if image_size <= 0 or image_size % factor:
        raise UserError(f"--image-size {image_size} must be a positive multiple of {factor} for the VAE")


class CropDataset(Dataset):
    """Item i: (i, center-cropped uint8 H×W×3 tensor of file i, or an empty tensor if it is unreadable)."""

    def __init__(self, paths: list[Path], image_size: int, exif_transpose: bool = False) -> None:
        self.paths, self.image_size, self.exif_transpose = paths, image_size, exif_transpose

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        img = load_rgb(self.paths[i], self.exif_transpose)
        if img is None:
            return i, torch.empty(0, dtype=torch.uint8)
        return i, torch.from_numpy(np.array(center_crop_arr(img, self.image_size), dtype=np.uint8))
