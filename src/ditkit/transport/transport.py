"""SiT's `Transport` (the training objective) and `Sampler` (its ODE and SDE samplers), same names and arguments.

Time runs from noise (t = 0) to data (t = 1); x_t = α_t·x1 + σ_t·x0 (see `path`). The model is called as
`model(x, t, **model_kwargs)` with t ∈ [0, 1] as a float tensor of shape (N,), as SiT's network is; a model that
also returns learned-variance channels (a DiT with `learn_sigma`, e.g. the released SiT-XL/2 files: 2C output
channels) has its first C channels used and the rest ignored, as SiT's network does internally.

Additions over SiT's API, all keyword-only with defaults that give SiT's behaviour: `training_losses(t=, x0=)`
(given draws, for a reproducible training loop), `t_sampling="lognormal"` (SD3's logit-normal times),
`shift=` on the samplers (SD3's timestep shift of the grid), `generator=` for the SDE noise. Settings that give
infinities in SiT (NaN samples) are refused with one line instead; see `create_transport` and `sample_sde`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ditkit.runtime.errors import UserError
from ditkit.transport.path import GVPCPlan, ICPlan, VPCPlan, expand_t_like_x


class ModelType(enum.Enum):
    """What the network predicts."""

    NOISE = enum.auto()  # x0 (SiT calls the Gaussian end "noise")
    SCORE = enum.auto()  # ∇ log p_t(x)
    VELOCITY = enum.auto()  # d x_t / dt


class PathType(enum.Enum):
    LINEAR = enum.auto()
    GVP = enum.auto()
    VP = enum.auto()


class WeightType(enum.Enum):
    """The loss weight for noise and score predictions (velocity is always unweighted)."""

    NONE = enum.auto()
    VELOCITY = enum.auto()  # (w/σ)²: the score/noise loss measured in velocity units
    LIKELIHOOD = enum.auto()  # w/σ²: the weighting whose loss bounds the negative log-likelihood


PATH_CLASSES = {PathType.LINEAR: ICPlan, PathType.GVP: GVPCPlan, PathType.VP: VPCPlan}


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """The mean over every dimension but the first."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def first_channels(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The model's prediction for x: all of `out`, or its first C channels when it has 2C (learned variance)."""
    if out.shape == x.shape:
        return out
    if out.ndim == x.ndim and out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
        return out[:, : x.shape[1]]
    raise ValueError(f"model output of shape {tuple(out.shape)} does not fit input {tuple(x.shape)}")


def shifted_grid(
    t_start: float, t_end: float, num: int, shift: float = 1.0, *, dtype=torch.float32, device=None
) -> torch.Tensor:
    """`num` times from t_start to t_end; with shift ≠ 1, warped as SD3's timestep shift.

    SD3 maps a noise level s = 1 − t to shift·s / (1 + (shift − 1)·s): shift > 1 puts more of the steps at
    high noise, which helps at high resolution. It is applied to the fraction of the way from the noise end,
    so the grid still starts and ends at t_start and t_end (eps handling unchanged).
    """
    u = torch.linspace(0.0, 1.0, num, dtype=torch.float64)
    if shift != 1.0:
        if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
            raise UserError(f"timestep shift must be a positive number, got {shift!r}")
        warp = lambda v: 1 - shift * (1 - v) / (1 + (shift - 1) * (1 - v))  # noqa: E731
        u = warp(u) if t_end >= t_start else 1 - warp(1 - u)
    if shift == 1.0:  # SiT's grid exactly: torch.linspace over [t_start, t_end]
        return torch.linspace(t_start, t_end, num, dtype=dtype, device=device)
    return (t_start + (t_end - t_start) * u).to(dtype=dtype, device=device)


