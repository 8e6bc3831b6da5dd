"""A small CNN trained on the built-in digits: the yardstick for models trained on `--data-path digits`.

It scores generated digits two ways: class accuracy (does a sample of class c look like a c to the
classifier?) and a Fréchet distance between the classifier's penultimate features of the samples and of the
held-out real digits (do the samples look like real digits, in distribution?). It trains in well under a
minute on two CPU cores the first time a size is asked for, and is cached as safetensors afterwards.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ditkit.data.digits import NUM_CLASSES, load_digits_split, resize_images
from ditkit.metrics.frechet import feature_statistics, frechet_distance
from ditkit.runtime.errors import UserError
from ditkit.runtime.io import cache_file

VERSION = "v2"  # bump when the architecture or the training recipe changes: old cache files are then ignored
INTERNAL_SIZE = 16  # every input is resized to this side, so one architecture serves any image size
FEATURE_DIM = 128
TRAIN_SEED = 0


class DigitsCNN(nn.Module):
    """Conv net over 16×16 inputs in [-1, 1]: three conv stages, a global pool, a 128-d feature layer, logits.

    16×16 keeps every detail of the native 8×8 digits at a sixteenth of the cost of 32×32 on a CPU; batch norm
    makes it converge in a few epochs.
    """

    def __init__(self, width: int = 16, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES):
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *conv(1, width),
            *conv(width, width),
            nn.MaxPool2d(2),  # 8×8
            *conv(width, 2 * width),
            *conv(2 * width, 2 * width),
            nn.MaxPool2d(2),  # 4×4
            *conv(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature = nn.Linear(4 * width, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features N×128 of images N×1×S×S in [-1, 1] (any S; resized to 16 first)."""
        x = resize_images(x.float().clamp(-1.0, 1.0), INTERNAL_SIZE)
        return F.relu(self.feature(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits N×10."""
        return self.head(self.features(x))


# ----------------------------------------------------------------------------------------------- training


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one CPU thread: for a net this small, syncing threads costs more than it saves, and on a
    busy machine it costs 30× (measured: 0.94 s vs 0.028 s per training step with 2 threads at load 8)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light random affine jitter: shifts up to one native pixel (1/8 of the side), ±10°, scale 0.9–1.1."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(10)
    scale = 1.0 + (torch.rand(n, generator=generator) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.25  # grid units: the side spans 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Sample x+1 with zero padding so that pixels moved in from outside are background (-1).
    return F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of images whose arg-max class equals the label."""
    model.eval()
    correct = 0
    with _one_thread():
        for start in range(0, len(images), batch_size):
            logits = model(images[start : start + batch_size])
            correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return correct / max(1, len(images))


def train_digits_classifier(
    image_size: int, epochs: int = 8, batch_size: int = 64, lr: float = 2e-3, verbose: bool = False
) -> tuple[DigitsCNN, float]:
    """Train a fresh classifier on the digits train split at `image_size`; returns (model, test accuracy).

    Deterministic for a given torch version; the caller's global random state is left untouched.
    """
    generator = torch.Generator().manual_seed(TRAIN_SEED)  # data order and jitter
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRAIN_SEED)  # initial weights, without disturbing the caller's random stream
        model = DigitsCNN()
    x_train, y_train = load_digits_split(image_size, "train")
    x_test, y_test = load_digits_split(image_size, "test")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    start = time.time()
    with _one_thread():
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(x_train), generator=generator)
            for i in range(steps_per_epoch):
                idx = order[i * batch_size : (i + 1) * batch_size]
                x = _augment(resize_images(x_train[idx], INTERNAL_SIZE), generator)
                loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if verbose:
                print(
                    f"digits classifier: epoch {epoch + 1}/{epochs} loss {loss.item():.3f} "
                    f"({time.time() - start:.0f}s)",
                    file=sys.stderr,
                )
    return model.eval(), accuracy(model, x_test, y_test)


# ----------------------------------------------------------------------------------------------- cache


_LOADED: dict[tuple[str, int], DigitsCNN] = {}


def classifier_path(image_size: int, folder: Path | None = None) -> Path:
    """Cache file of the classifier for one image size."""
    name = f"digits-classifier-{VERSION}-s{image_size}.safetensors"
    return folder / name if folder is not None else cache_file(name)


