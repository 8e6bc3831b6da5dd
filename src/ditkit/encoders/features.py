"""Frozen encoders that give REPA its targets: patch features N×T×F from images N×C×H×W in [-1, 1].

Any `nn.Module` with a `feature_dim` attribute and that call signature plugs in (`load_encoder` returns one).
Two are built in:

- a transformers vision model read offline (`local_files_only=True`) from a local folder or the Hugging Face
  cache, e.g. DINOv2-B (`facebook/dinov2-base`, REPA's default): images resized to its input side (224,
  bicubic), normalised with its ImageNet mean/std, and its final (layer-normed) patch tokens kept — the class
  token and any register tokens dropped — as REPA's `x_norm_patchtokens`;
- `digits-mae`: a small conv encoder for the built-in digits, trained self-supervised (masked-patch
  reconstruction, no labels) on the digits train split, cached like the digits classifier. It is not the
  classifier that scores samples (`ditkit.metrics.digits_classifier`): another network, another loss, no labels.

`to_grid` resamples features whose patch grid differs from the DiT's (bilinear over the grid), so any encoder
resolution fits any model resolution.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ditkit.runtime.errors import UserError
from ditkit.runtime.io import cache_file

DIGITS_ENCODER = "digits-mae"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_grid(features: torch.Tensor, grid: int) -> torch.Tensor:
    """N×T×F features on a √T×√T patch grid, resampled to grid×grid tokens (as they are when it matches)."""
    n, t, f = features.shape
    side = math.isqrt(t)
    if side * side != t:
        raise UserError(f"encoder features have {t} tokens, not a square patch grid")
    if side == grid:
        return features
    x = features.transpose(1, 2).reshape(n, f, side, side)
    x = F.interpolate(x.float(), size=(grid, grid), mode="bilinear", align_corners=False, antialias=side > grid)
    return x.reshape(n, f, grid * grid).transpose(1, 2).to(features.dtype)


class TransformersPatchEncoder(nn.Module):
    """A transformers ViT (DINOv2 and alike) as a patch-feature encoder; frozen, eval mode."""

    def __init__(self, model: nn.Module, image_size: int = 224, mean: tuple = IMAGENET_MEAN,
                 std: tuple = IMAGENET_STD):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.image_size = image_size
        self.feature_dim = int(model.config.hidden_size)
        self.skip = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)  # class (+ register) tokens
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.compute_dtype: torch.dtype | None = None  # set by `fast_encoder`: the weights' and input's dtype

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1) / 2  # [-1, 1] → [0, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        if self.compute_dtype is not None:  # the patch convolution reads NHWC without a transpose of its own
            x = x.to(self.compute_dtype).contiguous(memory_format=torch.channels_last)
        return self.model(pixel_values=x).last_hidden_state[:, self.skip:]


def fast_encoder(encoder: nn.Module, dtype: torch.dtype = torch.bfloat16, compile: bool = False,
                 **compile_kwargs: Any) -> nn.Module:
    """A transformers encoder made cheaper for REPA's on-the-fly targets: weights and input in `dtype` (no
    per-call weight casts under autocast), a channels-last input, SDPA attention where the model offers it, and
    with `compile` the transformer compiled (`compile_kwargs` go to torch.compile). Outputs equal the float32
    encoder's to `dtype`'s round-off (tests/test_repa_stored.py). Other encoders are returned as they are."""
    if not isinstance(encoder, TransformersPatchEncoder):
        return encoder
    config = encoder.model.config
    if getattr(config, "_attn_implementation", "sdpa") == "eager":
        try:  # transformers' switch, where the model has an SDPA path; else it keeps its own attention
            encoder.model.set_attn_implementation("sdpa")
        except (AttributeError, ValueError):
            pass
    encoder.model.to(dtype=dtype)
    encoder.compute_dtype = dtype
    if compile:
        encoder.model = torch.compile(encoder.model, **compile_kwargs)
    return encoder


def load_transformers_encoder(name: str, image_size: int = 224) -> TransformersPatchEncoder:
    """A transformers vision model from a local folder or the Hugging Face cache (never the network)."""
    try:
        from transformers import AutoModel
    except ImportError:
        raise UserError("REPA with a transformers encoder needs transformers: pip install transformers") from None
    try:
        model = AutoModel.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise UserError(f"--repa-encoder {name!r}: no such model in a local folder or the Hugging Face cache "
                        f"({reason}); download it once (huggingface-cli download {name}) or give its folder") from None
    return TransformersPatchEncoder(model, image_size)


class DigitsPatchEncoder(nn.Module):
    """Conv encoder for 16×16 digits in [-1, 1]: an 8×8 grid of `feature_dim` features, and a decoder
    (training only) that reconstructs each 2×2 pixel patch from its token."""

    def __init__(self, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2), nn.GELU(),  # 8×8
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=2, dilation=2), nn.GELU(),
            nn.Conv2d(2 * width, feature_dim, 3, padding=1),
        )
        self.decoder = nn.Sequential(nn.Conv2d(feature_dim, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, 4, 1))

    def grid(self, images: torch.Tensor) -> torch.Tensor:
        """N×F×8×8 feature maps of N×1×S×S images (resized to 16×16)."""
        if images.shape[-1] != 16:
            images = F.interpolate(images.float(), size=(16, 16), mode="bilinear", align_corners=False)
        return self.body(images.float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.grid(images).flatten(2).transpose(1, 2)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """16×16 reconstruction: each token's four pixels (pixel shuffle of the decoder's 4 channels)."""
        return F.pixel_shuffle(self.decoder(self.grid(images)), 2)


def train_digits_encoder(steps: int = 1500, batch: int = 64, mask_rate: float = 0.5, seed: int = 0,
                         verbose: bool = False) -> DigitsPatchEncoder:
    """Masked-patch reconstruction on the digits train split (labels unused): half the 2×2 patches of each
    image are set to the background (−1), and the full image is reconstructed. Deterministic; the caller's
    random state is untouched."""
    from ditkit.data.digits import load_digits_split

    images, _ = load_digits_split(16, "train")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsPatchEncoder()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch,), generator=gen)]
        keep = (torch.rand(batch, 1, 8, 8, generator=gen) >= mask_rate).float()
        keep = F.interpolate(keep, scale_factor=2, mode="nearest")
        masked = x * keep - (1 - keep)
        loss = F.mse_loss(model.reconstruct(masked), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if verbose and (step + 1) % 500 == 0:
            print(f"digits encoder: step {step + 1}/{steps} reconstruction mse {loss.item():.4f}", file=sys.stderr)
    return model.eval().requires_grad_(False)


def digits_encoder_path(folder: Path | None = None) -> Path:
    """Where the digits encoder is cached: in `folder`, else ditkit's cache folder (`$DITKIT_CACHE` or
    ~/.cache/ditkit), or a temporary one when that cannot be written (a fresh machine's read-only home), as the
    digits classifier is."""
    name = "digits-mae-encoder-v1.safetensors"
    return folder / name if folder is not None else cache_file(name)


def load_digits_encoder(verbose: bool = False) -> DigitsPatchEncoder:
    """The digits encoder from the cache, else trained now and cached atomically (1,500 steps: 6.5 minutes of
    CPU time once on a busy 2-core machine, 2026-12-06)."""
    from ditkit.runtime.io import atomic_write, read_safetensors, save_safetensors

    path = digits_encoder_path()
    model = DigitsPatchEncoder()
    if path.exists():
        try:
            tensors, _ = read_safetensors(path)
            model.load_state_dict(tensors, strict=True)
            return model.eval().requires_grad_(False)
        except (UserError, RuntimeError):
            print(f"digits encoder: ignoring unreadable cache file {path}", file=sys.stderr)
    model = train_digits_encoder(verbose=verbose)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_safetensors(tensors, tmp, {"trained": "masked-patch reconstruction"}))
    return model


def load_encoder(name: str) -> nn.Module:
    """The frozen encoder `name`: `digits-mae`, or a transformers model folder / Hugging Face id (offline)."""
    if name == DIGITS_ENCODER:
        return load_digits_encoder()
    return load_transformers_encoder(name)
