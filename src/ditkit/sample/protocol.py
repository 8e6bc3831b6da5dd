"""The evaluation protocol a sample folder was made with, beside its samples (settings.json's "protocol").

`Sampler.settings()` holds what determines each image (model, weights, sampler, steps, guidance, interval,
shift, precision, cache, ...) and is compared when a run resumes. The protocol adds what changes the score
without changing any one image — the number of samples, the label distribution, the image size, the VAE's scale
and decoder dtype, the preset and the flags that overrode it — plus where it ran. It is informational: a run
that extends a folder to more samples rewrites it. `ditkit evaluate` prints it beside the numbers.
"""

from __future__ import annotations

from typing import Any

import torch

PROTOCOL_VERSION = 1


def decoder_dtype(sampler: Any) -> str | None:
    """How the VAE decoded: its weights' dtype, or bf16 autocast over fp32 weights (a CPU run in bf16)."""
    if sampler.vae is None:
        return None
    if getattr(sampler.vae, "dtype", None) == torch.bfloat16:
        return "bf16"
    return "bf16-autocast" if sampler.precision in ("bf16", "fp8") else "fp32"


def protocol(sampler: Any, num_samples: int, seed: int, labels: str | None = None) -> dict[str, Any]:
    """The protocol of `num_samples` samples from `sampler` with `seed`; `labels` says how they were conditioned
    (default: class labels uniform, as `sample.npz.shard_labels` draws them)."""
    import ditkit

    config = sampler.model.config
    factor = getattr(sampler.vae, "downsample", 1) if sampler.vae is not None else 1
    latents = sampler.recipe.latents
    return {
        "version": PROTOCOL_VERSION,
        "num_samples": int(num_samples),
        "labels": labels or f"uniform over {config.num_classes} classes",
        "image_size": int(config.input_size * factor),
        "seed": int(seed),
        "vae": None if sampler.vae is None else str(getattr(sampler.vae, "name", "vae")),
        "vae_scale": None if latents.is_pixels else latents.scale,
        "decoder_dtype": decoder_dtype(sampler),
        "precision": sampler.precision,
        "cache": sampler.cache,
        "preset": sampler.preset,
        "preset_overrides": list(sampler.preset_overrides),
        "device": torch.device(sampler.device).type,
        "torch": torch.__version__,
        "ditkit": getattr(ditkit, "__version__", None),
    }