def get_digits_classifier(image_size: int, verbose: bool = True) -> DigitsCNN:
    """The classifier for digits at `image_size`, in eval mode on the CPU: from the cache, else trained now.

    Training takes up to a minute the first time; the result is written atomically to the cache folder
    (`$DITKIT_CACHE` or `~/.cache/ditkit`), so concurrent runs never read a partial file.
    """
    from ditkit.runtime.io import atomic_write, read_safetensors, save_safetensors

    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise UserError(f"digits classifier: image size must be a positive integer, got {image_size!r}")
    path = classifier_path(image_size)
    key = (str(path), image_size)
    if key in _LOADED:
        return _LOADED[key]
    model = DigitsCNN()
    if path.exists():
        try:
            tensors, _ = read_safetensors(path)
            model.load_state_dict(tensors, strict=True)
            _LOADED[key] = model.eval()
            return _LOADED[key]
        except (UserError, RuntimeError):
            if verbose:  # a damaged or foreign file: train again and replace it
                print(f"digits classifier: ignoring unreadable cache file {path}", file=sys.stderr)
    if verbose:
        print(
            f"digits classifier: training for {image_size}x{image_size} digits (once; cache {path.parent})",
            file=sys.stderr,
        )
    model, acc = train_digits_classifier(image_size, verbose=verbose)
    if verbose:
        print(f"digits classifier: test accuracy {acc:.4f}", file=sys.stderr)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"version": VERSION, "image_size": str(image_size), "test_accuracy": f"{acc:.6f}"}
    atomic_write(path, lambda tmp: save_safetensors(tensors, tmp, meta))
    _LOADED[key] = model
    return model


# ----------------------------------------------------------------------------------------------- metrics


@torch.no_grad()
def digits_features(model: DigitsCNN, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Penultimate features N×128 (float64) of images N×1×S×S in [-1, 1]."""
    model.eval()
    with _one_thread():
        out = [
            model.features(images[i : i + batch_size].cpu()).double()
            for i in range(0, len(images), batch_size)
        ]
    return torch.cat(out) if out else torch.zeros(0, FEATURE_DIM, dtype=torch.float64)


def _check_samples(samples: torch.Tensor) -> torch.Tensor:
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.shape[1] != 1:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise UserError(f"digits metrics: samples must be a tensor N×1×S×S in [-1, 1], got {shape}")
    if samples.shape[-1] != samples.shape[-2]:
        raise UserError(
            f"digits metrics: samples must be square, got {samples.shape[-2]}x{samples.shape[-1]}"
        )
    if samples.shape[0] < 2:
        raise UserError(
            f"digits metrics: need at least 2 samples for a Fréchet distance, got {samples.shape[0]}"
        )
    return samples.detach().float().cpu()


def digits_metrics(samples: torch.Tensor, labels: torch.Tensor | None = None, verbose: bool = True) -> dict:
    """{"accuracy", "frechet"} of generated digits N×1×S×S in [-1, 1] with their intended classes.

    accuracy: fraction classified as their label (None without labels). frechet: Fréchet distance between the
    classifier features of the samples and of the 360 held-out real digits at the same size.
    """
    samples = _check_samples(samples)
    image_size = int(samples.shape[-1])
    model = get_digits_classifier(image_size, verbose=verbose)
    result: dict = {"num_samples": int(samples.shape[0])}
    if labels is not None:
        labels = torch.as_tensor(labels).long().cpu().reshape(-1)
        if labels.shape[0] != samples.shape[0]:
            raise UserError(f"digits metrics: {samples.shape[0]} samples but {labels.shape[0]} labels")
        result["accuracy"] = accuracy(model, samples, labels)
    else:
        result["accuracy"] = None
    reference, _ = load_digits_split(image_size, "test")
    result["frechet"] = frechet_distance(
        *feature_statistics(digits_features(model, samples)),
        *feature_statistics(digits_features(model, reference)),
    )
    return result


def real_digits_frechet(image_size: int, num_samples: int, seed: int = 0, verbose: bool = False) -> float:
    """The Fréchet distance that `num_samples` real training digits get against the held-out ones.

    The floor a perfect generator would reach with that many samples: the estimate is biased upwards for small
    sets (measured at 16×16: about 3 for 50 samples, 1 for 200, 0.35 for 500, 0.17 for all 1,437).
    """
    images, labels = load_digits_split(image_size, "train")
    if not 2 <= num_samples <= len(images):
        raise UserError(f"digits floor: num_samples must be in 2..{len(images)}, got {num_samples}")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num_samples]
    return digits_metrics(images[idx], labels[idx], verbose=verbose)["frechet"]


def score_sampler(sampler: Any, num_samples: int, seed: int) -> dict:
    """The digits yardstick on `num_samples` class-balanced samples (label k mod the model's classes) of a
    `ditkit.sample.SamplingPipeline`, the noise drawn from `seed` on its device: what train's --eval-every, the demo
    and `ditkit scaling` report. The uint8 images are mapped back to [-1, 1] as the classifier was trained."""
    labels = torch.arange(num_samples) % sampler.model.config.num_classes
    images = sampler.images(labels, torch.Generator(device=sampler.device).manual_seed(seed))
    pixels = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return digits_metrics(pixels, labels, verbose=False)
