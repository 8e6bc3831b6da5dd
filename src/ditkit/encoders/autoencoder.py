"""The SD-VAE (`diffusers.AutoencoderKL`) that maps images to the latents DiT models, and back.

The DiT authors use `stabilityai/sd-vae-ft-ema` (and `sd-vae-ft-mse`): 256×256×3 images in [-1, 1] become
32×32×4 latents, multiplied by the scaling factor 0.18215 so that they have roughly unit variance. Loading is
offline: a local folder, or a Hugging Face id already in the local cache.

    vae = load_vae("stabilityai/sd-vae-ft-ema", device="cuda")
    mean, std = vae.encode(images)          # posterior N(mean, std²), UNSCALED latent units
    z = vae.sample_latents(images)          # scaled: (mean + std·ε − shift) · scale, what the model sees
    images = vae.decode(z)                  # scaled latents → images in [-1, 1]
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ditkit.recipe import SD_VAE, SD_VAE_SCALE
from ditkit.runtime.errors import UserError

DEFAULT_VAE = SD_VAE  # the names this module has always exported; the values live in the recipe
SD_SCALE = SD_VAE_SCALE  # used when the VAE's config does not state a scaling factor

# The Stable Diffusion VAE architecture (what sd-vae-ft-ema/-mse hold), for benchmarks with random weights.
SD_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=SD_SCALE,
)


def _import_autoencoder_kl() -> Any:
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError("the VAE needs diffusers: pip install 'ditkit[vae]' (or pip install diffusers)") from None
    return AutoencoderKL


def hub_cache_dir() -> str:
    """Where `from_pretrained` looks for an id offline (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/...)."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
        return os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub"))


def _resolve(path_or_id: str) -> tuple[str, str | None]:
    """(name for from_pretrained, subfolder): a pipeline folder with its VAE in `vae/` works too."""
    path = Path(path_or_id).expanduser()
    if path.is_dir() and not (path / "config.json").exists() and (path / "vae" / "config.json").exists():
        return str(path), "vae"
    return (str(path) if path.exists() else path_or_id), None


def vae_attributes(config: Any) -> dict[str, Any]:
    """What the DiT side reads off a VAE's config (a diffusers config or its config.json as a dict)."""
    return {
        "scale": float(config.get("scaling_factor") or SD_SCALE),
        "shift": float(config.get("shift_factor") or 0.0),  # 0 for SD VAEs; set by SD3/Flux VAEs
        "latent_channels": int(config.get("latent_channels", 4)),
        "downsample": 2 ** (len(config.get("block_out_channels", (0,) * 4)) - 1),
    }


class VAE:
    """An `AutoencoderKL` with the latent scaling applied where DiT code expects it.

    `encode` returns the posterior in the VAE's own (unscaled) units, as the latent store keeps it;
    `sample_latents` and `decode` work in scaled units, as the diffusion model sees them.
    """

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.name = name
        for key, value in vae_attributes(model.config).items():
            setattr(self, key, value)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> VAE:
        if hasattr(self.model, "encode"):
            with _quiet_diffusers():  # diffusers' .to() warns about fp32-kept modules even when there are none
                self.model.to(device=device, dtype=dtype)
        else:
            self.model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images N×3×H×W in [-1, 1] → posterior (mean, std), each float32 N×C×H/f×W/f, unscaled."""
        if not hasattr(self.model, "encode"):
            raise UserError(f"the VAE {self.name} was loaded for decoding only; load it with load_vae(...) to encode")
        dist = self.model.encode(images.to(self.device, self.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE units → model units."""
        return (latents - self.shift) * self.scale

    @torch.no_grad()
    def sample_latents(
        self, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images in [-1, 1] → scaled latents: a posterior sample (as the authors train) or its mean."""
        mean, std = self.encode(images)
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + std * noise
        return self.scale_latents(mean)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents N×C×h×w → float32 images N×3×(h·f)×(w·f), clamped to [-1, 1]."""
        z = latents.to(self.device, self.dtype) / self.scale + self.shift
        return self.model.decode(z).sample.float().clamp_(-1.0, 1.0)

    def __repr__(self) -> str:
        return f"VAE({self.name!r}, scale={self.scale}, channels={self.latent_channels}, /{self.downsample})"


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Hide loading chatter (the `accelerate` hint, deprecation warnings) so that real errors stand out."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    # Critical only: a failed load also logs "An error occurred while trying to fetch ..."; the UserError
    # raised for it says the same in one line.
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        diffusers_logging.set_verbosity(level)


def _local_folder(path_or_id: str) -> Path | None:
    """The folder holding the VAE's config.json: the given folder (or its `vae/`), or the id's snapshot in the
    Hugging Face cache; None when neither is at hand."""
    name, subfolder = _resolve(path_or_id)
    if Path(name).exists():
        return Path(name) / (subfolder or "")
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - only a shortcut: diffusers' loader explains any failure
        return None
    return Path(found).parent if isinstance(found, str) else None


def load_vae(
    path_or_id: str = DEFAULT_VAE, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    decode_only: bool = False,
) -> VAE:
    """Load an `AutoencoderKL` offline from a folder or the Hugging Face cache; a one-line UserError if absent.

    decode_only=True (sampling) loads only the decoder through `ditkit.encoders.vae_decoder`, without importing
    diffusers, when the folder's layout is one it reproduces; otherwise, and for encoding, diffusers loads the
    whole VAE."""
    if decode_only:
        from ditkit.encoders.vae_decoder import load_decoder

        folder = _local_folder(path_or_id)
        decoder = load_decoder(folder, dtype) if folder is not None else None
        if decoder is not None:
            return VAE(decoder, str(path_or_id)).to(device)
    AutoencoderKL = _import_autoencoder_kl()
    name, subfolder = _resolve(path_or_id)
    try:
        with _quiet_diffusers():
            model = AutoencoderKL.from_pretrained(name, subfolder=subfolder, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        if Path(name).exists():
            where = f"the folder {name} holds no loadable AutoencoderKL (config.json + weights)"
        else:
            where = f"{path_or_id!r} is not a local folder and is not in the Hugging Face cache {hub_cache_dir()}"
        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot load the VAE: {where} ({first}); on a machine with internet run "
            f"`huggingface-cli download {path_or_id if not Path(name).exists() else DEFAULT_VAE}`, copy its "
            "~/.cache/huggingface here (or set HF_HOME to where you put it), or pass --vae FOLDER"
        ) from None
    return VAE(model, str(path_or_id)).to(device)
