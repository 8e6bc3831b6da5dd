"""Reading and writing model weights: the official `.pt` layouts and ditkit's safetensors format.

Security: `.pt` files are pickles, which can run code when loaded. They are read only with
`torch.load(weights_only=True)` (plus `argparse.Namespace`, which the official train.py stores as `args` and
which carries plain values), so a file with a code payload is refused and its payload never runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ditkit.models import build_model
from ditkit.models.config import SIZES, DiTConfig
from ditkit.models.dit import DiT
from ditkit.models.knobs import knobs_from_state_dict
from ditkit.models.pixart import PixArtDiT
from ditkit.recipe import METADATA_KEY, FlowProcess, LatentSpace, Recipe, infer_recipe
from ditkit.runtime.errors import UserError
from ditkit.runtime.io import atomic_write, read_safetensors, safe_torch_load, save_safetensors
from ditkit.runtime.validate import naming
from ditkit.training_methods import PROJECTOR_PREFIX
from ditkit.weights import lightningdit
from ditkit.weights.diffusers_folder import folder_recipe, read_diffusers_folder

CONFIG_KEY = "ditkit_config"  # safetensors metadata key holding the model config as JSON
_STRIP_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


# ----------------------------------------------------------------------------------------------- reading


def extract_state_dict(obj: Any, path: str | os.PathLike = "checkpoint") -> dict[str, torch.Tensor]:
    """The model weights inside a loaded checkpoint: the EMA ones when present (as the authors sample).

    Accepts a bare state_dict (the released files), the official train.py dict {"model","ema","opt","args"},
    and ditkit training checkpoints; strips DDP's `module.` and torch.compile's `_orig_mod.` prefixes.
    """
    if isinstance(obj, Mapping):
        for key in ("ema", "model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(f"{path} holds no model weights (expected a state_dict or a dict with 'ema' or 'model')")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        for prefix in _STRIP_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _infer_text_config(state_dict: Mapping[str, torch.Tensor], **known: Any) -> DiTConfig:
    """The config of a PixArt-α state_dict (ditkit's text models or PixArt-α's released files)."""
    base = {k: v for k, v in state_dict.items() if not k.startswith("y_embedder.")}
    base["y_embedder.embedding_table.weight"] = torch.zeros(1001, 1)  # the class part reads like a DiT's
    base["blocks.0.adaLN_modulation.1.weight"] = torch.zeros(1)
    guess = infer_config(base, **{k: v for k, v in known.items() if k != "conditioning"}).to_dict()
    captions = state_dict["y_embedder.y_embedding"]
    pos = state_dict["pos_embed"].float()
    # Token 1 sits at column 1/scale: the first channel is sin(1/scale) (PixArt-α's 1024 model uses scale 2).
    first = float(pos[0, 1, 0]) if pos.shape[1] > 1 else math.sin(1.0)
    scale = round(1.0 / math.asin(first), 3) if 0 < first <= 1 else 1.0
    guess.update(conditioning="text", caption_channels=captions.shape[1], max_tokens=captions.shape[0],
                 interpolation_scale=scale, num_classes=1000, class_dropout_prob=0.1)
    guess.update(known)
    return DiTConfig(**guess)


def infer_config(state_dict: Mapping[str, torch.Tensor], **known: Any) -> DiTConfig:
    """Recover a model config from tensor shapes (heads from the paper sizes, else width/64)."""
    if "t_block.1.weight" in state_dict and "y_embedder.y_embedding" in state_dict:
        return _infer_text_config(state_dict, **known)
    try:
        pos = state_dict["pos_embed"]
        proj = state_dict["x_embedder.proj.weight"]
        final = state_dict["final_layer.linear.weight"]
        table = state_dict["y_embedder.embedding_table.weight"]
    except KeyError as err:
        raise UserError(f"not a DiT checkpoint: tensor {err.args[0]!r} is missing") from None
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    grid = round(pos.shape[1] ** 0.5)
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    out_channels = final.shape[0] // (patch * patch)
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    mod = state_dict.get("blocks.0.adaLN_modulation.1.weight")
    if mod is not None:
        conditioning = "adaln-zero" if mod.shape[0] == 6 * hidden else "adaln"
    elif "blocks.0.cross_attn.q.weight" in state_dict:
        conditioning = "cross-attention"
    else:
        conditioning = "in-context"
    heads = next((h for (dep, w, h) in SIZES.values() if (dep, w) == (depth, hidden)), max(1, hidden // 64))
    guess: dict[str, Any] = dict(
        depth=depth,
        hidden_size=hidden,
        num_heads=heads,
        patch_size=patch,
        input_size=grid * patch,
        in_channels=in_channels,
        # The null-label row exists whenever the model was trained with label dropout (the official setting).
        num_classes=table.shape[0] - 1 if table.shape[0] > 1 else 1,
        learn_sigma=out_channels == 2 * in_channels,
        class_dropout_prob=0.1 if table.shape[0] > 1 else 0.0,
        mlp_ratio=(fc1.shape[0] / hidden) if fc1 is not None else 4.0,
        conditioning=conditioning,
    )
    guess.update(knobs_from_state_dict(state_dict))  # LightningDiT's layers (RMSNorm, QK-norm, RoPE, SwiGLU)
    guess.update(known)
    return DiTConfig(**guess)


def check_shapes(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """One line naming the first tensor that is missing, unexpected, or of the wrong shape."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state_dict:
            raise UserError(f"{path} does not fit {model.config.name}: tensor {key!r} is missing from the checkpoint")
        if tensor.is_floating_point() and not state_dict[key].is_floating_point():
            # load_state_dict would cast integers or booleans silently into weights that mean nothing.
            raise UserError(
                f"{path}: tensor {key!r} has dtype {str(state_dict[key].dtype).replace('torch.', '')}; DiT weights "
                "are floating point (float32, bfloat16, float16); the file is damaged or not a DiT checkpoint"
            )
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise UserError(
                f"{path} does not fit {model.config.name}: tensor {key!r} has shape {tuple(state_dict[key].shape)} "
                f"in the checkpoint but {tuple(tensor.shape)} in the model; check --model, --image-size, "
                "--num-classes"
            )
    extra = [k for k in state_dict if k not in expected]
    if extra:
        raise UserError(f"{path} does not fit {model.config.name}: unexpected tensor {extra[0]!r} in the checkpoint")


