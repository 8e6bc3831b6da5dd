"""`ditkit sample --vae`: a latent model decoded by a (tiny, random) SD-VAE-shaped AutoencoderKL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import ditkit
from helpers.cli import run_cli
from helpers.models import sampling_dit as tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_latent_model_through_a_vae(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=32,
    )  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    ckpt = tmp_path / "latent.safetensors"
    ditkit.save_model(tiny_model(in_channels=4, input_size=4), ckpt)
    code = run_cli(
        "--ckpt", str(ckpt), "--vae", str(tmp_path / "vae"), "--image-size", "32", "--class-labels", "2", "3",
        "--per-label", "2", "--sampler", "ddim", "--num-steps", "3", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 0
    grid = np.asarray(Image.open(tmp_path / "out" / "grid.png"))
    assert grid.shape == (2 * (64 + 2) + 2, 72 + 2 * (64 + 2) + 2, 3)
