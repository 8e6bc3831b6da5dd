"""Sampling text models from prompts: a grid labelled with the prompts, or an `.npz` for evaluation.

    ditkit sample --ckpt pixart.safetensors --vae VAE --text-encoder T5 --prompt "a red cube" --prompt "a cat"
    ditkit sample --ckpt ... --prompt-file prompts.txt --num-samples 1000 --out eval     # prompts cycled

The prompts are encoded once by the frozen text encoder (ditkit.encoders.text); guidance uses the model's null caption,
or the features of `--negative-prompt`. Every sampler of ditkit.diffusion.samplers works, as for class models.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditkit.runtime.errors import UserError
from ditkit.runtime.io import atomic_write
from ditkit.sample.pipeline import SamplingPipeline


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of `--prompt` (repeatable) or `--prompt-file` (one a line; blank lines skipped)."""
    if args.prompt and args.prompt_file:
        raise UserError("give prompts with --prompt or with --prompt-file, not both")
    if args.prompt_file:
        try:
            lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read --prompt-file {args.prompt_file}: {err}") from None
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise UserError(f"--prompt-file {args.prompt_file} holds no prompt (one a line)")
        return prompts
    prompts = [p.strip() for p in (args.prompt or [])]
    if not prompts or not all(prompts):
        raise UserError("this is a text model: give --prompt \"...\" (repeatable) or --prompt-file FILE")
    return prompts


def check_encoder(encoder: Any, config: Any) -> None:
    """The encoder must give what the model reads: caption_channels features, at most max_tokens tokens."""
    if encoder.channels != config.caption_channels:
        raise UserError(f"the text encoder {encoder.name} gives {encoder.channels} features per token but the "
                        f"model reads {config.caption_channels}; pass the --text-encoder it was trained with")
    if encoder.max_tokens > config.max_tokens:
        raise UserError(f"the text encoder pads to {encoder.max_tokens} tokens; the model reads at most "
                        f"{config.max_tokens}")


def with_negative(sampler: SamplingPipeline, encoder: Any, negative_prompt: str | None) -> SamplingPipeline:
    """`sampler` guided away from `negative_prompt`'s features (None: the model's null caption)."""
    if negative_prompt is not None:
        feats, mask = encoder.encode([negative_prompt])
        sampler.negative = (feats.to(sampler.device), mask.to(sampler.device))
    return sampler


