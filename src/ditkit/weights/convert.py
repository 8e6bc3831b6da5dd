"""`ditkit convert`: DiT checkpoints to and from Hugging Face diffusers (`DiTTransformer2DModel`, `DiTPipeline`).

    ditkit convert --to diffusers DiT-XL-2-256x256.pt out/ --vae sd-vae-ft-ema/ --labels imagenet.json
    ditkit convert --to ditkit facebook-DiT-XL-2-256/ dit-xl-2.safetensors

The two layouts hold the same weights with different names:

    ditkit / official                      diffusers (one copy per block i, except the final layer)
    x_embedder.proj                        pos_embed.proj
    t_embedder.mlp.0 / .2                  transformer_blocks.i.norm1.emb.timestep_embedder.linear_1 / linear_2
    y_embedder.embedding_table             transformer_blocks.i.norm1.emb.class_embedder.embedding_table
    blocks.i.adaLN_modulation.1            transformer_blocks.i.norm1.linear
    blocks.i.attn.qkv (fused)              transformer_blocks.i.attn1.to_q / to_k / to_v (or a fused to_qkv)
    blocks.i.attn.proj                     transformer_blocks.i.attn1.to_out.0
    blocks.i.mlp.fc1 / fc2                 transformer_blocks.i.ff.net.0.proj / ff.net.2
    final_layer.adaLN_modulation.1         proj_out_1
    final_layer.linear                     proj_out_2
    pos_embed (fixed 2D sin-cos)           recomputed by diffusers at load time, not stored

Where diffusers' port computes something else than the original DiT (and ditkit):
- Timestep frequencies. DiT uses f_i = 10000^(-i/128), i < 128; diffusers' `CombinedTimestepLabelEmbeddings`
  hard-codes `downscale_freq_shift=1`, i.e. f_i = 10000^(-i/127). No config key changes it, so a stock
  diffusers load of any DiT differs from the original by this; `match_dit_timesteps(model)` sets the shift to 0
  on a loaded diffusers model, after which it computes what ditkit computes to float32 round-off.
- LayerNorm epsilon before the MLP. DiT uses 1e-6 everywhere; diffusers takes that norm's epsilon from
  `norm_eps`, whose default is 1e-5 (a config without the key gets it). ditkit writes `norm_eps: 1e-6`, so
  this one is exact in the folders it writes; elsewhere its effect is at float32 round-off level.
- `DiTPipeline` guidance hard-codes null label 1000 and guides all latent channels (the official sampler
  guides the first 3), and it drops the learned variance before its scheduler.

Text models (PixArt-α) convert to and from `PixArtTransformer2DModel` (the transformer alone); their names
and deviations are in convert_pixart.py.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ditkit.models import build_model
from ditkit.models.config import DiTConfig
from ditkit.models.dit import DiT
from ditkit.models.embeddings import sincos_2d
from ditkit.models.pixart import PixArtDiT
from ditkit.recipe import Recipe
from ditkit.runtime.errors import UserError
from ditkit.runtime.folder_lock import check_writable
from ditkit.runtime.io import apply_umask, atomic_write, disk_full
from ditkit.runtime.path_guard import refuse_overlap
from ditkit.weights import convert_pixart
from ditkit.weights.checkpoints import load_model_with_recipe, save_model
from ditkit.weights.diffusers_folder import (
    SIDECAR,
    WEIGHTS,
    _emb_prefix,
    _read_json,
    config_from_diffusers,
    differences,
    folder_recipe,
    from_diffusers_state_dict,
    read_diffusers_folder,
    transformer_folder,
)

# Beta schedule of the DiT paper (and ADM): linear from 1e-4 to 0.02 over 1000 steps.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")

DIFFERENCES_NOTE = (
    "diffusers' DiT port uses timestep frequencies 10000^(-i/127) where DiT uses 10000^(-i/128) "
    "(call ditkit.weights.convert.match_dit_timesteps(pipe) after loading to compute exactly what ditkit "
    "computes)"
)


# ----------------------------------------------------------------------------------------------- key mapping


def diffusers_config(config: DiTConfig) -> dict[str, Any]:
    """`DiTTransformer2DModel` init arguments that reproduce `config`, every norm epsilon 1e-6 as in DiT."""
    if config.conditioning != "adaln-zero":
        raise UserError(
            f"only adaLN-Zero models convert to diffusers (it has no {config.conditioning!r} variant); "
            "convert a model trained with --conditioning adaln-zero"
        )
    if config.knobs:
        raise UserError(f"diffusers' DiT has no {', '.join(config.knobs)} (LightningDiT's layers); keep the ditkit "
                        "checkpoint, which `ditkit sample` reads")
    return dict(
        **convert_pixart.transformer_args(config, "DiT"),
        num_embeds_ada_norm=config.num_classes,
        norm_type="ada_norm_zero",
    )


def to_diffusers_state_dict(state_dict: Mapping[str, torch.Tensor], config: DiTConfig) -> dict[str, torch.Tensor]:
    """Rename an official/ditkit adaLN-Zero state_dict to diffusers' `DiTTransformer2DModel` keys.

    The shared timestep and label embedders are copied into every block (diffusers keeps one per block). A
    model without a null label row (class_dropout_prob 0) gets a zero row, since diffusers always has one.
    """
    diffusers_config(config)  # refuses what diffusers cannot express
    sd = state_dict
    table = sd["y_embedder.embedding_table.weight"]
    if table.shape[0] == config.num_classes:
        table = torch.cat([table, torch.zeros_like(table[:1])], dim=0)
    expected_pos = torch.from_numpy(sincos_2d(config.hidden_size, config.grid_size)).float().unsqueeze(0)
    if (sd["pos_embed"].float() - expected_pos).abs().max().item() > 1e-5:
        raise UserError(
            "this model's pos_embed is not the fixed 2D sin-cos table, and diffusers recomputes that table "
            "at load time; it cannot be converted"
        )
    out: dict[str, torch.Tensor] = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"],
        "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": sd["final_layer.linear.weight"],
        "proj_out_2.bias": sd["final_layer.linear.bias"],
    }
    for i in range(config.depth):
        emb, blk, dst = _emb_prefix(i), f"blocks.{i}.", f"transformer_blocks.{i}."
        for name in ("weight", "bias"):
            out[emb + f"timestep_embedder.linear_1.{name}"] = sd[f"t_embedder.mlp.0.{name}"]
            out[emb + f"timestep_embedder.linear_2.{name}"] = sd[f"t_embedder.mlp.2.{name}"]
            out[dst + f"norm1.linear.{name}"] = sd[blk + f"adaLN_modulation.1.{name}"]
            q, k, v = sd[blk + f"attn.qkv.{name}"].chunk(3, dim=0)  # the fused layout is [q; k; v]
            out[dst + f"attn1.to_q.{name}"], out[dst + f"attn1.to_k.{name}"], out[dst + f"attn1.to_v.{name}"] = q, k, v
            out[dst + f"attn1.to_out.0.{name}"] = sd[blk + f"attn.proj.{name}"]
            out[dst + f"ff.net.0.proj.{name}"] = sd[blk + f"mlp.fc1.{name}"]
            out[dst + f"ff.net.2.{name}"] = sd[blk + f"mlp.fc2.{name}"]
        out[emb + "class_embedder.embedding_table.weight"] = table
    # Every value is its own tensor: safetensors refuses tensors that share memory.
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- reading


# ----------------------------------------------------------------------------------------------- diffusers side


def _import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise UserError("writing diffusers folders needs diffusers: pip install 'diffusers>=0.27'") from None
    return diffusers


def _dit_class(diffusers: Any) -> Any:
    """`DiTTransformer2DModel` (diffusers >= 0.28), else the `Transformer2DModel` that held DiT before it."""
    return getattr(diffusers, "DiTTransformer2DModel", None) or diffusers.Transformer2DModel


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' info/warning logs (e.g. its advice to install accelerate) while it loads a folder."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


def match_dit_timesteps(model: Any) -> int:
    """Make a loaded diffusers DiT (a `DiTTransformer2DModel` or a `DiTPipeline`) use DiT's timestep frequencies.

    Sets `downscale_freq_shift = 0` on every timestep projection inside, in place; returns how many were
    changed. Afterwards diffusers computes what ditkit (and the original DiT code) computes.
    """
    module = getattr(model, "transformer", model)  # a pipeline holds the network as .transformer
    changed = 0
    for sub in module.modules():
        if type(sub).__name__ == "Timesteps" and hasattr(sub, "downscale_freq_shift"):
            sub.downscale_freq_shift = 0
            changed += 1
    return changed


def to_diffusers_transformer(model: DiT | PixArtDiT) -> torch.nn.Module:
    """A `diffusers.DiTTransformer2DModel` (or, for a text model, `PixArtTransformer2DModel`) holding
    `model`'s weights (in memory, eval mode)."""
    diffusers = _import_diffusers()
    if model.config.is_text:
        net = diffusers.PixArtTransformer2DModel(**convert_pixart.diffusers_config(model.config))
        sd = convert_pixart.to_diffusers_state_dict(model.state_dict(), model.config)
    else:
        net = _dit_class(diffusers)(**diffusers_config(model.config))
        sd = to_diffusers_state_dict(model.state_dict(), model.config)
    net.load_state_dict(sd, strict=True)
    return net.eval()


