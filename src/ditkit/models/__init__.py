"""DiT models: configs, components and the networks (class-conditional DiT, text-conditional PixArt-α)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ditkit.models.config import CONDITIONINGS, MODEL_NAMES, DiTConfig
from ditkit.models.dit import DiT
from ditkit.models.pixart import PixArtDiT


def build_model(config: DiTConfig) -> nn.Module:
    """The network `config` describes: a `PixArtDiT` for conditioning "text", a `DiT` otherwise."""
    return PixArtDiT(config) if config.is_text else DiT(config)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a paper model by its exact name, e.g. `create_model("DiT-XL/2", input_size=32, num_classes=1000)`.

    Overrides: input_size, in_channels, num_classes, learn_sigma, class_dropout_prob, mlp_ratio,
    conditioning ("adaln-zero" | "adaln" | "cross-attention" | "in-context" | "text"); for "text" also
    caption_channels, max_tokens and interpolation_scale (PixArt-α: `create_model("DiT-XL/2",
    conditioning="text", input_size=64)` is PixArt-XL-2-512x512).
    """
    return build_model(DiTConfig.from_name(name, **overrides))


__all__ = ["CONDITIONINGS", "MODEL_NAMES", "DiT", "DiTConfig", "PixArtDiT", "build_model", "create_model"]
