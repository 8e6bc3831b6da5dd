"""Text models (PixArt-α) to and from diffusers' `PixArtTransformer2DModel`: configs and tensor names.

`ditkit convert` (convert.py) does the reading, writing and checking; this module holds what is particular
to PixArt-α. The two layouts hold the same weights with different names:

    ditkit / PixArt-α                      diffusers
    x_embedder.proj                        pos_embed.proj
    t_embedder.mlp.0 / .2                  adaln_single.emb.timestep_embedder.linear_1 / linear_2
    t_block.1                              adaln_single.linear
    y_embedder.y_proj.fc1 / fc2            caption_projection.linear_1 / linear_2
    y_embedder.y_embedding                 (none: kept beside the folder in ditkit_null_caption.safetensors)
    blocks.i.scale_shift_table             transformer_blocks.i.scale_shift_table
    blocks.i.attn.qkv (fused)              transformer_blocks.i.attn1.to_q / to_k / to_v
    blocks.i.attn.proj                     transformer_blocks.i.attn1.to_out.0
    blocks.i.cross_attn.q_linear           transformer_blocks.i.attn2.to_q
    blocks.i.cross_attn.kv_linear (fused)  transformer_blocks.i.attn2.to_k / to_v
    blocks.i.cross_attn.proj               transformer_blocks.i.attn2.to_out.0
    blocks.i.mlp.fc1 / fc2                 transformer_blocks.i.ff.net.0.proj / ff.net.2
    final_layer.scale_shift_table          scale_shift_table
    final_layer.linear                     proj_out
    pos_embed (fixed 2D sin-cos)           recomputed by diffusers at load time, not stored

Where diffusers computes something else than PixArt-α (and ditkit):
- The caption mask. diffusers adds -10000 to the scores of masked tokens where PixArt-α (and ditkit) leave
  them out; exp(-10000) is 0 in float32, so the outputs agree to round-off, except for a caption with no real
  token at all (diffusers then attends to every token evenly; ditkit refuses nothing but returns NaN).
- The null caption. diffusers' pipeline guides with the text encoder's features of the negative prompt ("");
  PixArt-α's learned `y_embedding` has no place in its model. ditkit keeps it in a side file, so a round trip
  is exact; a stock diffusers folder has none, and ditkit then sets it to zeros and says to guide with
  `--negative-prompt ""` as diffusers does.
- Micro-conditions. PixArt-α's 1024-pixel models embed the image size and aspect ratio
  (`use_additional_conditions`); ditkit has no such embedders, so those folders are refused.
Timestep frequencies agree (diffusers' PixArt uses `downscale_freq_shift=0`, unlike its DiT).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ditkit.models.config import DiTConfig
from ditkit.models.dit import LN_EPS
from ditkit.models.embeddings import sincos_2d
from ditkit.runtime.errors import UserError

CLASS_NAME = "PixArtTransformer2DModel"
NULL_CAPTION_FILE = "ditkit_null_caption.safetensors"
NULL_CAPTION_KEY = "y_embedder.y_embedding"
NOTE = (
    "diffusers' PixArtTransformer2DModel masks caption padding with a -10000 bias (exact in float32) and has "
    "no null caption: ditkit keeps it in " + NULL_CAPTION_FILE + "; diffusers' pipeline guides with the "
    "negative prompt's text features instead"
)

# ditkit name -> diffusers name, for the layers that are not split or copied.
_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "final_layer.linear": "proj_out",
}
_BLOCK = {
    "attn.proj": "attn1.to_out.0",
    "cross_attn.q_linear": "attn2.to_q",
    "cross_attn.proj": "attn2.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}


def is_pixart_config(cfg: Mapping[str, Any]) -> bool:
    """Whether a diffusers transformer config.json describes a PixArt-α transformer."""
    return cfg.get("_class_name") == CLASS_NAME or cfg.get("norm_type") == "ada_norm_single"


def transformer_args(config: DiTConfig, family: str) -> dict[str, Any]:
    """The init arguments that diffusers' DiT and PixArt transformers share, for `config`'s geometry (both
    have MLP ratio 4 only, DiT's tanh GELU, biased attention and no LayerNorm affine, at DiT's epsilon)."""
    if config.interval_time:  # MeanFlow's r_embedder: neither diffusers transformer has a second time input
        raise UserError(f"a MeanFlow model (its interval embedder r_embedder) has no diffusers {family} "
                        "equivalent; sample it with ditkit sample --sampler meanflow")
    if float(config.mlp_ratio) != 4.0:
        raise UserError(f"diffusers' {family} has MLP ratio 4 only; this model has mlp_ratio {config.mlp_ratio}")
    return dict(
        num_attention_heads=config.num_heads,
        attention_head_dim=config.hidden_size // config.num_heads,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        dropout=0.0,
        attention_bias=True,
        sample_size=config.input_size,
        patch_size=config.patch_size,
        activation_fn="gelu-approximate",  # DiT's GELU is the tanh approximation
        upcast_attention=False,
        norm_elementwise_affine=False,
        norm_eps=LN_EPS,  # diffusers' default 1e-5 would differ from DiT's
    )


def diffusers_config(config: DiTConfig) -> dict[str, Any]:
    """`PixArtTransformer2DModel` init arguments that reproduce a ditkit text model."""
    if not config.is_text:
        raise ValueError("not a text model")
    return dict(
        **transformer_args(config, "PixArt"),
        cross_attention_dim=config.hidden_size,  # the caption MLP projects to the width first
        num_embeds_ada_norm=1000,  # required by diffusers, unused by PixArt
        norm_type="ada_norm_single",
        interpolation_scale=float(config.interpolation_scale),
        use_additional_conditions=False,  # written out: diffusers would switch them on at sample_size 128
        caption_channels=config.caption_channels,
    )


def config_from_diffusers(cfg: Mapping[str, Any], where: str = "config.json") -> DiTConfig:
    """The ditkit text-model config of a diffusers PixArt config; refuses what ditkit cannot compute."""
    sample = cfg.get("sample_size", 128)
    extra = cfg.get("use_additional_conditions")
    if extra or (extra is None and sample == 128):
        raise UserError(
            f"{where}: this PixArt model embeds image size and aspect ratio (use_additional_conditions, the "
            "1024-pixel models); ditkit's text model has no such embedders"
        )
    if cfg.get("caption_channels") is None:
        raise UserError(f"{where}: caption_channels is missing; not a text-conditional PixArt model")
    if cfg.get("activation_fn", "gelu-approximate") != "gelu-approximate" or cfg.get("norm_elementwise_affine"):
        raise UserError(f"{where}: activation or norm settings differ from PixArt-α's")
    if cfg.get("attention_type", "default") != "default":
        raise UserError(f"{where}: attention_type {cfg['attention_type']!r} is not PixArt-α's")
    heads, head_dim = cfg.get("num_attention_heads", 16), cfg.get("attention_head_dim", 72)
    if cfg.get("cross_attention_dim", heads * head_dim) != heads * head_dim:
        raise UserError(f"{where}: cross_attention_dim differs from the width; not PixArt-α's layout")
    in_channels = cfg.get("in_channels", 4)
    out_channels = cfg.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise UserError(f"{where}: out_channels {out_channels} is neither in_channels nor twice it")
    scale = cfg.get("interpolation_scale")
    return DiTConfig(
        depth=cfg.get("num_layers", 28),
        hidden_size=heads * head_dim,
        num_heads=heads,
        patch_size=cfg.get("patch_size", 2),
        input_size=sample,
        in_channels=in_channels,
        learn_sigma=out_channels == 2 * in_channels,
        conditioning="text",
        caption_channels=cfg["caption_channels"],
        interpolation_scale=float(scale if scale is not None else max(sample // 64, 1)),
    )


def to_diffusers_state_dict(sd: Mapping[str, torch.Tensor], config: DiTConfig) -> dict[str, torch.Tensor]:
    """Rename a ditkit/PixArt-α text-model state_dict to diffusers' keys (the null caption left out)."""
    expected_pos = sincos_2d(config.hidden_size, config.grid_size, config.interpolation_scale)
    if (sd["pos_embed"].float() - torch.from_numpy(expected_pos).float()).abs().max().item() > 1e-5:
        raise UserError("this model's pos_embed is not the fixed 2D sin-cos table diffusers recomputes")
    out: dict[str, torch.Tensor] = {"scale_shift_table": sd["final_layer.scale_shift_table"]}
    for ours, theirs in _TOP.items():
        for w in ("weight", "bias"):
            out[f"{theirs}.{w}"] = sd[f"{ours}.{w}"]
    for i in range(config.depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        out[dst + "scale_shift_table"] = sd[src + "scale_shift_table"]
        for w in ("weight", "bias"):
            for ours, theirs in _BLOCK.items():
                out[f"{dst}{theirs}.{w}"] = sd[f"{src}{ours}.{w}"]
            q, k, v = sd[f"{src}attn.qkv.{w}"].chunk(3, dim=0)  # fused layouts are [q; k; v] and [k; v]
            out[f"{dst}attn1.to_q.{w}"], out[f"{dst}attn1.to_k.{w}"], out[f"{dst}attn1.to_v.{w}"] = q, k, v
            k, v = sd[f"{src}cross_attn.kv_linear.{w}"].chunk(2, dim=0)
            out[f"{dst}attn2.to_k.{w}"], out[f"{dst}attn2.to_v.{w}"] = k, v
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def from_diffusers_state_dict(
    sd: Mapping[str, torch.Tensor], config: DiTConfig, null_caption: torch.Tensor | None, where: str = "folder"
) -> dict[str, torch.Tensor]:
    """The inverse of `to_diffusers_state_dict`; `null_caption` None (a stock folder) gives a zero one."""

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise UserError(f"{where}: tensor {key!r} is missing; is this a diffusers PixArt transformer?")
        return sd[key]

    def fused(prefix: str, parts: str, w: str) -> torch.Tensor:
        if f"{prefix}to_{parts}.{w}" in sd:  # after diffusers' fuse_qkv_projections()
            return sd[f"{prefix}to_{parts}.{w}"]
        return torch.cat([take(f"{prefix}to_{c}.{w}") for c in parts], dim=0)

    pos = sincos_2d(config.hidden_size, config.grid_size, config.interpolation_scale)
    if null_caption is None:
        null_caption = torch.zeros(config.max_tokens, config.caption_channels)
    out: dict[str, torch.Tensor] = {
        "pos_embed": torch.from_numpy(pos).float().unsqueeze(0),
        "final_layer.scale_shift_table": take("scale_shift_table"),
        NULL_CAPTION_KEY: null_caption,
    }
    for ours, theirs in _TOP.items():
        for w in ("weight", "bias"):
            out[f"{ours}.{w}"] = take(f"{theirs}.{w}")
    for i in range(config.depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        out[dst + "scale_shift_table"] = take(src + "scale_shift_table")
        for w in ("weight", "bias"):
            for ours, theirs in _BLOCK.items():
                out[f"{dst}{ours}.{w}"] = take(f"{src}{theirs}.{w}")
            out[f"{dst}attn.qkv.{w}"] = fused(src + "attn1.", "qkv", w)
            out[f"{dst}cross_attn.kv_linear.{w}"] = fused(src + "attn2.", "kv", w)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def random_inputs(config: DiTConfig, batch: int = 4, tokens: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(x, t, captions, mask) for comparisons: the i-th caption has its last i tokens as padding."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=gen)
    t = ((torch.arange(batch) + 0.5) * (1000 / batch)).floor()
    y = torch.randn(batch, tokens, config.caption_channels, generator=gen)
    lengths = torch.clamp(tokens - torch.arange(batch), min=1)
    mask = torch.arange(tokens)[None] < lengths[:, None]
    return x, t, y, mask


@torch.no_grad()
def diffusers_output(transformer: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """A diffusers PixArt transformer's prediction for ditkit's arguments."""
    return transformer(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask.long()).sample