def random_inputs(config: DiTConfig, batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(x, t, y) for comparisons: N(0, 1) latents, timesteps spread evenly over [0, 1000), random labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=gen)
    t = ((torch.arange(batch) + 0.5) * (1000 / batch)).floor()
    y = torch.randint(0, config.num_classes, (batch,), generator=gen)
    return x, t, y


def output_difference(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float]:
    """Max |Δ|, ‖Δ‖/‖ours‖ (nan when ours is all zero, e.g. a freshly initialised model) and max |ours|."""
    ours, delta = ours.double(), theirs.double() - ours.double()
    scale = ours.norm().item()
    return {
        "max_abs": delta.abs().max().item(),
        "rel_rms": delta.norm().item() / scale if scale > 0 else float("nan"),
        "ref_max": ours.abs().max().item(),
    }


@torch.no_grad()
def compare_outputs(
    model: DiT | PixArtDiT, transformer: torch.nn.Module, batch: int = 4, seed: int = 0
) -> dict[str, float]:
    """`output_difference` between ditkit's `model` and a diffusers DiT (or PixArt) on the same random inputs
    (for text models: captions of different lengths, padded and masked)."""
    if model.config.is_text:
        x, t, y, mask = convert_pixart.random_inputs(model.config, batch, seed=seed)
        ours = model.eval()(x, t, y, mask)
        return output_difference(ours, convert_pixart.diffusers_output(transformer.eval(), x, t, y, mask))
    x, t, y = random_inputs(model.config, batch, seed)
    ours = model.eval()(x, t, y)
    theirs = transformer.eval()(x, timestep=t, class_labels=y).sample
    return output_difference(ours, theirs)


