"""The decoding half of diffusers' `AutoencoderKL` (the SD-VAE), loaded straight from its folder, for sampling.

`ditkit sample` only decodes, and importing diffusers (which imports transformers and torch._dynamo) took
seconds of its start-up. This module is the same network in plain PyTorch, the same operations in the same
order, with diffusers' parameter names, so the folder's `diffusion_pytorch_model.safetensors` loads as it is.
Folders it does not cover (another decoder type, another activation, no safetensors file) go through diffusers
(`ditkit.encoders.autoencoder.load_vae` decides); `tests/test_vae_decoder.py` checks it against diffusers.

    post_quant_conv (1×1) → conv_in → mid block (resnet, single-head attention, resnet) →
    up blocks (layers_per_block + 1 resnets, then nearest ×2 + conv, except the last) → GroupNorm → SiLU → conv_out
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-6  # the VAE's GroupNorm epsilon throughout the decoder
WEIGHTS = "diffusion_pytorch_model.safetensors"


class Resnet(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class MidAttention(nn.Module):
    """Single-head self-attention over the H·W positions, with a GroupNorm before and the residual after."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        t = self.group_norm(x).view(n, c, h * w).transpose(1, 2)
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = self.to_out[0](F.scaled_dot_product_attention(q, k, v).squeeze(1))
        # The reshape is a channels-last view; left so, the sum and every layer after it run channels-last, which
        # on an H200 took 784 ms a decode of 256 against 657 contiguous (diffusers returns to contiguous at its
        # upsamplers for batches of 64 or more). One copy of this small 32×32 map keeps the decoder contiguous.
        return out.transpose(1, 2).reshape(n, c, h, w).contiguous() + x


class Upsampler(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([Resnet(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsampler(cout)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([Resnet(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([MidAttention(channels, groups)]) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Decoder(nn.Module):
    def __init__(self, config: dict[str, Any]):
        super().__init__()
        channels = list(config["block_out_channels"])
        groups, layers = int(config["norm_num_groups"]), int(config["layers_per_block"]) + 1
        self.conv_in = nn.Conv2d(int(config["latent_channels"]), channels[-1], 3, padding=1)
        self.mid_block = MidBlock(channels[-1], groups, bool(config.get("mid_block_add_attention", True)))
        ups, prev = [], channels[-1]
        for i, cout in enumerate(reversed(channels)):
            ups.append(UpBlock(prev, cout, layers, groups, upsample=i < len(channels) - 1))
            prev = cout
        self.up_blocks = nn.ModuleList(ups)
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=EPS)
        self.conv_out = nn.Conv2d(channels[0], int(config["out_channels"]), 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DecoderKL(nn.Module):
    """`AutoencoderKL` without its encoder: `decode(z).sample` as diffusers returns it; `config` is its config."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = config
        self.decoder = Decoder(config)
        use_post = config.get("use_post_quant_conv", True)
        c = int(config["latent_channels"])
        self.post_quant_conv = nn.Conv2d(c, c, 1) if use_post else None

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return SimpleNamespace(sample=self.decoder(z))


def supported(config: dict[str, Any]) -> bool:
    """Whether `config` is an AutoencoderKL whose decoder this module reproduces."""
    return (
        config.get("_class_name") == "AutoencoderKL"
        and all(t == "UpDecoderBlock2D" for t in config.get("up_block_types", ()))
        and len(config.get("up_block_types", ())) == len(config.get("block_out_channels", ()))
        and config.get("act_fn", "silu") == "silu"
        and all(k in config for k in ("block_out_channels", "latent_channels", "out_channels", "norm_num_groups",
                                      "layers_per_block"))
    )


# Files saved by diffusers before 0.14 (the released sd-vae-ft-ema/-mse among them) name the mid block's attention
# projections query/key/value/proj_attn; diffusers renames them on load, and so does this module.
_RENAMED = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def _current_name(key: str) -> str:
    if ".attentions." in key:
        for old, new in _RENAMED.items():
            key = key.replace(old, new)
    return key


def load_decoder(folder: Path, dtype: torch.dtype = torch.float32) -> DecoderKL | None:
    """The decoder of the AutoencoderKL saved in `folder` (config.json + safetensors weights), or None when this
    module does not cover it (the caller then loads the whole VAE through diffusers)."""
    from safetensors import safe_open

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    weights = folder / WEIGHTS
    if not isinstance(config, dict) or not supported(config) or not weights.is_file():
        return None
    with torch.device("meta"):
        model = DecoderKL(config)
    wanted = model.state_dict()
    state = {}
    with safe_open(str(weights), framework="pt") as f:
        for stored in f.keys():
            key = _current_name(stored)
            if key in wanted:  # the encoder's tensors are never read
                value = f.get_tensor(stored)
                state[key] = value.reshape(wanted[key].shape) if value.numel() == wanted[key].numel() else value
    if set(state) != set(wanted) or any(state[k].shape != wanted[k].shape for k in wanted):
        return None  # an unexpected layout: diffusers knows it better
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return model.eval().requires_grad_(False)