def make_prompt_grid(images: np.ndarray, prompts: list[str], per_prompt: int) -> Any:
    """A PIL image: one row per prompt, the prompt (wrapped) written left of its samples."""
    from PIL import Image, ImageDraw

    n, h, w, c = images.shape
    cell = max(1, -(-64 // max(h, w)))  # tiny images are enlarged to about 64 px
    ch, cw = h * cell, w * cell
    pad, margin = 2, 220
    rows = [textwrap.wrap(p, 34)[: max(1, ch // 12)] for p in prompts]
    grid = Image.new("RGB", (margin + per_prompt * (cw + pad) + pad, len(prompts) * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, lines in enumerate(rows):
        top = pad + r * (ch + pad)
        draw.multiline_text((4, top + max(0, ch - 12 * len(lines)) // 2), "\n".join(lines), fill="black")
        for col in range(per_prompt):
            img = images[r * per_prompt + col]
            tile = Image.fromarray(img[..., 0] if c == 1 else img, "L" if c == 1 else "RGB").convert("RGB")
            grid.paste(tile.resize((cw, ch), Image.NEAREST), (margin + pad + col * (cw + pad), top))
    return grid


def prompt_images(sampler: SamplingPipeline, encoder: Any, prompts: list[str], generator: torch.Generator,
                  batch_size: int = 32) -> np.ndarray:
    """uint8 samples N×H×W×C, one per prompt, in batches of `batch_size`."""
    out = []
    for i in range(0, len(prompts), batch_size):
        feats, mask = encoder.encode(prompts[i : i + batch_size])
        out.append(sampler.images(feats, generator, mask).numpy())
    return np.concatenate(out)


def prompt_grid(sampler: SamplingPipeline, encoder: Any, prompts: list[str], per_prompt: int, seed: int, out: Path,
                save_images: bool) -> Path:
    """Sample `per_prompt` images for each prompt and write OUT/grid.png (and OUT/images/*.png, prompts.txt)."""
    from PIL import Image

    generator = torch.Generator(device=sampler.device).manual_seed(seed)
    repeated = [p for p in prompts for _ in range(per_prompt)]
    images = prompt_images(sampler, encoder, repeated, generator)
    grid_path = out / "grid.png"
    grid = make_prompt_grid(images, prompts, per_prompt)
    atomic_write(grid_path, lambda tmp: grid.save(tmp, format="PNG"))
    if save_images:
        for i, img in enumerate(images):
            tile = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
            atomic_write(out / "images" / f"{i:04d}_prompt{i // per_prompt}.png",
                         lambda tmp, tile=tile: tile.save(tmp, format="PNG"))
        atomic_write(out / "images" / "prompts.txt", lambda tmp: Path(tmp).write_text("\n".join(prompts) + "\n"))
    return grid_path


def prompt_npz(sampler: SamplingPipeline, encoder: Any, prompts: list[str], num_samples: int, batch_size: int,
               seed: int, out: Path) -> Path:
    """`num_samples` samples, prompt i mod len(prompts) for sample i, into OUT/samples_N.npz (ADM's `arr_0`,
    plus `prompt_index`) with the prompts in OUT/samples_N.prompts.json. One process (no sharding)."""
    chosen = [prompts[i % len(prompts)] for i in range(num_samples)]
    images = prompt_images(sampler, encoder, chosen, torch.Generator(device=sampler.device).manual_seed(seed),
                           batch_size)
    path = out / f"samples_{num_samples}.npz"
    index = np.arange(num_samples) % len(prompts)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=images, prompt_index=index)

    atomic_write(path, write)
    atomic_write(path.with_suffix(".prompts.json"), lambda tmp: Path(tmp).write_text(json.dumps(prompts, indent=1)))
    # The protocol beside the samples, as `--num-samples` writes it for class models (`ditkit evaluate` prints it).
    from ditkit.sample.protocol import protocol

    labels = f"prompt i mod {len(prompts)} for sample i ({path.with_suffix('.prompts.json').name})"
    record = {**sampler.settings(), "seed": seed, "batch_size": batch_size,
              "protocol": protocol(sampler, num_samples, seed, labels=labels)}
    atomic_write(out / "settings.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1, default=str)))
    return path


def load_encoder_for(sampler: SamplingPipeline, args: argparse.Namespace) -> Any:
    """The frozen text encoder named by --text-encoder (default: T5-XXL for 4096-feature models, as PixArt-α)."""
    from ditkit.encoders.text import DEFAULT_T5, load_text_encoder

    config = sampler.model.config
    name = args.text_encoder
    if name is None:
        if config.caption_channels != 4096:
            raise UserError(f"this text model reads {config.caption_channels}-feature captions; pass "
                            "--text-encoder with the encoder it was trained with")
        name = DEFAULT_T5
    encoder = load_text_encoder(name, max_tokens=min(config.max_tokens, args.max_tokens or config.max_tokens),
                                device=sampler.device)
    check_encoder(encoder, config)
    return encoder


def run_prompts(args: argparse.Namespace, sampler: SamplingPipeline, out: Path) -> Path:
    """`ditkit sample` for a text model: the prompt grid, or with --num-samples the evaluation .npz."""
    prompts = read_prompts(args)
    encoder = load_encoder_for(sampler, args)
    with_negative(sampler, encoder, args.negative_prompt)
    if args.num_samples is None:
        return prompt_grid(sampler, encoder, prompts, args.per_label, args.seed, out, args.save_images)
    return prompt_npz(sampler, encoder, prompts, args.num_samples, args.batch_size, args.seed, out)
