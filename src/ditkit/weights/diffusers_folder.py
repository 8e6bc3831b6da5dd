"""Reading diffusers DiT folders (a `DiTTransformer2DModel`, or a `DiTPipeline` with its `transformer/`) into the
official key layout. Writing them, and the key table, are in `ditkit.weights.convert`; this half is what
`ditkit.load_model(folder)` needs, kept apart so that loading a checkpoint never imports the converter.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ditkit.models.config import DiTConfig
from ditkit.models.dit import LN_EPS
from ditkit.models.embeddings import sincos_2d
from ditkit.recipe import LatentSpace, Recipe, infer_recipe
from ditkit.runtime import validate
from ditkit.runtime.errors import UserError
from ditkit.runtime.io import read_safetensors, safe_torch_load
from ditkit.weights import convert_pixart

SIDECAR = "ditkit_config.json"  # written next to config.json: the settings diffusers' config cannot express
WEIGHTS = "diffusion_pytorch_model"
DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel", convert_pixart.CLASS_NAME)
# Two copies of the same float32 tensor agree exactly; anything above this means they were trained apart.
EMBEDDER_TOLERANCE = 1e-6


def _emb_prefix(i: int) -> str:
    return f"transformer_blocks.{i}.norm1.emb."


def _take(sd: Mapping[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in sd:
        raise UserError(f"{where}: tensor {key!r} is missing; is this a diffusers DiT transformer?")
    return sd[key]


def from_diffusers_state_dict(
    sd: Mapping[str, torch.Tensor],
    config: DiTConfig,
    where: str = "diffusers folder",
    allow_embedder_mismatch: bool = False,
) -> dict[str, torch.Tensor]:
    """Rename a diffusers DiT state_dict to the official/ditkit layout (the inverse of `to_diffusers_state_dict`).

    The per-block embedder copies must agree (they do in any converted model); the first block's copy becomes
    the shared embedder, which is also the one diffusers uses for its final layer. Models whose copies were
    trained apart raise UserError unless `allow_embedder_mismatch`.
    """
    emb_keys = [
        "timestep_embedder.linear_1.weight",
        "timestep_embedder.linear_1.bias",
        "timestep_embedder.linear_2.weight",
        "timestep_embedder.linear_2.bias",
        "class_embedder.embedding_table.weight",
    ]
    first = {k: _take(sd, _emb_prefix(0) + k, where) for k in emb_keys}
    if not allow_embedder_mismatch:
        for i in range(1, config.depth):
            for k in emb_keys:
                gap = (_take(sd, _emb_prefix(i) + k, where).float() - first[k].float()).abs().max().item()
                if gap > EMBEDDER_TOLERANCE:
                    raise UserError(
                        f"{where}: block {i}'s {k.split('.')[0]} differs from block 0's by {gap:.3g} (trained "
                        "apart in diffusers); ditkit shares one embedder; pass --use-first-embedder to keep block 0's"
                    )
    table = first["class_embedder.embedding_table.weight"]
    if config.class_dropout_prob == 0 and table.shape[0] == config.num_classes + 1:
        table = table[: config.num_classes]  # the zero null row diffusers needs, which this model never had
    out: dict[str, torch.Tensor] = {
        "pos_embed": torch.from_numpy(sincos_2d(config.hidden_size, config.grid_size)).float().unsqueeze(0),
        "x_embedder.proj.weight": _take(sd, "pos_embed.proj.weight", where),
        "x_embedder.proj.bias": _take(sd, "pos_embed.proj.bias", where),
        "t_embedder.mlp.0.weight": first["timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": first["timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": first["timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": first["timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": table,
        "final_layer.adaLN_modulation.1.weight": _take(sd, "proj_out_1.weight", where),
        "final_layer.adaLN_modulation.1.bias": _take(sd, "proj_out_1.bias", where),
        "final_layer.linear.weight": _take(sd, "proj_out_2.weight", where),
        "final_layer.linear.bias": _take(sd, "proj_out_2.bias", where),
    }
    for i in range(config.depth):
        src, blk = f"transformer_blocks.{i}.", f"blocks.{i}."
        for name in ("weight", "bias"):
            fused = src + f"attn1.to_qkv.{name}"  # present after diffusers' fuse_qkv_projections()
            if fused in sd:
                qkv = sd[fused]
            else:
                qkv = torch.cat([_take(sd, src + f"attn1.to_{c}.{name}", where) for c in "qkv"], dim=0)
            out[blk + f"attn.qkv.{name}"] = qkv
            out[blk + f"attn.proj.{name}"] = _take(sd, src + f"attn1.to_out.0.{name}", where)
            out[blk + f"adaLN_modulation.1.{name}"] = _take(sd, src + f"norm1.linear.{name}", where)
            out[blk + f"mlp.fc1.{name}"] = _take(sd, src + f"ff.net.0.proj.{name}", where)
            out[blk + f"mlp.fc2.{name}"] = _take(sd, src + f"ff.net.2.{name}", where)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {str(err)[:160]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


def _side(path: Path) -> dict[str, Any]:
    """ditkit's sidecar beside a diffusers config, checked (`validate.sidecar`)."""
    return dict(validate.sidecar(_read_json(path), str(path)))


