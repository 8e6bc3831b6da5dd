"""The VAE wrapper: offline loading of a saved tiny AutoencoderKL, scaling, encode/decode, clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from ditkit.encoders.autoencoder import SD_SCALE, SD_VAE_CONFIG, load_vae
from ditkit.runtime.errors import UserError
from helpers.vae import make_tiny_vae


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


def _posterior_by_hand(model, images):
    """Independent of the wrapper: the encoder's moments → mean, std = exp(logvar / 2) (logvar clamped)."""
    h = model.quant_conv(model.encoder(images.double()))
    mean, logvar = h.chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


def test_load_encode_decode(vae_dir):
    vae = load_vae(str(vae_dir))
    assert vae.scale == SD_SCALE and vae.shift == 0.0 and vae.downsample == 8 and vae.latent_channels == 4
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, std = vae.encode(images)
    assert mean.shape == std.shape == (2, 4, 4, 4) and mean.dtype == torch.float32
    ref_mean, ref_std = _posterior_by_hand(vae.model.double(), images)
    vae.model.float()
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(std.double(), ref_std, rtol=1e-4, atol=1e-6)
    assert std.std() > 0  # the fixture spreads log-variance, so std is not a constant

    # Mean-only latents are the scaled mean; samples have mean ≈ scaled mean and spread ≈ scale·std.
    torch.testing.assert_close(vae.sample_latents(images, sample=False), mean * SD_SCALE)
    g = torch.Generator().manual_seed(0)
    draws = vae.sample_latents(images[:1].expand(200, -1, -1, -1), generator=g)  # one batch of 200 copies
    tol = 4 * SD_SCALE * std[0].max().item() / math.sqrt(200)
    torch.testing.assert_close(draws.mean(0), mean[0] * SD_SCALE, atol=tol, rtol=0)
    ratio = draws.std(0) / (SD_SCALE * std[0])
    assert 0.8 < ratio.mean() < 1.2

    # decode(z) is the model's decoder applied to z / scale, clamped to [-1, 1].
    z = torch.randn(2, 4, 4, 4)
    out = vae.decode(z)
    ref = vae.model.decode(z / SD_SCALE).sample.clamp(-1, 1)
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, ref)


def test_scaling_factor_from_config(tmp_path):
    folder = make_tiny_vae(tmp_path / "v", scaling_factor=0.5, shift_factor=0.25)
    vae = load_vae(str(folder))
    assert vae.scale == 0.5 and vae.shift == 0.25
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    mean, _ = vae.encode(images)
    torch.testing.assert_close(vae.sample_latents(images, sample=False), (mean - 0.25) * 0.5)
    z = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(vae.decode(z), vae.model.decode(z / 0.5 + 0.25).sample.clamp(-1, 1))


def test_pipeline_folder_with_vae_subfolder(tmp_path, vae_dir):
    import shutil

    shutil.copytree(vae_dir, tmp_path / "pipe" / "vae")
    vae = load_vae(str(tmp_path / "pipe"), dtype=torch.float32)
    assert vae.latent_channels == 4


def test_missing_vae_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        load_vae("nobody/no-such-vae-xyz")
    msg = str(err.value)
    assert "\n" not in msg and "Hugging Face cache" in msg and "huggingface-cli download" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no loadable AutoencoderKL"):
        load_vae(str(tmp_path / "empty"))


def test_sd_config_builds_on_meta():
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL(**SD_VAE_CONFIG)
    # 83.65M parameters is the published size of the SD VAE (sd-vae-ft-ema).
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 83.65) < 0.01