def _labels(path: str | os.PathLike, num_classes: int) -> dict[str, str]:
    """id2label from a JSON object {"0": "tench", ...} or a text file with one label per line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(f"cannot read label file {path}: {err.strerror}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise UserError(f'label file {path} is not valid JSON; use {{"0": "label", ...}}') from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise UserError(f"label file {path} must be a JSON object of id -> label string")
        try:
            labels = {int(k): v for k, v in data.items()}
        except ValueError:
            raise UserError(f"label file {path}: ids must be integers 0..{num_classes - 1}") from None
    else:
        lines = [line.strip() for line in text.rstrip().splitlines()]
        if "" in lines:  # a skipped line would shift every later class id
            raise UserError(f"label file {path}: line {lines.index('') + 1} is empty; give one label per line")
        labels = dict(enumerate(lines))
    bad = [k for k in labels if not 0 <= k < num_classes]
    if bad or not labels:
        raise UserError(f"label file {path}: need labels for ids 0..{num_classes - 1}, got {len(labels)} labels")
    return {str(k): labels[k] for k in sorted(labels)}


def _load_vae(path: str | os.PathLike, in_channels: int) -> Any:
    """A diffusers AutoencoderKL from a VAE folder (or a pipeline's `vae/`), safetensors weights only."""
    diffusers = _import_diffusers()
    path = Path(path)
    sub = {"subfolder": "vae"} if (path / "vae" / "config.json").is_file() else {}
    if not (path / sub.get("subfolder", "") / "config.json").is_file():
        raise UserError(f"--vae {path}: no config.json; give a diffusers AutoencoderKL folder")
    try:
        with _quiet_diffusers():
            vae = diffusers.AutoencoderKL.from_pretrained(str(path), use_safetensors=True, **sub)
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UserError(f"--vae {path}: cannot load an AutoencoderKL with safetensors weights ({first})") from None
    if vae.config.latent_channels != in_channels:
        raise UserError(
            f"--vae {path}: its latents have {vae.config.latent_channels} channels but the model takes {in_channels}"
        )
    return vae


def ddim_scheduler() -> Any:
    """DDIM for DiT's training schedule (linear betas 1e-4 → 0.02, 1000 steps, ε prediction, no clipping)."""
    diffusers = _import_diffusers()
    # set_alpha_to_one and "leading" spacing give the timesteps and final step of the official DDIM respacing.
    return diffusers.DDIMScheduler(
        **SCHEDULE, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=True, steps_offset=0
    )


def _prepare_destination(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not overwrite and not (dst.is_dir() and not any(dst.iterdir())):
        raise UserError(f"{dst} already exists; choose a new path or pass --overwrite")
    _remove_killed_temporaries(dst)


_TEMPORARY = re.compile(r"^\.(?P<name>.+?)\.(?:(?:tmp|old)-(?P<pid>\d+)|(?P<pid2>\d+)\.[^.]+\.tmp)$")


def _remove_killed_temporaries(dst: Path) -> None:
    """Delete what killed conversions to `dst` left next to it (`.DST.tmp-PID`, `.DST.old-PID` and
    `atomic_write`'s `.DST.PID.*.tmp`): only those whose process is gone, as another convert may be running."""
    if not dst.parent.is_dir():
        return
    for leftover in dst.parent.glob(f".{glob.escape(dst.name)}.*"):
        match = _TEMPORARY.match(leftover.name)
        if match is None or match["name"] != dst.name or _process_alive(int(match["pid"] or match["pid2"])):
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or an id this system cannot have: leave its files alone
    return True


def to_diffusers(
    model: DiT | PixArtDiT,
    dst: str | os.PathLike,
    vae: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    overwrite: bool = False,
    recipe: Recipe | None = None,
) -> dict[str, float]:
    """Write `model` as a diffusers folder: the transformer alone, or with `vae` a full `DiTPipeline`.

    The folder is built next to `dst`, loaded back with diffusers and checked against `model` (with DiT's
    timestep frequencies switched on, the outputs must agree to float32 round-off), then moved into place.
    Returns the stock-diffusers difference `compare_outputs` measured on the loaded folder.
    A text model becomes a `PixArtTransformer2DModel` folder, with its null caption in a side file.
    """
    diffusers = _import_diffusers()
    dst = Path(dst)
    refuse_overlap({"the VAE": vae, "the labels": labels}, dst, "the destination")
    _prepare_destination(dst, overwrite)
    text = model.config.is_text
    if text and (vae is not None or labels is not None):
        raise UserError("a text model converts to the transformer alone; --vae and --labels build a class DiTPipeline")
    if labels is not None and vae is None:
        raise UserError("--labels needs --vae: the labels belong to a DiTPipeline, which needs a VAE")
    id2label = _labels(labels, model.config.num_classes) if labels is not None else None
    transformer = to_diffusers_transformer(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if vae is None:
            transformer.save_pretrained(str(tmp), safe_serialization=True)
            sidecar = tmp / SIDECAR
            if text:
                _write_null_caption(model, tmp / convert_pixart.NULL_CAPTION_FILE)
        else:
            pipe = diffusers.DiTPipeline(
                transformer=transformer, vae=_load_vae(vae, model.config.in_channels), scheduler=ddim_scheduler()
            )
            pipe.save_pretrained(str(tmp), safe_serialization=True)
            sidecar = tmp / "transformer" / SIDECAR
            if id2label is not None:
                # DiTPipeline reads id2label from model_index.json but does not save it itself.
                index = _read_json(tmp / "model_index.json")
                index["id2label"] = id2label
                atomic_write(tmp / "model_index.json", lambda p: Path(p).write_text(json.dumps(index, indent=2)))
        meta = {"config": model.config.to_dict(), "note": convert_pixart.NOTE if text else DIFFERENCES_NOTE}
        if recipe is not None:  # read back by `ditkit.load_model_with_recipe` and `--to ditkit`
            meta["recipe"] = recipe.replace(model=model.config).to_dict()
        atomic_write(sidecar, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
        apply_umask(tmp)  # diffusers writes its weights through safetensors, as 0600 files
        stock = _verify_written(model, tmp)
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            os.replace(dst, old)
            os.replace(tmp, dst)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.replace(tmp, dst)
    except Exception as err:
        if disk_full(err, dst.parent):  # measured before the partial folder is removed and its space freed
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"disk full while writing {dst}; the source and any earlier {dst.name} are intact "
                            "(the partial folder was removed); free space and retry") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stock


def _write_null_caption(model: PixArtDiT, path: Path) -> None:
    from safetensors.torch import save_file

    null = {convert_pixart.NULL_CAPTION_KEY: model.y_embedder.y_embedding.detach().float().cpu().contiguous()}
    atomic_write(path, lambda tmp: save_file(null, tmp, metadata={"format": "ditkit"}))


@torch.no_grad()
def _verify_written(model: DiT | PixArtDiT, folder: Path, batch: int = 2) -> dict[str, float]:
    """Load the written transformer back with diffusers: exact after `match_dit_timesteps`, else measured."""
    diffusers = _import_diffusers()
    if model.config.is_text:  # no timestep difference to switch off: the stock model must agree already
        with _quiet_diffusers():
            loaded = diffusers.PixArtTransformer2DModel.from_pretrained(str(folder), use_safetensors=True).eval()
        stock = compare_outputs(model, loaded, batch)
        if stock["max_abs"] > 1e-4 * max(1.0, stock["ref_max"]):
            raise RuntimeError(f"conversion check failed: diffusers differs from ditkit by {stock} (a ditkit bug)")
        return stock
    sub = {"subfolder": "transformer"} if (folder / "transformer").is_dir() else {}
    with _quiet_diffusers():
        loaded = _dit_class(diffusers).from_pretrained(str(folder), use_safetensors=True, **sub).eval()
    x, t, y = random_inputs(model.config, batch)
    ours = model.eval()(x, t, y)
    stock = output_difference(ours, loaded(x, timestep=t, class_labels=y).sample)
    match_dit_timesteps(loaded)
    matched = output_difference(ours, loaded(x, timestep=t, class_labels=y).sample)
    # float32 round-off through a deep network stays far below 1e-4 of the output's size.
    if matched["max_abs"] > 1e-4 * max(1.0, matched["ref_max"]):
        raise RuntimeError(f"conversion check failed: diffusers differs from ditkit by {matched} (a ditkit bug)")
    return stock


# ----------------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", required=True, choices=("diffusers", "ditkit"), help="target format")
    parser.add_argument("src", help="checkpoint (.pt, .safetensors or diffusers folder)")
    parser.add_argument("dst", help="output: a folder (--to diffusers) or a .safetensors file (--to ditkit)")
    parser.add_argument("--vae", help="diffusers AutoencoderKL folder: write a full DiTPipeline with it")
    parser.add_argument("--labels", help='class names for the pipeline: JSON {"0": "tench", ...} or one a line')
    parser.add_argument("--model", help="expected model name, e.g. DiT-XL/2 (default: from the checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument(
        "--use-first-embedder",
        action="store_true",
        help="--to ditkit: keep block 0's embedders when diffusers' per-block copies differ",
    )


def _describe(diff: dict[str, float]) -> str:
    if diff["rel_rms"] != diff["rel_rms"]:  # nan: ditkit's output is zero (an untrained, zero-initialised model)
        return f"max |diff| {diff['max_abs']:.3g} (the model's output is all zero, so no relative figure)"
    return f"{100 * diff['rel_rms']:.3g}% relative RMS (max |diff| {diff['max_abs']:.3g})"


def run(args: argparse.Namespace) -> int:
    dst = Path(args.dst)
    # DST may not be SRC (or the --vae / --labels it reads), hold it, or lie inside it: --overwrite replaces DST.
    refuse_overlap({"SRC": args.src, "--vae": args.vae, "--labels": args.labels}, dst, "DST")
    check_writable(dst.absolute().parent, "DST")  # before minutes of loading and verifying, not after
    if args.to == "diffusers":
        model, recipe = load_model_with_recipe(args.src, model=args.model)
        stock = to_diffusers(model, dst, vae=args.vae, labels=args.labels, overwrite=args.overwrite, recipe=recipe)
        kind = "DiTPipeline" if args.vae else "DiTTransformer2DModel"
        if model.config.is_text:
            kind = convert_pixart.CLASS_NAME
        print(f"wrote {kind} folder {dst} ({model.config.name}, input {model.config.input_size})")
        note = convert_pixart.NOTE if model.config.is_text else DIFFERENCES_NOTE
        print(f"note: {note}; on this model stock diffusers differs from ditkit by {_describe(stock)} on random inputs")
        if args.vae and model.config.num_classes != 1000:
            print(
                f"note: DiTPipeline's guidance uses null label 1000; this model's null label is "
                f"{model.config.num_classes}, so call the pipeline with guidance_scale=1"
            )
        return 0
    if not Path(args.src).is_dir():
        raise UserError(f"--to ditkit reads a diffusers folder; {args.src} is not a folder")
    if args.vae or args.labels:
        raise UserError("--vae and --labels apply to --to diffusers only")
    if dst.suffix != ".safetensors":
        raise UserError(f"--to ditkit writes safetensors; name the output *.safetensors, not {dst.name}")
    _prepare_destination(dst, args.overwrite)
    folder = transformer_folder(args.src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the differences are printed below, measured
        state_dict, config, _ = read_diffusers_folder(args.src, allow_embedder_mismatch=args.use_first_embedder)
    if args.model is not None and args.model != config.name:
        raise UserError(f"{args.src} holds a {config.name}, not {args.model}")
    model = build_model(config)
    model.load_state_dict(state_dict, strict=True)
    save_model(model.eval(), dst, metadata={"converted_from": "diffusers"}, recipe=folder_recipe(args.src, config))
    print(f"wrote {dst} ({config.name}{', text' if config.is_text else ''}, input {config.input_size})")
    if config.is_text:
        print(f"note: {convert_pixart.NOTE}")
        if not (folder / convert_pixart.NULL_CAPTION_FILE).is_file():
            print("note: this folder has no null caption (stock diffusers): ditkit set it to zeros; guide with "
                  "--negative-prompt '' as diffusers' pipeline does")
    else:
        notes = differences(_read_json(folder / "config.json"))
        print("note: ditkit computes the original DiT; diffusers' port of this model has " + "; ".join(notes))
    measured = _measure_source(model, folder)
    if measured is not None:
        print(f"note: on random inputs diffusers' output differs from ditkit's by {_describe(measured)}")
    return 0


def _measure_source(model: DiT | PixArtDiT, folder: Path) -> dict[str, float] | None:
    """The stock-diffusers vs ditkit difference of a source folder, when diffusers can load it safely."""
    try:
        import diffusers
    except ImportError:
        return None
    if not any(folder.glob(f"{WEIGHTS}*.safetensors")):
        return None  # diffusers would unpickle a .bin; ditkit read it with weights_only instead
    try:
        with _quiet_diffusers():
            cls = diffusers.PixArtTransformer2DModel if model.config.is_text else _dit_class(diffusers)
            loaded = cls.from_pretrained(str(folder), use_safetensors=True)
        return compare_outputs(model, loaded)
    except (OSError, ValueError, RuntimeError, TypeError):
        return None  # the measurement is a courtesy; the converted file is already written and correct


__all__ = [
    "compare_outputs",
    "config_from_diffusers",
    "ddim_scheduler",
    "differences",
    "diffusers_config",
    "from_diffusers_state_dict",
    "match_dit_timesteps",
    "output_difference",
    "random_inputs",
    "read_diffusers_folder",
    "to_diffusers",
    "to_diffusers_state_dict",
    "to_diffusers_transformer",
    "transformer_folder",
]