def transformer_folder(path: str | os.PathLike) -> Path:
    """The folder holding the transformer's config.json: `path` itself or a pipeline's `transformer/`."""
    path = Path(path)
    for candidate in (path, path / "transformer"):
        if (candidate / "config.json").is_file():
            cfg = _read_json(candidate / "config.json")
            if cfg.get("_class_name") in DIFFUSERS_CLASSES or "num_embeds_ada_norm" in cfg:
                return candidate
    raise UserError(
        f"{path} is not a diffusers DiT folder: expected config.json of a DiTTransformer2DModel there or in "
        f"{path / 'transformer'}"
    )


def config_from_diffusers(cfg: Mapping[str, Any], where: str = "config.json") -> DiTConfig:
    """The DiTConfig of a diffusers DiT config; refuses what is not a class-conditional adaLN-Zero DiT."""
    validate.diffusers_config(cfg, where)
    if cfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise UserError(f"{where}: norm_type {cfg.get('norm_type')!r} is not DiT's ada_norm_zero")
    if cfg.get("patch_size") is None or cfg.get("num_embeds_ada_norm") is None:
        raise UserError(f"{where}: not a class-conditional patch DiT (patch_size or num_embeds_ada_norm missing)")
    if cfg.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        raise UserError(f"{where}: activation_fn {cfg['activation_fn']!r} differs from DiT's tanh GELU")
    if cfg.get("norm_elementwise_affine", False):
        raise UserError(f"{where}: norm_elementwise_affine is true; DiT's norms have no affine parameters")
    heads, head_dim = cfg.get("num_attention_heads", 16), cfg.get("attention_head_dim", 72)
    in_channels = cfg.get("in_channels", 4)
    out_channels = cfg.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise UserError(f"{where}: out_channels {out_channels} is neither in_channels nor twice it")
    return DiTConfig(
        depth=cfg.get("num_layers", 28),
        hidden_size=heads * head_dim,
        num_heads=heads,
        patch_size=cfg["patch_size"],
        input_size=cfg.get("sample_size", 32),
        in_channels=in_channels,
        num_classes=cfg["num_embeds_ada_norm"],
        learn_sigma=out_channels == 2 * in_channels,
        class_dropout_prob=0.1,  # diffusers always keeps the null row (and drops labels with p = 0.1)
        mlp_ratio=4.0,
        conditioning="adaln-zero",
    )


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The transformer's tensors: single or sharded safetensors, else a `.bin` read with weights_only."""
    single = folder / f"{WEIGHTS}.safetensors"
    index = folder / f"{WEIGHTS}.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)[0]
    if index.is_file():
        tensors: dict[str, torch.Tensor] = {}
        for shard in validate.weight_index(_read_json(index), folder, str(index)):
            tensors.update(read_safetensors(shard)[0])
        return tensors
    variants = sorted(folder.glob(f"{WEIGHTS}.*.safetensors"))  # e.g. the fp16 variant
    if variants:
        return read_safetensors(variants[0])[0]
    binary = folder / f"{WEIGHTS}.bin"
    if binary.is_file():
        obj = safe_torch_load(binary)
        if isinstance(obj, Mapping):
            return dict(obj)
    raise UserError(f"{folder} has no {WEIGHTS}.safetensors (or .bin) weights file")


def differences(cfg: Mapping[str, Any]) -> list[str]:
    """Plain statements of where the diffusers model described by `cfg` computes something else than DiT."""
    notes = ["timestep frequencies 10000^(-i/127) (diffusers' downscale_freq_shift=1) where DiT uses 10000^(-i/128)"]
    eps = float(cfg.get("norm_eps", 1e-5))
    if eps != LN_EPS:
        notes.append(f"MLP pre-norm epsilon {eps:g} where DiT uses {LN_EPS:g}")
    return notes


