"""Flow matching with SiT's stochastic interpolants: paths, the training loss, ODE/SDE samplers.

    from ditkit.transport import create_transport, Sampler
    transport = create_transport("Linear", "velocity")          # SiT's defaults
    loss = transport.training_losses(model, x1, dict(y=y))["loss"].mean()
    sample_fn = Sampler(transport).sample_ode(sampling_method="dopri5", num_steps=50)
    x = sample_fn(z, model.forward_with_cfg, y=y, cfg_scale=4.0)[-1]

The names, arguments, defaults and time convention (t = 0 noise, t = 1 data) are those of SiT's `transport`
package (Ma et al. 2024, github.com/willisma/SiT), so its scripts port by changing the import.
"""

from __future__ import annotations

from ditkit.runtime.errors import UserError
from ditkit.transport.path import GVPCPlan, ICPlan, VPCPlan, expand_t_like_x
from ditkit.transport.sampler import Sampler
from ditkit.transport.transport import (
    ModelType,
    PathType,
    Transport,
    WeightType,
    first_channels,
    mean_flat,
    shifted_grid,
)

__all__ = [
    "GVPCPlan",
    "ICPlan",
    "ModelType",
    "PathType",
    "Sampler",
    "Transport",
    "VPCPlan",
    "WeightType",
    "create_transport",
    "expand_t_like_x",
    "first_channels",
    "mean_flat",
    "shifted_grid",
]

_PREDICTIONS = {"velocity": ModelType.VELOCITY, "noise": ModelType.NOISE, "score": ModelType.SCORE}
_WEIGHTS = {None: WeightType.NONE, "velocity": WeightType.VELOCITY, "likelihood": WeightType.LIKELIHOOD}
_PATHS = {"Linear": PathType.LINEAR, "GVP": PathType.GVP, "VP": PathType.VP}


def create_transport(
    path_type: str = "Linear",
    prediction: str = "velocity",
    loss_weight: str | None = None,
    train_eps: float | None = None,
    sample_eps: float | None = None,
    t_sampling: str = "uniform",
    t_mean: float = 0.0,
    t_std: float = 1.0,
    cosine_weight: float = 0.0,
) -> Transport:
    """SiT's `create_transport`: same arguments, defaults and eps rules.

    path_type: "Linear" | "GVP" | "VP". prediction: "velocity" | "noise" | "score". loss_weight (noise/score
    only): None | "velocity" | "likelihood". train_eps / sample_eps: how far training times and the sampling
    interval stay from the singular ends; None takes SiT's defaults — VP: 1e-5 for training, 1e-3 for sampling;
    Linear/GVP with noise or score: 1e-3 and 1e-3; Linear/GVP with velocity: 0 and 0 (regular everywhere, and
    SiT then ignores given values). t_sampling (ditkit's addition): "uniform" (SiT) | "lognormal" (SD3), the latter
    sigmoid(N(t_mean, t_std²)); cosine_weight (velocity only): LightningDiT's velocity-direction loss term.

    Refused with one line, where SiT silently ignores or divides by zero: unknown names; a loss weight with
    velocity prediction; an eps of 0 (or below) where the path or prediction needs one (VP, noise, score).
    """
    if path_type not in _PATHS:
        raise UserError(f"unknown path_type {path_type!r}; use one of: {', '.join(_PATHS)}")
    if prediction not in _PREDICTIONS:
        raise UserError(f"unknown prediction {prediction!r}; use one of: {', '.join(_PREDICTIONS)}")
    if loss_weight not in _WEIGHTS:
        raise UserError(f"unknown loss_weight {loss_weight!r}; use None, 'velocity' or 'likelihood'")
    if cosine_weight and prediction != "velocity":
        raise UserError("the velocity-direction (cosine) loss needs prediction velocity; drop --loss-cosine-weight")
    if loss_weight is not None and prediction == "velocity":
        raise UserError(
            f"loss_weight {loss_weight!r} applies to noise or score predictions only (SiT ignores it for "
            "velocity); drop it or choose --prediction noise|score"
        )
    needs_eps = path_type == "VP" or prediction != "velocity"
    if needs_eps:
        # SiT's defaults. SiT ties sample_eps's default to whether train_eps was given (a sample_eps given alone
        # is replaced by 1e-3; a train_eps given alone leaves sample_eps None, which fails later); here each
        # value given is used and each one missing takes its default.
        train_default = 1e-5 if path_type == "VP" else 1e-3
        train_eps = train_default if train_eps is None else train_eps
        sample_eps = 1e-3 if sample_eps is None else sample_eps
        for name, value in (("train_eps", train_eps), ("sample_eps", sample_eps)):
            if not value > 0:
                raise UserError(
                    f"{name} {value!r}: path {path_type} with prediction {prediction} is singular at the ends "
                    f"(it divides by σ_t = 0 or α_t = 0); give a small positive {name} such as 1e-3, or leave it unset"
                )
    else:
        train_eps, sample_eps = 0.0, 0.0  # velocity on Linear/GVP is regular on all of [0, 1]
    return Transport(
        model_type=_PREDICTIONS[prediction], path_type=_PATHS[path_type], loss_type=_WEIGHTS[loss_weight],
        train_eps=float(train_eps), sample_eps=float(sample_eps), t_sampling=t_sampling, t_mean=t_mean, t_std=t_std,
        cosine_weight=cosine_weight,
    )
