"""LightningDiT's files (github hustvl/LightningDiT) read as ditkit recipes.

Its training checkpoints are `{"model", "ema", "opt", "config"}` with `config` the whole YAML of the run; its
state dicts use the names of `models/lightningdit.py`, which ditkit's modern-recipe layers keep
(`models/knobs.py`), so the weights load strictly into a `DiT` whose config has the same switches. This module
turns the YAML (or, for a bare state dict, LightningDiT's released defaults) into the recipe ditkit records:

    transport.use_lognorm       → process.t_sampling "lognormal" (t = sigmoid(N(0, 1)))
    transport.use_cosine_loss   → process.cosine_weight 1 (train.py adds the two means with weight 1)
    sample.timestep_shift s     → sampling.time_shift 1/s (LightningDiT warps t, 1 = data; ditkit the noise level)
    sample.cfg_interval_start a → sampling.guidance_interval (a, 1): guided where t ≥ a (t = 1 is data)
    data.latent_multiplier, vae → latents.scale, latents.vae / downsample (its VA-VAE is not in ditkit; the
                                  channel statistics live in its separate latents_stats.pt: give them by hand)

Not reproduced: `wo_shift` models (adaLN without shift; the released model has it off) and its guidance on the
first three output channels only when sampling with `forward_with_cfg` (ditkit's `--guide-channels 3` does
the same).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ditkit.models.config import DiTConfig
from ditkit.recipe import FlowProcess, LatentSpace, Recipe, SamplingDefaults
from ditkit.runtime.errors import UserError

# The released LightningDiT-XL/1's settings (configs/lightningdit_xl_vavae_f16d32.yaml).
RELEASED = {"timestep_shift": 0.3, "cfg_interval_start": 0.11, "use_lognorm": True, "use_cosine_loss": True}


def is_train_config(obj: Any) -> bool:
    """True for the `config` entry of a LightningDiT training checkpoint (the run's whole YAML)."""
    model = obj.get("model") if isinstance(obj, Mapping) else None
    return isinstance(model, Mapping) and str(model.get("model_type", "")).startswith("LightningDiT")


def _sampling(sample: Mapping[str, Any]) -> SamplingDefaults:
    shift = float(sample.get("timestep_shift") or 0.0)
    start = float(sample.get("cfg_interval_start") or 0.0)
    return SamplingDefaults(time_shift=1.0 / shift if shift > 0 else 1.0,
                            guidance_interval=(start, 1.0) if start > 0 else None)


def recipe_from_config(config: Mapping[str, Any], model: DiTConfig) -> Recipe:
    """The recipe of a LightningDiT checkpoint from its stored YAML, for the model built from its weights."""
    transport = dict(config.get("transport") or {})
    if transport.get("prediction", "velocity") != "velocity" or transport.get("path_type", "Linear") != "Linear":
        raise UserError("this LightningDiT checkpoint uses a transport other than Linear/velocity, which ditkit does "
                        "not read from its YAML; load the weights alone and pass --objective flow")
    process = FlowProcess(t_sampling="lognormal" if transport.get("use_lognorm") else "uniform",
                          cosine_weight=1.0 if transport.get("use_cosine_loss") else 0.0)
    data, vae = dict(config.get("data") or {}), dict(config.get("vae") or {})
    scale, factor = float(data.get("latent_multiplier", 1.0)), int(vae.get("downsample_ratio", 16))
    latents = LatentSpace(vae=str(vae.get("model_name") or "vavae_f16d32"), scale=scale, downsample=factor)
    sampling = _sampling(dict(config.get("sample") or {}))
    return Recipe(model=model, process=process, latents=latents, sampling=sampling)


def released_recipe(model: DiTConfig, latents: LatentSpace) -> Recipe:
    """The recipe of a bare LightningDiT state dict (no YAML): flow matching with its released settings."""
    process = FlowProcess(t_sampling="lognormal", cosine_weight=1.0)
    return Recipe(model=model, process=process, latents=latents, sampling=_sampling(RELEASED))
