"""Gaussian diffusion for DiT: the process, its losses, respacing, samplers and classifier-free guidance.

    from ditkit.diffusion import create_diffusion
    diffusion = create_diffusion("")                 # training: T = 1000, linear, learned σ (DiT's defaults)
    losses = diffusion.training_losses(model, x, t, model_kwargs=dict(y=y))   # {"loss", "mse", "vb"}, N each
    sampler = create_diffusion("250")                # 250 respaced steps for DDPM sampling

`create_diffusion` takes the same arguments as the official DiT's, so its scripts port by changing the import.
"""

from __future__ import annotations

from ditkit.diffusion.gaussian import (
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    get_beta_schedule,
    mean_flat,
    normal_kl,
)
from ditkit.diffusion.respace import SpacedDiffusion, space_timesteps

__all__ = [
    "GaussianDiffusion",
    "SpacedDiffusion",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "get_beta_schedule",
    "mean_flat",
    "normal_kl",
    "space_timesteps",
]


def create_diffusion(
    timestep_respacing: str | int | list[int] | None,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
    prediction: str | None = None,
) -> SpacedDiffusion:
    """The official DiT's `create_diffusion`, same arguments and defaults, plus `prediction`.

    timestep_respacing: "" or None for all `diffusion_steps`; "250", "10,15,20", "ddim50" or a list of counts.
    noise_schedule: "linear" or "cosine" ("squaredcos_cap_v2"). learn_sigma: Improved DDPM's learned range
    (the model outputs 2C channels); otherwise fixed β_t ("sigma_small": β̃_t). use_kl: train on L_vlb alone;
    rescale_learned_sigmas: scale L_vlb by T/1000. prediction: "epsilon" (default), "x0" (= predict_xstart)
    or "v".
    """
    betas = get_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = "rescaled_kl"
    elif rescale_learned_sigmas:
        loss_type = "rescaled_mse"
    else:
        loss_type = "mse"
    if prediction is None:
        prediction = "x0" if predict_xstart else "epsilon"
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if sigma_small else "fixed_large"
    return SpacedDiffusion(
        space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        mean_type=prediction,
        var_type=var_type,
        loss_type=loss_type,
    )