def check_stored_config(stored: DiTConfig, state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuse a stored config that disagrees with the tensors, before a model is built from it.

    A file from a stranger could state e.g. depth 10^9 with small tensors; building that model first would
    exhaust memory before the shape check could name the problem.
    """
    found = infer_config(state_dict)
    fields = ["depth", "hidden_size", "patch_size", "input_size", "in_channels", "learn_sigma"]
    table = state_dict.get("y_embedder.embedding_table.weight")
    if table is not None:  # class labels: the table has a null row when trained with label dropout
        found = dataclasses.replace(found, num_classes=max(1, table.shape[0] - int(stored.class_dropout_prob > 0)))
        fields.append("num_classes")
    for name in fields:
        if getattr(stored, name) != getattr(found, name):
            raise UserError(
                f"{path}: the stored model config says {name}={getattr(stored, name)!r} but the tensors say "
                f"{getattr(found, name)!r}; the file is inconsistent (pass --model to ignore the stored config)"
            )


def check_size_overrides(config: DiTConfig, state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                         overrides: Mapping[str, Any]) -> None:
    """Refuse an --image-size or --num-classes that the tensors contradict before the model is built: the
    positional and label tables grow with them, and 10^12 classes would be a petabyte allocation."""
    table = state_dict.get("y_embedder.embedding_table.weight")
    if "num_classes" in overrides and table is not None:
        rows = config.num_classes + int(config.class_dropout_prob > 0)
        if rows != table.shape[0]:
            raise UserError(
                f"{path} does not fit: tensor 'y_embedder.embedding_table.weight' has {table.shape[0]} rows in the "
                f"checkpoint but num_classes={config.num_classes} needs {rows}; check --num-classes"
            )
    pos = state_dict.get("pos_embed")
    if "input_size" in overrides and pos is not None and pos.ndim == 3 and pos.shape[1] != config.num_patches:
        raise UserError(
            f"{path} does not fit: tensor 'pos_embed' has {pos.shape[1]} positions in the checkpoint but "
            f"input_size={config.input_size} needs {config.num_patches}; check --image-size"
        )


def _official_args(args: Any) -> tuple[dict[str, Any], LatentSpace | None]:
    """Settings recorded by the official train.py (`args.image_size`, `args.num_classes`, `args.vae`): config
    hints, and the SD-VAE it encoded with ("ema" or "mse")."""
    found: dict[str, Any] = {}
    latents = None
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if isinstance(args, Mapping):
        if isinstance(args.get("image_size"), int):
            found["input_size"] = args["image_size"] // 8
        if isinstance(args.get("num_classes"), int):
            found["num_classes"] = args["num_classes"]
        if args.get("vae") in ("ema", "mse"):
            latents = LatentSpace.sd_vae(f"stabilityai/sd-vae-ft-{args['vae']}")
    return found, latents


@dataclass
class CheckpointFile:
    """What one read of a checkpoint gives: the weights (EMA when present), the stored config or None, config
    hints the file states, its stored recipe (JSON text, parsed only when asked) or what it says of its latents."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    config: DiTConfig | None = None
    hints: dict[str, Any] = field(default_factory=dict)
    recipe_json: str | None = None
    latents: LatentSpace | None = None
    diffusers: bool = False


def read_checkpoint(path: str | os.PathLike) -> CheckpointFile:
    """Read any supported checkpoint once: official `.pt`, train.py dict, ditkit safetensors or training
    folder (its EMA), diffusers transformer or pipeline folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_dir() and (path / "ema.safetensors").is_file():
        path = path / "ema.safetensors"  # a ditkit training checkpoint folder: sample its EMA weights
    elif path.is_dir() and any((path / name).is_file() for name in ("model.safetensors", "state.pt")):
        raw = path / "model.safetensors"
        use = f"pass {raw} to use the raw (non-EMA) weights, or " if raw.is_file() else "pass "
        raise UserError(f"{path} is a ditkit training checkpoint folder without ema.safetensors (incomplete, or "
                        f"the file was deleted); {use}an earlier checkpoint folder")
    elif path.is_dir():
        state_dict, config, hints = read_diffusers_folder(path)  # a diffusers transformer or pipeline folder
        return CheckpointFile(path, state_dict, config, hints, diffusers=True)
    if path.suffix == ".safetensors":
        tensors, metadata = read_safetensors(path)
        config = None
        if CONFIG_KEY in metadata:
            try:
                with naming(path):
                    config = DiTConfig.from_dict(json.loads(metadata[CONFIG_KEY]))
            except json.JSONDecodeError:
                raise UserError(f"{path}: the stored model config is not valid JSON") from None
        return CheckpointFile(path, extract_state_dict(tensors, path), config, recipe_json=metadata.get(METADATA_KEY))
    obj = safe_torch_load(path, mmap=True)
    hints, latents = _official_args(obj.get("args")) if isinstance(obj, Mapping) else ({}, None)
    config = None
    if isinstance(obj, Mapping) and lightningdit.is_train_config(obj.get("config")):  # its run's YAML
        state_dict = extract_state_dict(obj, path)
        recipe = lightningdit.recipe_from_config(obj["config"], infer_config(state_dict))
        return CheckpointFile(path, state_dict, None, recipe_json=recipe.to_json())
    if isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping):
        with naming(path):
            config = DiTConfig.from_dict(dict(obj["config"]))
    return CheckpointFile(path, extract_state_dict(obj, path), config, hints, latents=latents)


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], DiTConfig | None, dict[str, Any]]:
    """(state_dict, stored config or None, hints) from any supported file; hints are settings the file states."""
    found = read_checkpoint(path)
    return found.state_dict, found.config, found.hints


def build_checked(
    found: CheckpointFile, model: str | None = None, device: torch.device | str | None = None, **overrides: Any
) -> DiT | PixArtDiT:
    """The network of a read checkpoint, its weights loaded (on `device`, default the CPU; eval mode); see
    `load_model`."""
    state_dict, stored, path = found.state_dict, found.config, found.path
    # REPA's projector is a training-only head: a network built to sample has none (ditkit.train.align)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(PROJECTOR_PREFIX)}
    if model is not None:
        config = DiTConfig.from_name(model, **overrides)
    elif stored is not None:
        check_stored_config(stored, state_dict, path)
        config = DiTConfig.from_dict({**stored.to_dict(), **overrides})
    else:
        config = infer_config(state_dict, **{**found.hints, **overrides})
    check_size_overrides(config, state_dict, path, overrides)
    # The network is built on the meta device and takes the file's tensors as its parameters: a random
    # initialisation that the weights would overwrite costs ~15 s of CPU for DiT-XL/2 (one thread).
    with torch.device("meta"):
        net = build_model(config)
    check_shapes(net, state_dict, path)
    expected = net.state_dict()
    target = torch.device(device) if device is not None else torch.device("cpu")
    # The module's dtypes (fp32) whatever the file stores, contiguous, on the target device.
    weights = {k: v.to(device=target, dtype=expected[k].dtype).contiguous() if k in expected else v
               for k, v in state_dict.items()}
    check_finite(weights, path)
    net.load_state_dict(weights, strict=True, assign=True)
    return net.eval()


def checkpoint_recipe(found: CheckpointFile, config: DiTConfig) -> Recipe:
    """The recipe of a read checkpoint for the model built from it: the stored one (its model part replaced by
    `config`, which may carry overrides), else inferred as for files written before recipes existed."""
    if found.recipe_json is not None:
        return Recipe.from_json(found.recipe_json, where=str(found.path)).replace(model=config)
    if found.diffusers:
        return folder_recipe(found.path, config)
    if Path(found.path).name.startswith("SiT"):
        # SiT's released files (SiT-XL-2-256x256.pt) are DiT-shaped state dicts that record nothing: their name is
        # the only sign of SiT's process (Linear path, velocity). `ditkit sample --objective` decides otherwise.
        return Recipe(model=config, process=FlowProcess(), latents=infer_recipe(config, found.latents).latents)
    if config.knobs:  # no paper DiT has LightningDiT's layers: a bare LightningDiT state dict, flow-trained
        return lightningdit.released_recipe(config, infer_recipe(config, found.latents).latents)
    return infer_recipe(config, found.latents)


def load_model(path: str | os.PathLike, model: str | None = None, **overrides: Any) -> DiT | PixArtDiT:
    """Load any supported checkpoint into a DiT on the CPU, in eval mode.

    `model` (e.g. "DiT-XL/2") and `overrides` (input_size, num_classes, ...) state the expected config; a
    checkpoint that does not fit gets one line naming the first mismatched tensor. Without them the stored
    config is used, or one inferred from the tensor shapes.
    """
    return build_checked(read_checkpoint(path), model, **overrides)


def load_model_with_recipe(
    path: str | os.PathLike, model: str | None = None, **overrides: Any
) -> tuple[DiT | PixArtDiT, Recipe]:
    """`load_model`, and the recipe the checkpoint was made with (stored, or inferred for older files)."""
    found = read_checkpoint(path)
    net = build_checked(found, model, **overrides)
    return net, checkpoint_recipe(found, net.config)


def check_finite(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """One line naming the first floating-point tensor with a NaN or infinite value (a diverged or damaged
    checkpoint samples black or noise images without this)."""
    floats = [t for t in state_dict.values() if t.is_floating_point() and t.numel()]
    # One sum per tensor (fast, vectorised) and a single host sync; only a non-finite sum (a NaN/inf, or an
    # overflow of huge but finite values) leads to the exact elementwise test below.
    if not floats or bool(torch.isfinite(torch.stack([t.float().sum() for t in floats])).all()):
        return
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(
                f"{path}: tensor {key!r} holds NaN or infinite values; the run that wrote it diverged or the "
                "file is damaged: use an earlier checkpoint"
            )


def checkpoint_metadata(config: DiTConfig, recipe: Recipe | None = None) -> dict[str, str]:
    """The safetensors metadata of every ditkit weights file: the config (for older readers) and the recipe
    (inferred from the config when none is given, so the file reads back as it would have anyway)."""
    recipe = recipe.replace(model=config) if recipe is not None else infer_recipe(config)
    return {CONFIG_KEY: json.dumps(config.to_dict()), METADATA_KEY: recipe.to_json(), "format": "ditkit"}


def save_model(
    model: DiT, path: str | os.PathLike, metadata: Mapping[str, str] | None = None, recipe: Recipe | None = None
) -> None:
    """Write weights, config and recipe as one safetensors file (atomically; equal weights give equal bytes)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {**checkpoint_metadata(model.config, recipe), **(metadata or {})}
    atomic_write(path, lambda tmp: save_safetensors(tensors, tmp, meta))
