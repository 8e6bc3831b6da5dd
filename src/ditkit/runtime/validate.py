"""One validator per file format ditkit reads: types, ranges and cross-field consistency, checked before any use.

A number read from a file is a stranger's number: a recipe saying `diffusion_steps` 10^12 or a `config.json`
saying `sample_size` 200000 used to reach an allocation ("Unable to allocate 7.28 TiB"), a string where a mapping
belongs a `TypeError`. Each reader calls its validator on the parsed JSON first; a failure is one `UserError`
line naming the file, the field and the allowed range.

| format                                   | validator          | read by                                   |
| ---------------------------------------- | ------------------ | ----------------------------------------- |
| model config (`ditkit_config`, sidecar)  | `model_limits`     | `DiTConfig.validate` (every config)       |
| recipe JSON (safetensors `recipe`, ...)  | `recipe_dict`      | `Recipe.from_dict`                        |
| diffusers DiT / PixArt `config.json`     | `diffusers_config` | `diffusers_folder`, `convert_pixart`      |
| `ditkit_config.json` sidecar             | `sidecar`          | `diffusers_folder`                        |
| `*.safetensors.index.json`               | `weight_index`     | `diffusers_folder._read_weights`          |
| a pipeline's `vae/config.json`           | `vae_config`       | `diffusers_folder.folder_recipe`          |
| latent / caption store `manifest.json`   | `store_manifest`   | `data.store.read_manifest`                |
| a store shard's safetensors header       | `shard_header`     | `data.store.open_shard`                   |
| a sample folder's `settings.json`        | `settings_json`    | `sample.npz`                              |

The bounds (`LIMITS`) are far beyond any published model, and the estimated size of the model a config
describes (weights plus fixed tables, `model_numbers`) is at most `MAX_MODEL_NUMBERS`. Paths a file names (store
shards, caption shards, weight shards) must be plain relative names inside the file's folder (`inside`).
This module imports nothing of ditkit but the error type, so every reader can call it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from ditkit.runtime.errors import UserError

MAX_CLASSES = 1_000_000  # ImageNet-21k has 21,841
MAX_DIFFUSION_STEPS = 100_000  # ADM's largest is 4000; the process tables are float64 arrays of this length
MAX_IMAGE_TOKENS = 2**20  # (input_size / patch_size)²: PixArt-α at 1024 px has 4,096; pixels at 1024, patch 1: 2**20
MAX_MODEL_NUMBERS = 10**10  # weights + fixed tables: 40 GB in float32, 15× DiT-XL/2
MAX_STORE_ITEMS = 10**10
MAX_FILE_ENTRIES = 1_000_000  # shards in a manifest, weight files in an index

# field -> (lowest, highest) for the integers of a model config
LIMITS: dict[str, tuple[int, int]] = {
    "depth": (1, 1024),
    "hidden_size": (1, 65_536),
    "num_heads": (1, 65_536),
    "patch_size": (1, 256),
    "input_size": (1, 4096),
    "in_channels": (1, 1024),
    "num_classes": (1, MAX_CLASSES),
    "caption_channels": (1, 65_536),
    "max_tokens": (1, 65_536),
    "downsample": (1, 64),
    "diffusion_steps": (1, MAX_DIFFUSION_STEPS),
}


# ----------------------------------------------------------------------------------------------- primitives


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def integer(value: Any, field: str, where: str, lo: int | None = None, hi: int | None = None) -> int:
    """`value` if it is an integer (not a bool) in lo..hi (the field's `LIMITS` when not given), else one line."""
    if lo is None or hi is None:
        lo, hi = LIMITS.get(field.rsplit(".", 1)[-1], (0, 2**63 - 1))
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise UserError(f"{where}: {field} must be an integer in {lo}..{hi:,}, got {_shown(value)}")
    return value


def number(value: Any, field: str, where: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """`value` if it is a finite number in [lo, hi], else one line."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not lo <= value <= hi:
        span = f" in {lo:g}..{hi:g}" if math.isfinite(lo) or math.isfinite(hi) else ""
        raise UserError(f"{where}: {field} must be a finite number{span}, got {_shown(value)}")
    return float(value)


def text(value: Any, field: str, where: str, optional: bool = False) -> str | None:
    """`value` if it is a non-empty string of at most 4096 characters (or None, when optional), else one line."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value) > 4096:
        raise UserError(f"{where}: {field} must be a non-empty string{' or null' if optional else ''}, "
                        f"got {_shown(value)}")
    return value


def mapping(value: Any, field: str, where: str, optional: bool = False) -> Mapping[str, Any]:
    """`value` if it is a JSON object (or None, as {}, when optional), else one line."""
    if value is None and optional:
        return {}
    if not isinstance(value, Mapping):
        raise UserError(f"{where}: {field} must be a JSON object, got {type(value).__name__}")
    return value


def listing(value: Any, field: str, where: str, max_len: int = MAX_FILE_ENTRIES) -> list:
    """`value` if it is a JSON list of at most `max_len` entries, else one line."""
    if not isinstance(value, list) or len(value) > max_len:
        raise UserError(f"{where}: {field} must be a list of at most {max_len:,} entries, got {_shown(value)}")
    return value


@contextlib.contextmanager
def naming(where: str | os.PathLike) -> Iterator[None]:
    """Prefix a UserError raised inside with the file it concerns (when the message does not name it yet)."""
    try:
        yield
    except UserError as err:
        msg = str(err)
        raise UserError(msg if msg.startswith(str(where)) else f"{where}: {msg}") from None


def relative_name(name: Any, folder: str | os.PathLike, field: str, where: str) -> PurePosixPath:
    """`name` as a relative '/'-separated path if, as written, it stays inside `folder` (no absolute path, drive
    or `..`); one line naming the entry otherwise. The file itself is not looked at."""
    if not isinstance(name, str) or not name or "\x00" in name or len(name) > 1024:
        raise UserError(f"{where}: {field} must be a file name inside {folder}, got {_shown(name)}")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts or ".." in windows.parts:
        raise UserError(f"{where}: {field} {name!r} leaves {folder}; entries must be relative names inside it")
    return PurePosixPath(*windows.parts) if "\\" in name else posix


def inside(name: Any, folder: str | os.PathLike, field: str, where: str) -> Path:
    """`folder / name` for a plain relative file name inside `folder`; anything that would leave it (absolute,
    `..`, a drive, a symlink pointing out) is refused naming the entry."""
    relative_name(name, folder, field, where)
    path = Path(folder) / name
    base = Path(os.path.realpath(folder))
    real = Path(os.path.realpath(path))
    if real != base and base not in real.parents:
        raise UserError(f"{where}: {field} {name!r} points outside {folder} (to {real}); entries must stay inside it")
    return path


# ----------------------------------------------------------------------------------------------- model configs


def model_numbers(c: Any) -> int:
    """An upper estimate of the numbers a model of config `c` holds: its weights (attention, MLP, modulation,
    and cross-attention, per block) and its tables (labels, positions, captions, patch projections)."""
    h = c.hidden_size
    per_block = int((14 + 2 * float(c.mlp_ratio)) * h * h)
    patches = (c.input_size // c.patch_size) ** 2
    tables = (c.num_classes + 1 + patches) * h + 2 * c.in_channels * c.patch_size**2 * h
    if c.conditioning == "text":
        tables += (c.caption_channels + c.max_tokens) * h + c.max_tokens * c.caption_channels
    return c.depth * per_block + tables


def model_limits(c: Any, where: str = "model config") -> None:
    """Ranges of a model config's fields (`LIMITS`), tokens per image, and the size of the model it describes.
    Called from `DiTConfig.validate`, so configs from files, flags and overrides are all bounded."""
    for name in ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels", "num_classes",
                 "caption_channels", "max_tokens"):
        integer(getattr(c, name), name, where)
    number(c.mlp_ratio, "mlp_ratio", where, 1e-3, 64)
    number(c.interpolation_scale, "interpolation_scale", where, 1e-3, 1024)
    if c.num_heads > c.hidden_size:
        raise UserError(f"{where}: num_heads {c.num_heads} is more than hidden_size {c.hidden_size}")
    tokens = (c.input_size // c.patch_size) ** 2
    if tokens > MAX_IMAGE_TOKENS:
        raise UserError(f"{where}: input_size {c.input_size} / patch_size {c.patch_size} gives {tokens:,} tokens "
                        f"per image; at most {MAX_IMAGE_TOKENS:,} are allowed")
    size = model_numbers(c)
    if size > MAX_MODEL_NUMBERS:
        raise UserError(f"{where}: this config describes a model of ~{size:.3g} numbers (depth {c.depth}, width "
                        f"{c.hidden_size}, {c.num_classes:,} classes, {tokens:,} tokens); at most "
                        f"{MAX_MODEL_NUMBERS:.0e} are allowed")


# ----------------------------------------------------------------------------------------------- recipes


_RECIPE_PARTS = ("model", "process", "latents", "conditioning")


def recipe_dict(data: Any, where: str = "recipe") -> None:
    """The shape of a stored recipe before its parts are built: objects where objects belong, and the numbers a
    part turns into arrays (diffusion steps, class names, caption tokens) bounded. Fields' own choices and
    cross-part checks are `Recipe.validate`'s."""
    data = mapping(data, "the recipe", where)
    for part in _RECIPE_PARTS:
        mapping(data.get(part), f"recipe.{part}", where, optional=part != "model")
    process = data.get("process") or {}
    if "kind" in process:
        text(process["kind"], "process.kind", where)
    if process.get("kind", "diffusion") == "diffusion" and "diffusion_steps" in process:
        integer(process["diffusion_steps"], "process.diffusion_steps", where)
    for name in ("train_eps", "sample_eps"):
        if process.get(name) is not None:
            number(process[name], f"process.{name}", where, 0.0, 1.0)
    latents = data.get("latents") or {}
    if "downsample" in latents:
        integer(latents["downsample"], "latents.downsample", where)
    for name in ("scale", "shift"):
        if name in latents:
            number(latents[name], f"latents.{name}", where, -1e6, 1e6)
    cond = data.get("conditioning") or {}
    if cond.get("classes") is not None:
        classes = listing(cond["classes"], "conditioning.classes", where, MAX_CLASSES)
        if not all(isinstance(name, str) and len(name) <= 1024 for name in classes):
            raise UserError(f"{where}: conditioning.classes must be a list of class names (strings)")
    if cond.get("max_tokens") is not None:
        integer(cond["max_tokens"], "conditioning.max_tokens", where)
    for name in ("kind", "text_encoder"):
        if cond.get(name) is not None:
            text(cond[name], f"conditioning.{name}", where)


# ----------------------------------------------------------------------------------------------- diffusers folders

_DIFFUSERS_INTS = {  # config.json key -> the model field whose range it takes
    "num_layers": "depth", "num_attention_heads": "num_heads", "attention_head_dim": "hidden_size",
    "patch_size": "patch_size", "sample_size": "input_size", "in_channels": "in_channels",
    "out_channels": "in_channels", "num_embeds_ada_norm": "num_classes", "caption_channels": "caption_channels",
    "cross_attention_dim": "hidden_size",
}


_NULLABLE = ("out_channels", "cross_attention_dim", "caption_channels", "num_embeds_ada_norm", "patch_size")


def diffusers_config(cfg: Any, where: str) -> Mapping[str, Any]:
    """A diffusers DiT or PixArt transformer `config.json`: each size an integer in its model field's range (null
    where diffusers allows it), the width heads × head_dim bounded, `norm_eps` a small positive number."""
    cfg = mapping(cfg, "config.json", where)
    for key, field in _DIFFUSERS_INTS.items():
        if key in cfg and (cfg[key] is not None or key not in _NULLABLE):
            lo, hi = LIMITS[field]
            integer(cfg[key], key, where, lo, 2 * hi if key == "out_channels" else hi)
    heads, head_dim = cfg.get("num_attention_heads", 16), cfg.get("attention_head_dim", 72)
    lo, hi = LIMITS["hidden_size"]
    if not lo <= heads * head_dim <= hi:
        raise UserError(f"{where}: num_attention_heads × attention_head_dim = {heads * head_dim:,} must be in "
                        f"{lo}..{hi:,}")
    for key in ("norm_eps", "interpolation_scale"):
        if cfg.get(key) is not None:
            number(cfg[key], key, where, 0.0, 1024.0)
    for key in ("norm_type", "activation_fn", "attention_type", "_class_name"):
        if cfg.get(key) is not None:
            text(cfg[key], key, where)
    return cfg


def sidecar(data: Any, where: str) -> Mapping[str, Any]:
    """ditkit's `ditkit_config.json` beside a diffusers config: an object with an object `config` and, when
    present, a recipe."""
    data = mapping(data, "the sidecar", where)
    mapping(data.get("config"), "config", where)
    if data.get("recipe") is not None:
        recipe_dict(data["recipe"], where)
    return data


def weight_index(data: Any, folder: str | os.PathLike, where: str) -> list[Path]:
    """The shard files a `*.safetensors.index.json` names (its `weight_map` values), each inside `folder`."""
    data = mapping(data, "the index", where)
    weight_map = mapping(data.get("weight_map"), "weight_map", where)
    if not weight_map or len(weight_map) > MAX_FILE_ENTRIES:
        raise UserError(f"{where}: weight_map must name 1..{MAX_FILE_ENTRIES:,} tensors")
    names = sorted({str(v) if isinstance(v, str) else "" for v in weight_map.values()})
    return [inside(name, folder, "weight_map entry", where) for name in names]


def vae_config(cfg: Any, where: str) -> tuple[int, float, float]:
    """(downsample, scaling_factor, shift_factor) of an AutoencoderKL `config.json`."""
    cfg = mapping(cfg, "config.json", where)
    blocks = listing(cfg.get("block_out_channels", [0, 0, 0, 0]), "block_out_channels", where, 7)
    scale = cfg.get("scaling_factor") or 0.18215
    shift = cfg.get("shift_factor") or 0.0
    return 2 ** max(len(blocks) - 1, 0), number(scale, "scaling_factor", where, 1e-6, 1e6), \
        number(shift, "shift_factor", where, -1e6, 1e6)


# ----------------------------------------------------------------------------------------------- latent stores


def store_manifest(m: Any, root: str | os.PathLike, where: str) -> Mapping[str, Any]:
    """A latent store's `manifest.json`: counts, classes, latent shape, scale, shard and caption file names
    (inside the store). That the shard counts add up is `LatentStore`'s check (a rerun of extract repairs it)."""
    m = mapping(m, "the manifest", where)
    integer(m.get("count"), "count", where, 0, MAX_STORE_ITEMS)
    integer(m.get("num_classes"), "num_classes", where)
    shape = listing(m.get("latent_shape"), "latent_shape", where, 3)
    if len(shape) != 3:
        raise UserError(f"{where}: latent_shape must be [channels, height, width], got {_shown(shape)}")
    integer(shape[0], "latent_shape[0] (channels)", where, *LIMITS["in_channels"])
    for k in (1, 2):
        integer(shape[k], f"latent_shape[{k}]", where, *LIMITS["input_size"])
    number(m.get("scale"), "scale", where, -1e6, 1e6)
    if "shift" in m:
        number(m["shift"], "shift", where, -1e6, 1e6)
    if m.get("image_size") is not None:
        integer(m["image_size"], "image_size", where, 1, 65_536)
    if m.get("classes") is not None:
        classes = listing(m["classes"], "classes", where, MAX_CLASSES)
        if not all(isinstance(c, str) for c in classes):
            raise UserError(f"{where}: classes must be a list of class names (strings)")
    for k, shard in enumerate(listing(m.get("shards"), "shards", where)):  # their sum is checked on open
        shard = mapping(shard, f"shards[{k}]", where)
        inside(shard.get("file"), root, f"shards[{k}].file", where)
        integer(shard.get("count"), f"shards[{k}].count", where, 0, MAX_STORE_ITEMS)
    if m.get("captions") is not None:
        _captions(m["captions"], len(m["shards"]), root, where)
    if m.get("features") is not None:
        _features(m["features"], len(m["shards"]), root, where)
    if m.get("recipe") is not None:
        recipe_dict({"model": {}, **mapping(m["recipe"], "recipe", where)}, where)
    return m


def _features(info: Any, shards: int, root: str | os.PathLike, where: str) -> None:
    """REPA's stored encoder features (data/feature_store.py): encoder, patch count and width, one file a shard."""
    info = mapping(info, "features", where)
    text(info.get("encoder"), "features.encoder", where)
    integer(info.get("tokens"), "features.tokens", where, 1, 65_536)
    integer(info.get("channels"), "features.channels", where, 1, 65_536)
    if info.get("dtype") != "float16":
        raise UserError(f"{where}: features.dtype must be float16, got {_shown(info.get('dtype'))}")
    files = listing(info.get("files"), "features.files", where)
    if len(files) != shards:
        raise UserError(f"{where}: features.files lists {len(files)} files for {shards} latent shards")
    for k, name in enumerate(files):
        inside(name, root, f"features.files[{k}]", where)


def _captions(info: Any, shards: int, root: str | os.PathLike, where: str) -> None:
    info = mapping(info, "captions", where)
    text(info.get("text_encoder"), "captions.text_encoder", where)
    integer(info.get("max_tokens"), "captions.max_tokens", where, *LIMITS["max_tokens"])
    integer(info.get("channels"), "captions.channels", where, *LIMITS["caption_channels"])
    files = listing(info.get("files"), "captions.files", where)
    if len(files) != shards:
        raise UserError(f"{where}: captions.files lists {len(files)} files for {shards} latent shards")
    for k, name in enumerate(files):
        inside(name, root, f"captions.files[{k}]", where)


_ITEM_BYTES = {"F16": 2, "F32": 4, "I64": 8, "BF16": 2, "F64": 8, "I32": 4, "U8": 1, "BOOL": 1}


def shard_header(header: Any, data_bytes: int, where: str) -> None:
    """A shard's safetensors header: each tensor's shape × item size equals its byte range, inside the file."""
    header = mapping(header, "the header", where)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        info = mapping(info, f"tensor {name!r}", where)
        dtype = info.get("dtype")
        shape = listing(info.get("shape"), f"tensor {name!r} shape", where, 8)
        offsets = listing(info.get("data_offsets"), f"tensor {name!r} data_offsets", where, 2)
        if not isinstance(dtype, str) or dtype not in _ITEM_BYTES or len(offsets) != 2:
            raise UserError(f"{where}: tensor {name!r} has dtype {_shown(dtype)} or offsets {_shown(offsets)}")
        dims = [integer(d, f"tensor {name!r} shape", where, 0, 2**40) for d in shape]
        begin, end = (integer(o, f"tensor {name!r} data_offsets", where, 0, data_bytes) for o in offsets)
        if end - begin != math.prod(dims) * _ITEM_BYTES[dtype]:
            raise UserError(f"{where}: tensor {name!r} of shape {dims} needs {math.prod(dims) * _ITEM_BYTES[dtype]:,}"
                            f" bytes but its data_offsets hold {end - begin:,}; the file is damaged")


# ----------------------------------------------------------------------------------------------- sample folders


def settings_json(data: Any, where: str) -> Mapping[str, Any]:
    """A sample folder's `settings.json`: an object of the sampler's settings (compared, never computed with)."""
    data = mapping(data, "settings", where)
    if data.get("seed") is not None:
        integer(data["seed"], "seed", where, 0, 2**32 - 1)
    if data.get("batch_size") is not None:
        integer(data["batch_size"], "batch_size", where, 1, 2**31)
    return data
