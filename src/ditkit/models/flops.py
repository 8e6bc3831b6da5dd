"""`ditkit flops`: parameters and Gflops of DiT configs, counted by the paper's convention.

One multiply-add counts as one flop, forward pass, one image. Counted: every matrix product (patch embedding,
timestep MLP, adaLN regressions, attention projections, the two attention products QKᵀ and AV, MLP, output
decoder). Not counted: norms, activations, softmax, additions (a few tenths of a percent). This reproduces the
paper's Table 4 to within 1% for all 12 models.

Text models (PixArt-α) are counted at their full caption length (`max_tokens`, 120 for T5): the caption MLP,
the shared adaLN-single regression, and per block the cross-attention's q/k/v/output projections and its two
products (image tokens × caption tokens).
"""

from __future__ import annotations

import argparse
import json

import torch

from ditkit.models import build_model
from ditkit.models.config import CONDITIONINGS, MODEL_NAMES, DiTConfig

FREQ_DIM = 256  # timestep frequency embedding size


def count_macs(config: DiTConfig) -> int:
    """Multiply-adds of one forward pass for one image."""
    d, p, depth = config.hidden_size, config.patch_size, config.depth
    tokens = config.num_patches
    mlp_hidden = int(d * config.mlp_ratio)
    macs = tokens * config.in_channels * p * p * d  # patch embedding
    macs += FREQ_DIM * d + d * d  # timestep MLP
    kind = config.conditioning
    seq = tokens + 2 if kind == "in-context" else tokens
    per_block = seq * 4 * d * d + 2 * seq * seq * d + 2 * seq * d * mlp_hidden  # qkv+proj, QKᵀ and AV, MLP
    if kind == "adaln-zero":
        per_block += 6 * d * d
    elif kind == "adaln":
        per_block += 4 * d * d
    elif kind == "cross-attention":
        # q and output projections over the image tokens, k/v over the 2 conditioning tokens, 2 products.
        per_block += 2 * tokens * d * d + 2 * 2 * d * d + 2 * tokens * 2 * d
    elif kind == "text":
        words = config.max_tokens
        # The same cross-attention with the caption's tokens as keys and values.
        per_block += 2 * tokens * d * d + 2 * words * d * d + 2 * tokens * words * d
        macs += 6 * d * d  # adaLN-single: one shared regression for all blocks
        macs += words * (config.caption_channels * d + d * d)  # the caption MLP
    macs += depth * per_block
    if kind.startswith("adaln"):
        macs += 2 * d * d  # final adaLN
    macs += tokens * d * p * p * config.out_channels  # decoder
    return macs


MAX_IMAGE_SIZE = 65536  # pixels; far beyond any published DiT, and the counts stay plain integers


def count_params(config: DiTConfig) -> int:
    """Number of parameters (including the fixed `pos_embed`, as the official code reports), built on `meta`.

    The model is built with a one-token grid and the positional table counted by formula: it is the only tensor
    whose size depends on the image size, and its sin-cos values are computed eagerly even on `meta`.
    """
    one_token = DiTConfig.from_dict({**config.to_dict(), "input_size": config.patch_size})
    with torch.device("meta"):
        model = build_model(one_token)
    return sum(p.numel() for p in model.parameters()) + (config.num_patches - 1) * config.hidden_size


def table(
    image_size: int = 256, conditioning: str = "adaln-zero", latent: bool = True, names: list[str] | None = None
) -> list[dict]:
    """Rows {model, params, gflops} for paper configs at `image_size` (latent: side/8, 4 channels)."""
    side = image_size // 8 if latent else image_size
    rows = []
    for name in names or MODEL_NAMES:
        config = DiTConfig.from_name(
            name, input_size=side, in_channels=4 if latent else 3, conditioning=conditioning
        )
        rows.append(
            {"model": name, "params": count_params(config), "gflops": round(count_macs(config) / 1e9, 4)}
        )
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--model", choices=MODEL_NAMES, help="one model instead of all 12")
    parser.add_argument(
        "--conditioning", choices=CONDITIONINGS, default="adaln-zero",
        help="the block; text = PixArt-α's, counted with T5-XXL captions (4096 features, 120 tokens)",
    )
    parser.add_argument("--pixel-space", action="store_true", help="the model sees pixels, not SD-VAE latents")
    parser.add_argument("--json", action="store_true", help="print a JSON list of {model, params, gflops}")


def run(args: argparse.Namespace) -> int:
    from ditkit.runtime.errors import UserError

    divisor = 1 if args.pixel_space else 8
    if args.image_size < 1 or args.image_size % divisor:
        raise UserError(f"--image-size must be a positive multiple of {divisor}, got {args.image_size}")
    if args.image_size > MAX_IMAGE_SIZE:
        raise UserError(f"--image-size must be at most {MAX_IMAGE_SIZE}, got {args.image_size}")
    names = [args.model] if args.model else list(MODEL_NAMES)
    rows = table(args.image_size, args.conditioning, latent=not args.pixel_space, names=names)
    if args.json:
        print(json.dumps(rows))
        return 0
    size = f"{args.image_size}x{args.image_size}"
    print(f"{'model':<10} {'params (M)':>11} {'Gflops':>9}   ({size}, {args.conditioning})")
    for row in rows:
        print(f"{row['model']:<10} {row['params'] / 1e6:>11.1f} {row['gflops']:>9.2f}")
    return 0
