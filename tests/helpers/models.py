"""Tiny DiTs for the tests: one builder, `tiny_dit`, and the presets the tests share (each a call to it).

The defaults are the tiny run of the training tests: DiT-S/2's patch 2 with 2 blocks, 64 wide, 4 heads, 8×8
inputs, 1 channel (grey digits), 10 classes. Where tests differ (channels, heads, seed, which weights are made
random), the difference is an argument, so every test builds exactly the model it built before.
"""

from __future__ import annotations

import torch

from ditkit.models import DiT, DiTConfig, PixArtDiT, build_model

# The model overrides of every tiny training run (TrainOptions.model_overrides, --model DiT-S/2).
TINY = {"depth": 2, "hidden_size": 64, "num_heads": 4}
TINY_DIT = dict(**TINY, patch_size=2, input_size=8, in_channels=1, num_classes=10)
# The tiny PixArt-α-style text model: 4 latent channels, 24 caption features, 6 tokens (num_classes unused).
TINY_TEXT_DIT = dict(**TINY, patch_size=2, input_size=8, in_channels=4, conditioning="text", caption_channels=24,
                     max_tokens=6)


def _random_outputs(model: DiT, std: float) -> None:
    # The official init zeroes the adaLN and output layers; random ones make samples depend on weights and labels.
    for p in model.parameters():
        if p.requires_grad and p.abs().sum() == 0:
            p.normal_(0.0, std)


def _random_all(model: DiT, std: float) -> None:
    # Every trained weight random (pos_embed is the fixed sin-cos table, the only frozen parameter).
    for name, p in model.named_parameters():
        if name != "pos_embed":
            p.normal_(0.0, std)


def _random_fan_in(model: DiT, std: float) -> None:
    # N(0, 1/fan_in): activations stay O(1) through the blocks (a 1-D weight counts the hidden size as fan-in).
    for name, p in model.named_parameters():
        if name != "pos_embed":
            fan_in = p.shape[-1] if p.ndim > 1 else model.config.hidden_size
            p.normal_(0.0, 1.0 / fan_in**0.5)


INITS = {"outputs": _random_outputs, "all": _random_all, "fan-in": _random_fan_in}


def tiny_dit(seed: int | None = None, *, init: str | None = None, std: float = 0.05, eval: bool = False,
             **config) -> DiT:
    """A tiny DiT: `config` overrides TINY_DIT (any DiTConfig field).

    `seed` seeds torch's global generator first (None: the caller's state). `init`: None keeps the official
    init; "outputs" draws the zero-initialised layers from N(0, std²); "all" draws every trained weight from
    N(0, std²); "fan-in" draws them from N(0, 1/fan_in). `eval` returns the model in eval mode.
    """
    if seed is not None:
        torch.manual_seed(seed)
    model = DiT(DiTConfig(**{**TINY_DIT, **config}))
    if init is not None:
        with torch.no_grad():
            INITS[init](model, std)
    return model.eval() if eval else model


def sampling_dit(in_channels: int = 1, input_size: int = 8, dropout: float = 0.1, seed: int = 0) -> DiT:
    """The `ditkit sample` tests' model: 2 heads, random output layers (so samples depend on the labels)."""
    return tiny_dit(seed, init="outputs", in_channels=in_channels, input_size=input_size, num_heads=2,
                    class_dropout_prob=dropout)


def output_random_dit(seed: int = 0, **config) -> DiT:
    """The default tiny DiT with random output layers, so that samples depend on the weights."""
    return tiny_dit(seed, init="outputs", **config)


def random_dit(seed: int = 0, std: float = 0.05, **config) -> DiT:
    """A tiny DiT in eval mode with every trained weight random (the official init hides mistakes in layers it
    zeroes)."""
    return tiny_dit(seed, init="all", std=std, eval=True, **config)


def tiny_text_dit(**config) -> PixArtDiT:
    """A tiny text-conditioned DiT (PixArt-α blocks); `config` overrides TINY_TEXT_DIT. Official init: pass it to
    `randomise` for random weights."""
    return build_model(DiTConfig(**{**TINY_TEXT_DIT, **config}))


def randomise(module: torch.nn.Module, seed: int = 0, *, std: float) -> torch.nn.Module:
    """Every trained weight of `module` drawn from N(0, std²) by its own generator (torch's global one is left
    alone), in eval mode. Works for diffusers modules too; ditkit's fixed sin-cos pos_embed is kept."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module.eval()


# MeanFlow's tests: a two-time-input DiT small enough for float64 forward-mode checks.
MEANFLOW_TINY = dict(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=1, num_classes=3,
                     learn_sigma=False, interval_time=True)


def float64_meanflow_dit(seed: int = 0, **overrides) -> DiT:
    """A tiny float64 MeanFlow DiT (MEANFLOW_TINY + `overrides`) in eval mode with every trained weight random, the
    zero-initialised adaLN and output layers included, so that the derivatives checked are not trivially zero."""
    torch.manual_seed(seed)
    model = build_model(DiTConfig(**{**MEANFLOW_TINY, **overrides})).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.15 if p.ndim > 1 else 0.05)
    return model.eval()