class Transport:
    """The interpolant objective and the model-to-drift conversions for one (path, prediction, weighting)."""

    def __init__(
        self, *, model_type: ModelType, path_type: PathType, loss_type: WeightType, train_eps: float,
        sample_eps: float, t_sampling: str = "uniform", t_mean: float = 0.0, t_std: float = 1.0,
        cosine_weight: float = 0.0,
    ):
        self.model_type, self.path_type, self.loss_type = model_type, path_type, loss_type
        self.path_sampler = PATH_CLASSES[path_type]()
        self.train_eps, self.sample_eps = train_eps, sample_eps
        if t_sampling not in ("uniform", "lognormal"):
            raise UserError(f"unknown t_sampling {t_sampling!r}; use 'uniform' or 'lognormal'")
        self.t_sampling = t_sampling
        self.t_mean, self.t_std = float(t_mean), float(t_std)  # lognormal: sigmoid(N(t_mean, t_std²))
        self.cosine_weight = float(cosine_weight)  # velocity: LightningDiT's direction term (use_cosine_loss)

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I) per sample."""
        dims = z[0].numel()
        return -dims / 2.0 * math.log(2 * math.pi) - (z.flatten(1) ** 2).sum(dim=1) / 2.0

    def check_interval(
        self, train_eps: float, sample_eps: float, *, diffusion_form: str = "SBDM", sde: bool = False,
        reverse: bool = False, eval: bool = False, last_step_size: float = 0.0,
    ) -> tuple[float, float]:
        """The time interval [t0, t1] to train or sample on, as SiT chooses it.

        Where the model or the path is singular (VP at t = 1, where σ = 0 and σ' is infinite; noise and score
        predictions, which divide by σ at t = 1 and by α at t = 0) the ends are pulled in by eps; an SDE stops at
        1 − last_step_size and takes its last step separately. reverse runs the interval backwards (data → noise).
        """
        t0, t1 = 0.0, 1.0
        eps = sample_eps if eval else train_eps
        velocity = self.model_type == ModelType.VELOCITY
        end = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        if self.path_type == PathType.VP:
            t1 = end
        elif not velocity or sde:
            t0 = eps if (sde and diffusion_form == "SBDM") or not velocity else 0.0
            t1 = end
        if reverse:
            # SiT mirrors the times (1 − t0, 1 − t1); that is the same interval run backwards for every
            # symmetric one, but for VP it would start at t = 1, where the path is singular. Run it backwards.
            t0, t1 = t1, t0
        return t0, t1

    def times_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """Training times in [t0, t1] from uniform draws u ∈ [0, 1): uniform (SiT), or logit-normal (SD3,
        LightningDiT: sigmoid of a normal N(t_mean, t_std²), by the inverse CDF so that one uniform draw makes one
        t)."""
        t0, t1 = self.check_interval(self.train_eps, self.sample_eps)
        if self.t_sampling == "lognormal":
            u = torch.sigmoid(self.t_mean + self.t_std * math.sqrt(2.0) * torch.erfinv(2 * u - 1))
        return u * (t1 - t0) + t0

    def sample_t(self, n: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """n training times drawn as `times_from_uniform` describes."""
        return self.times_from_uniform(torch.rand((n,), generator=generator, device=device))

    def sample(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SiT's draw for a training batch: (t, x0 ~ N(0, I), x1), from the global generators."""
        x0 = torch.randn_like(x1)
        return self.sample_t(x1.shape[0]).to(x1), x0, x1

    def training_losses(
        self, model: Callable[..., torch.Tensor], x1: torch.Tensor, model_kwargs: dict | None = None, *,
        t: torch.Tensor | None = None, x0: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """{"loss": per-sample loss (N,), "mse": the same unweighted, "pred": the model's prediction} for data x1.

        t (N,) and x0 (like x1) are drawn as SiT does unless given. velocity: |v̂ − u_t|²; noise: w·|x̂0 − x0|²;
        score: w·|σ·ŝ + x0|², with w from the loss weight (see `WeightType`); means over all but the batch dim.
        """
        model_kwargs = model_kwargs or {}
        if t is None or x0 is None:
            t_drawn, x0_drawn, _ = self.sample(x1)
            t = t_drawn if t is None else t
            x0 = x0_drawn if x0 is None else x0
        t, xt, ut = self.path_sampler.plan(t.to(x1), x0, x1)
        pred = first_channels(model(xt, t, **model_kwargs), xt)
        if self.model_type == ModelType.VELOCITY:
            mse = mean_flat((pred - ut) ** 2)
            if self.cosine_weight:  # 1 − cos over the channels at each position, averaged (LightningDiT)
                cos = mean_flat(1 - F.cosine_similarity(pred, ut, dim=1))
                return {"loss": mse + self.cosine_weight * cos, "mse": mse, "cos": cos, "pred": pred}
            return {"loss": mse, "mse": mse, "pred": pred}
        _, drift_var = self.path_sampler.compute_drift(xt, t)
        sigma = self.path_sampler.compute_sigma_t(expand_t_like_x(t, xt))[0]
        if self.loss_type == WeightType.VELOCITY:
            weight = (drift_var / sigma) ** 2
        elif self.loss_type == WeightType.LIKELIHOOD:
            weight = drift_var / sigma**2
        else:
            weight = 1.0
        err = (pred - x0) ** 2 if self.model_type == ModelType.NOISE else (pred * sigma + x0) ** 2
        return {"loss": mean_flat(weight * err), "mse": mean_flat(err), "pred": pred}

    def get_drift(self) -> Callable[..., torch.Tensor]:
        """The probability-flow velocity f(x, t, model, **kw) for this transport's model type."""
        path = self.path_sampler

        def drift(x: torch.Tensor, t: torch.Tensor, model: Any, **model_kwargs: Any) -> torch.Tensor:
            out = first_channels(model(x, t, **model_kwargs), x)
            if self.model_type == ModelType.VELOCITY:
                return out
            drift_mean, drift_var = path.compute_drift(x, t)
            score = out if self.model_type == ModelType.SCORE else out / -path.compute_sigma_t(expand_t_like_x(t, x))[0]
            return -drift_mean + drift_var * score

        return drift

    def get_drift_and_score(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """(velocity, score) from ONE model evaluation, for the SDE (SiT evaluates the model once for each)."""
        path = self.path_sampler

        def drift_and_score(x: torch.Tensor, t: torch.Tensor, model: Any, **model_kwargs: Any):
            out = first_channels(model(x, t, **model_kwargs), x)
            if self.model_type == ModelType.VELOCITY:
                return out, path.get_score_from_velocity(out, x, t)
            score = out if self.model_type == ModelType.SCORE else out / -path.compute_sigma_t(expand_t_like_x(t, x))[0]
            drift_mean, drift_var = path.compute_drift(x, t)
            return -drift_mean + drift_var * score, score

        return drift_and_score

    def get_score(self) -> Callable[..., torch.Tensor]:
        """The score ∇log p_t(x) as a function (x, t, model, **kw), from whatever the model predicts."""
        path = self.path_sampler

        def score(x: torch.Tensor, t: torch.Tensor, model: Any, **model_kwargs: Any) -> torch.Tensor:
            out = first_channels(model(x, t, **model_kwargs), x)
            if self.model_type == ModelType.SCORE:
                return out
            if self.model_type == ModelType.NOISE:
                return out / -path.compute_sigma_t(expand_t_like_x(t, x))[0]
            return path.get_score_from_velocity(out, x, t)

        return score
