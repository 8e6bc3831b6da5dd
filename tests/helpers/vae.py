"""Tiny random AutoencoderKLs (diffusers), built in memory or saved as a folder; nothing downloaded.

One builder with the differences of its users as parameters: the number of levels follows
`block_out_channels`, and `perturb` says which weights are made random beyond diffusers' init.
"""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_vae(seed: int = 0, perturb: str | None = "logvar", **config) -> torch.nn.Module:
    """A randomly initialised AutoencoderKL, 4 latent channels, downsampling 2^(levels-1)×, in eval mode.

    Defaults: 4 levels of 8 channels (8× downsampling), 4 norm groups, sample size 32; `config` overrides any
    AutoencoderKL argument. `perturb`: "logvar" spreads the encoder's log-variance (random init leaves it near
    constant, so std would not differ per position), "all" adds N(0, 0.05²) to every weight (the
    zero-initialised layers random too), None keeps diffusers' init.
    """
    from diffusers import AutoencoderKL

    levels = len(config.get("block_out_channels", (8, 8, 8, 8)))
    settings = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(8,) * levels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    torch.manual_seed(seed)
    model = AutoencoderKL(**{**settings, **config})
    with torch.no_grad():
        if perturb == "logvar":
            model.quant_conv.bias[4:] += torch.linspace(-2.0, 0.0, 4)
        elif perturb == "all":
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        elif perturb is not None:
            raise ValueError(f"perturb must be 'logvar', 'all' or None, got {perturb!r}")
    return model.eval()


def make_tiny_vae(folder: Path, seed: int = 0, perturb: str | None = "logvar", **config) -> Path:
    """`tiny_vae(seed, perturb, **config)` saved with save_pretrained into `folder` (returned)."""
    tiny_vae(seed, perturb, **config).save_pretrained(str(folder))
    return folder