def read_diffusers_folder(
    path: str | os.PathLike, allow_embedder_mismatch: bool = False
) -> tuple[dict[str, torch.Tensor], DiTConfig | None, dict[str, Any]]:
    """(state_dict in the official key layout, config, hints) of a diffusers DiT transformer or pipeline folder.

    This is what `ditkit.load_model(folder)` calls. The result computes the original DiT, which differs from
    diffusers' port of it as `differences()` states; a warning says so once per call.
    """
    folder = transformer_folder(path)
    cfg = validate.diffusers_config(_read_json(folder / "config.json"), str(folder / "config.json"))
    if convert_pixart.is_pixart_config(cfg):
        with validate.naming(folder / "config.json"):
            return _read_pixart_folder(folder, cfg)
    with validate.naming(folder / "config.json"):
        config = config_from_diffusers(cfg, str(folder / "config.json"))
    sidecar = folder / SIDECAR
    if sidecar.is_file():
        # Settings diffusers has no key for (label dropout, ...); trusted only when they fit the tensors' config.
        with validate.naming(sidecar):
            stored = DiTConfig.from_dict(_side(sidecar)["config"])
        if {**stored.to_dict(), "class_dropout_prob": 0.1} != config.to_dict():
            raise UserError(f"{sidecar} does not match {folder / 'config.json'}; delete {sidecar} and retry")
        config = stored
    state_dict = from_diffusers_state_dict(_read_weights(folder), config, str(folder), allow_embedder_mismatch)
    warnings.warn(
        f"{path}: ditkit computes the original DiT, not diffusers' port of it, which has "
        + "; ".join(differences(cfg)),
        stacklevel=2,
    )
    return state_dict, config, {}


def _read_pixart_folder(folder: Path, cfg: dict[str, Any]) -> tuple[dict[str, torch.Tensor], DiTConfig, dict]:
    """A diffusers PixArt transformer folder as a ditkit text model's (state_dict, config, hints)."""
    config = convert_pixart.config_from_diffusers(cfg, str(folder / "config.json"))
    sidecar = folder / SIDECAR
    if sidecar.is_file():  # caption dropout, token count: what diffusers' config cannot say
        with validate.naming(sidecar):
            stored = DiTConfig.from_dict(_side(sidecar)["config"])
        keep = ("class_dropout_prob", "max_tokens", "num_classes")
        if {**stored.to_dict(), **{k: config.to_dict()[k] for k in keep}} != config.to_dict():
            raise UserError(f"{sidecar} does not match {folder / 'config.json'}; delete {sidecar} and retry")
        config = stored
    null = None
    if (folder / convert_pixart.NULL_CAPTION_FILE).is_file():
        null = read_safetensors(folder / convert_pixart.NULL_CAPTION_FILE)[0].get(convert_pixart.NULL_CAPTION_KEY)
    if null is not None and tuple(null.shape) != (config.max_tokens, config.caption_channels):
        raise UserError(f"{folder / convert_pixart.NULL_CAPTION_FILE}: null caption of shape {tuple(null.shape)}"
                        f" does not fit the model ({config.max_tokens}×{config.caption_channels})")
    state_dict = convert_pixart.from_diffusers_state_dict(_read_weights(folder), config, null, str(folder))
    if null is None:
        warnings.warn(
            f"{folder}: a stock diffusers PixArt folder has no null caption; ditkit uses zeros, so guide "
            "with --negative-prompt '' (the text features of an empty prompt, as diffusers' pipeline does)",
            stacklevel=3,
        )
    return state_dict, config, {}


def folder_recipe(path: str | os.PathLike, config: DiTConfig) -> Recipe:
    """The recipe of a diffusers folder: the one ditkit stored in its sidecar, else inferred, with a pipeline's
    own `vae/` as the latent space (its scaling factor from its config)."""
    folder = transformer_folder(path)
    sidecar = folder / SIDECAR
    stored = _side(sidecar).get("recipe") if sidecar.is_file() else None
    if stored is not None:
        with validate.naming(sidecar):
            return Recipe.from_dict(stored, str(sidecar)).replace(model=config)
    vae = folder.parent / "vae" if folder.name == "transformer" else None
    latents = None
    if vae is not None and (vae / "config.json").is_file():
        down, scale, shift = validate.vae_config(_read_json(vae / "config.json"), str(vae / "config.json"))
        latents = LatentSpace(vae=str(vae), scale=scale, shift=shift, downsample=down)
    return infer_recipe(config, latents)
