"""The Gaussian diffusion process of DiT (DDPM with Improved-DDPM's learned variance range).

Everything here follows the guided-diffusion code that the official DiT uses, constant for constant, so losses
and samples agree with it to float round-off:

- schedules are built in float64 numpy; a coefficient is looked up per sample and cast to float32 (float64
  when the input is float64) before it meets a tensor, as the reference's `_extract_into_tensor` does;
- the posterior log-variance is "clipped": its t=0 entry (log 0) is replaced by the t=1 entry;
- a learned-range model outputs v ∈ [-1, 1] per element and log σ² = frac·log β_t + (1−frac)·log β̃_t with
  frac = (v + 1) / 2;
- the hybrid loss is L_simple (MSE on ε) + L_vlb, where L_vlb sees a stop-gradient mean so that it trains only
  the variance; with `loss_type="rescaled_mse"` L_vlb is multiplied by T/1000.

Timesteps `t` are integer indices 0…T−1 into this process ("0 means one step of noise"). A respaced process
(`ditkit.diffusion.respace`) keeps a `timestep_map` and hands the model the ORIGINAL indices, as the
reference's wrapped model does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ditkit.runtime.errors import UserError

Model = Callable[..., torch.Tensor]
Shape = tuple[int, ...] | list[int]
Device = torch.device | str | None
Denoise = Callable[[torch.Tensor], torch.Tensor] | None

MEAN_TYPES = ("epsilon", "x0", "v")
VAR_TYPES = ("learned_range", "fixed_small", "fixed_large")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")
SCHEDULES = ("linear", "cosine")


# ----------------------------------------------------------------------------------------------- schedules


def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """Float64 betas discretising ᾱ(s), s ∈ [0, 1]: β_i = min(1 − ᾱ((i+1)/T)/ᾱ(i/T), max_beta)."""
    return np.array(
        [min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)],
        dtype=np.float64,
    )


def get_beta_schedule(name: str, num_steps: int = 1000) -> np.ndarray:
    """The named schedule as float64 betas.

    "linear": Ho et al.'s 1e-4 → 0.02 over 1000 steps, both ends scaled by 1000/T for other T.
    "cosine" (alias "squaredcos_cap_v2"): Nichol & Dhariwal's ᾱ(s) = cos²((s + 0.008)/1.008 · π/2), β ≤ 0.999.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise UserError(f"the number of diffusion steps must be a positive integer, got {num_steps!r}")
    if name == "linear":
        scale = 1000 / num_steps
        return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)
    if name in ("cosine", "squaredcos_cap_v2"):
        return betas_for_alpha_bar(num_steps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise UserError(f"unknown noise schedule {name!r}; use one of: {', '.join(SCHEDULES)}")


# ----------------------------------------------------------------------------------------------- helpers


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch one: N×… → N."""
    return x.mean(dim=list(range(1, x.ndim)))


def coef_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of coefficients meeting `x`: float32 as in the reference, float64 for float64 input."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def extract(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample entries table[t] (a float64 table on t's device) shaped N×1×…×1 to broadcast against `like`."""
    values = table[t.long()].to(coef_dtype(like))
    return values.view(-1, *([1] * (like.ndim - 1)))


def normal_kl(mean1: Any, logvar1: Any, mean2: Any, logvar2: Any) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats; scalars broadcast."""
    ref = next(v for v in (mean1, logvar1, mean2, logvar2) if isinstance(v, torch.Tensor))
    logvar1, logvar2 = (v if isinstance(v, torch.Tensor) else torch.tensor(v).to(ref) for v in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) by the tanh approximation the reference uses (error < 3e-4), kept for identical likelihoods."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log P(x) in nats of 8-bit data x ∈ [-1, 1] (bins of width 2/255) under N(means, e^(2·log_scales)).

    The two edge bins extend to ±∞. Probabilities are floored at 1e-12 before the log, as in the reference.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(
            f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, scales {tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# ----------------------------------------------------------------------------------------------- the process


class GaussianDiffusion:
    """A discrete Gaussian diffusion over `betas` (float64, T entries), and its training loss and samplers.

    mean_type: what the model's first C output channels predict: "epsilon" (DiT), "x0" or "v"
    (v = α·ε − σ·x₀).
    var_type: "learned_range" (the model outputs 2C channels, DiT), "fixed_small" (β̃_t) or
    "fixed_large" (β_t).
    loss_type: "mse" (L_simple, + L_vlb when the variance is learned), "rescaled_mse" (L_vlb × T/1000),
    "kl" (L_vlb alone, bits per dim) or "rescaled_kl" (× T).
    timestep_map: for a respaced process, the original timestep index of each step; the model gets those.
    """

    def __init__(
        self,
        *,
        betas: np.ndarray,
        mean_type: str = "epsilon",
        var_type: str = "learned_range",
        loss_type: str = "mse",
        timestep_map: list[int] | np.ndarray | None = None,
    ):
        for value, allowed, what in (
            (mean_type, MEAN_TYPES, "prediction"),
            (var_type, VAR_TYPES, "variance"),
            (loss_type, LOSS_TYPES, "loss"),
        ):
            if value not in allowed:
                raise UserError(f"unknown {what} type {value!r}; use one of: {', '.join(allowed)}")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 2 or not ((betas > 0).all() and (betas <= 1).all()):
            raise UserError("betas must be a 1-D array of at least 2 values in (0, 1]; use at least 2 steps")
        self.mean_type, self.var_type, self.loss_type = mean_type, var_type, loss_type
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = np.asarray(
            timestep_map if timestep_map is not None else np.arange(self.num_timesteps), dtype=np.int64
        )

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0) = N(coef1·x_0 + coef2·x_t, β̃_t)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0: its log is replaced by log β̃_1 so that the learned range and the KL stay finite.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # Derived tables looked up per step, built once here (a new array per call would also be a new copy).
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.log_betas = np.log(betas)
        # "fixed_large": β_t, except β̃_1 at t=0 for a better decoder likelihood (the reference's choice).
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self._device_tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    def table(self, name: str, device: torch.device) -> torch.Tensor:
        """The numpy table `name` as a tensor on `device`, copied there once and kept on this object: a copy
        from pageable host memory on every lookup would make the host wait for the GPU at each step."""
        key = (name, device)
        hit = self._device_tables.get(key)
        if hit is None:
            hit = self._device_tables[key] = torch.from_numpy(np.ascontiguousarray(getattr(self, name))).to(device)
        return hit

    def _coef(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Entries t of table `name`, shaped to broadcast against `like`, in its coefficient dtype."""
        return extract(self.table(name, t.device), t, like)

    # --------------------------------------------------------------------------------------- forward process

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Mean, variance and log-variance of q(x_t | x_0), each broadcast to x_start's shape."""
        mean = self._coef("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._coef("one_minus_alphas_cumprod", t, x_start).expand_as(x_start)
        log_variance = self._coef("log_one_minus_alphas_cumprod", t, x_start).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(√ᾱ_t·x_0, (1 − ᾱ_t)·I), using the standard normal `noise` if given."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_start shape {tuple(x_start.shape)}")
        return (
            self._coef("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._coef("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0)."""
        mean = self._coef("posterior_mean_coef1", t, x_t) * x_start + self._coef("posterior_mean_coef2", t, x_t) * x_t
        variance = self._coef("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._coef("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------------------------------- conversions

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x̂_0 = x_t/√ᾱ_t − √(1/ᾱ_t − 1)·ε."""
        return (
            self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._coef("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        """ε̂ = (x_t/√ᾱ_t − x̂_0) / √(1/ᾱ_t − 1)."""
        return (self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart) / self._coef(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    def predict_xstart_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x̂_0 = √ᾱ_t·x_t − √(1 − ᾱ_t)·v."""
        return self._coef("sqrt_alphas_cumprod", t, x_t) * x_t - self._coef("sqrt_one_minus_alphas_cumprod", t, x_t) * v

    def v_target(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = √ᾱ_t·ε − √(1 − ᾱ_t)·x_0 (Salimans & Ho 2022)."""
        return (
            self._coef("sqrt_alphas_cumprod", t, x_start) * noise
            - self._coef("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start
        )

    # ------------------------------------------------------------------------------------------- the model

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timesteps the model sees: the original process's indices (identity unless respaced)."""
        return self.table("timestep_map", t.device)[t.long()].to(t.dtype)

    def call_model(self, model: Model, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None) -> torch.Tensor:
        """model(x, original t, **model_kwargs); of an (output, extra) tuple, the output (as reference)."""
        out = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        return out[0] if isinstance(out, tuple) else out

    def split_output(
        self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean output, variance, log-variance) from the raw model output."""
        n, c = x.shape[:2]
        if self.var_type == "learned_range":
            if model_output.shape != (n, 2 * c, *x.shape[2:]):
                raise ValueError(
                    f"a learned-variance model must output {2 * c} channels, got {tuple(model_output.shape)}"
                )
            model_output, var_values = torch.split(model_output, c, dim=1)
            min_log = self._coef("posterior_log_variance_clipped", t, x)
            max_log = self._coef("log_betas", t, x)
            frac = (var_values + 1) / 2  # the model's [-1, 1] spans [log β̃_t, log β_t]
            log_variance = frac * max_log + (1 - frac) * min_log
            return model_output, torch.exp(log_variance), log_variance
        if self.var_type == "fixed_large":
            variance, log_variance = "fixed_large_variance", "fixed_large_log_variance"
        else:
            variance, log_variance = "posterior_variance", "posterior_log_variance_clipped"
        return model_output, self._coef(variance, t, x).expand_as(x), self._coef(log_variance, t, x).expand_as(x)

    def p_mean_variance(
        self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
        denoised_fn: Denoise = None, model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from one model call: dict with "mean", "variance", "log_variance", "pred_xstart".

        `denoised_fn` post-processes x̂_0 before `clip_denoised` clamps it to [-1, 1].
        """
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must hold one timestep per sample, got shape {tuple(t.shape)} for {x.shape[0]}")
        output = self.call_model(model, x, t, model_kwargs)
        output, variance, log_variance = self.split_output(output, x, t)
        if self.mean_type == "x0":
            pred_xstart = output
        elif self.mean_type == "v":
            pred_xstart = self.predict_xstart_from_v(x, t, output)
        else:
            pred_xstart = self.predict_xstart_from_eps(x, t, output)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    # ------------------------------------------------------------------------------------------- losses

    def vb_terms_bpd(
        self,
        model: Model,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """One term of the variational bound in bits per dimension ("output", N) and x̂_0 ("pred_xstart").

        t > 0: KL(q(x_{t-1} | x_t, x_0) ‖ p(x_{t-1} | x_t)); t = 0: the decoder's −log p(x_0 | x_1).
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return {"output": torch.where(t == 0, nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses (N-vectors) for one timestep per sample: {"loss", "mse", "vb"} as the reference.

        With a learned variance, "vb" is L_vlb on a stop-gradient mean (it trains only the variance channels)
        and "loss" = "mse" + "vb". With the "kl" loss types only "loss" is returned.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms: dict[str, torch.Tensor] = {}
        if self.loss_type in ("kl", "rescaled_kl"):
            terms["loss"] = self.vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)[
                "output"
            ]
            if self.loss_type == "rescaled_kl":
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        output = self.call_model(model, x_t, t, model_kwargs)
        if self.var_type == "learned_range":
            c = x_t.shape[1]
            if output.shape != (x_t.shape[0], 2 * c, *x_t.shape[2:]):
                raise ValueError(f"a learned-variance model must output {2 * c} channels, got {tuple(output.shape)}")
            output, var_values = torch.split(output, c, dim=1)
            frozen = torch.cat([output.detach(), var_values], dim=1)
            # A constant "model" returning the frozen output: L_vlb's gradient reaches only the variance.
            terms["vb"] = self.vb_terms_bpd(lambda *_, **__: frozen, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == "rescaled_mse":
                # The reference divides by 1000 so that the VB term does not swamp the MSE term.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        if self.mean_type == "x0":
            target = x_start
        elif self.mean_type == "v":
            target = self.v_target(x_start, t, noise)
        else:
            target = noise
        if output.shape != target.shape:
            raise ValueError(f"model output shape {tuple(output.shape)} does not match the input {tuple(target.shape)}")
        terms["mse"] = mean_flat((target - output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) ‖ N(0, I)) in bits per dimension, per sample (not trainable)."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)

    # ------------------------------------------------------------------------------------------- one step

    def p_sample(
        self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
        denoised_fn: Denoise = None, cond_fn: Callable[..., torch.Tensor] | None = None,
        model_kwargs: dict | None = None, generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One ancestral step x_t → x_{t-1} ~ p(x_{t-1} | x_t); no noise is added at t = 0.

        `cond_fn(x, t, **model_kwargs)` (classifier guidance) returns ∇ log p(y | x) and shifts the mean by
        variance × gradient (Sohl-Dickstein et al.).
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        # Noise is drawn before the t = 0 check, as in the reference, so that a seed gives the same samples.
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        mean = out["mean"]
        if cond_fn is not None:
            gradient = cond_fn(x, self.model_timesteps(t), **(model_kwargs or {}))
            mean = mean.float() + out["variance"] * gradient.float()
        nonzero = (t != 0).to(noise.dtype).view(-1, *([1] * (x.ndim - 1)))
        sample = mean + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _ddim_prediction(self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool,
                         denoised_fn: Denoise, cond_fn: Callable[..., torch.Tensor] | None,
                         model_kwargs: dict | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """p_mean_variance (classifier-guided when `cond_fn`) and the ε̂ it implies: what a DDIM step starts from."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs)
        return out, self.predict_eps_from_xstart(x, t, out["pred_xstart"])

    def ddim_sample(
        self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
        denoised_fn: Denoise = None, cond_fn: Callable[..., torch.Tensor] | None = None,
        model_kwargs: dict | None = None, eta: float = 0.0, generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One DDIM step x_t → x_{t-1} (Song et al. eq. 12); eta = 0 is deterministic, eta = 1 is DDPM-like.

        The learned variance is not used: DDIM's σ_t = eta·√((1−ᾱ_{t-1})/(1−ᾱ_t))·√(1 − ᾱ_t/ᾱ_{t-1}).
        """
        out, eps = self._ddim_prediction(model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs)
        alpha_bar = self._coef("alphas_cumprod", t, x)
        alpha_bar_prev = self._coef("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        mean = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero = (t != 0).to(noise.dtype).view(-1, *([1] * (x.ndim - 1)))
        return {"sample": mean + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
        denoised_fn: Denoise = None, cond_fn: Callable[..., torch.Tensor] | None = None,
        model_kwargs: dict | None = None, eta: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """One deterministic DDIM inversion step x_t → x_{t+1} (the ODE run forwards)."""
        if eta != 0.0:
            raise ValueError("DDIM inversion is deterministic: eta must be 0")
        out, eps = self._ddim_prediction(model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs)
        alpha_bar_next = self._coef("alphas_cumprod_next", t, x)
        mean = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean, "pred_xstart": out["pred_xstart"]}

    def condition_score(
        self,
        cond_fn: Callable[..., torch.Tensor],
        out: dict,
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None,
    ) -> dict[str, torch.Tensor]:
        """Classifier guidance on the score (Song et al.): ε ← ε − √(1 − ᾱ_t)·∇ log p(y | x)."""
        alpha_bar = self._coef("alphas_cumprod", t, x)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, self.model_timesteps(t), **(model_kwargs or {}))
        new = dict(out)
        new["pred_xstart"] = self.predict_xstart_from_eps(x, t, eps)
        new["mean"], _, _ = self.q_posterior_mean_variance(new["pred_xstart"], x, t)
        return new

    # --------------------------------------------------------------------------------------- loops (compat)
    # guided-diffusion's loop API, same arguments; each runs one step function over all steps of this process.

    def p_sample_loop(self, model: Model, shape: Shape, noise: torch.Tensor | None = None, clip_denoised: bool = True,
                      denoised_fn: Denoise = None, cond_fn: Callable[..., torch.Tensor] | None = None,
                      model_kwargs: dict | None = None, device: Device = None, progress: bool = False) -> torch.Tensor:
        """Ancestral sampling over all steps of this process, from `noise` (or fresh N(0, I) of `shape`)."""
        return _last_sample(self.p_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress))

    def p_sample_loop_progressive(
        self, model: Model, shape: Shape, noise: torch.Tensor | None = None, clip_denoised: bool = True,
        denoised_fn: Denoise = None, cond_fn: Callable[..., torch.Tensor] | None = None,
        model_kwargs: dict | None = None, device: Device = None, progress: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """p_sample_loop, yielding each step's {"sample", "pred_xstart"}."""
        def one(x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
            return self.p_sample(model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs)

        return self._progressive(one, model, shape, noise, device, progress)

    def ddim_sample_loop(self, model: Model, shape: Shape, noise: torch.Tensor | None = None,
                         clip_denoised: bool = True, denoised_fn: Denoise = None,
                         cond_fn: Callable[..., torch.Tensor] | None = None, model_kwargs: dict | None = None,
                         device: Device = None, progress: bool = False, eta: float = 0.0) -> torch.Tensor:
        """DDIM sampling over all steps of this process (respace it, e.g. "ddim50", for fewer steps)."""
        return _last_sample(self.ddim_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress, eta))

    def ddim_sample_loop_progressive(
        self, model: Model, shape: Shape, noise: torch.Tensor | None = None, clip_denoised: bool = True,
        denoised_fn: Denoise = None, cond_fn: Callable[..., torch.Tensor] | None = None,
        model_kwargs: dict | None = None, device: Device = None, progress: bool = False, eta: float = 0.0,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """ddim_sample_loop, yielding each step's {"sample", "pred_xstart"}."""
        def one(x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
            return self.ddim_sample(model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs, eta)

        return self._progressive(one, model, shape, noise, device, progress)

    def _progressive(self, one_step: Callable[..., dict], model: Model, shape: Shape, noise: torch.Tensor | None,
                     device: Device, progress: bool) -> Iterator[dict[str, torch.Tensor]]:
        x = _initial_noise(model, shape, noise, device)
        for t in _steps(self.num_timesteps, x, progress):
            with torch.no_grad():
                out = one_step(x, t)
            yield out
            x = out["sample"]


def _last_sample(steps: Iterator[dict[str, torch.Tensor]]) -> torch.Tensor:
    final: dict = {}
    for step in steps:
        final = step  # only the last step's output is returned
    return final["sample"]


def _initial_noise(
    model: Model,
    shape: tuple[int, ...] | list[int],
    noise: torch.Tensor | None,
    device: torch.device | str | None,
) -> torch.Tensor:
    """x_T: the given noise, or N(0, I) of `shape` on `device` (default: the model's device, else the CPU)."""
    if noise is not None:
        return noise.to(device) if device is not None else noise
    if not isinstance(shape, (tuple, list)):
        raise ValueError(f"shape must be a tuple or list, got {type(shape).__name__}")
    if device is None:
        params = getattr(model, "parameters", None)
        device = next(params()).device if callable(params) else "cpu"
    return torch.randn(*shape, device=device)


def _steps(num_timesteps: int, x: torch.Tensor, progress: bool) -> Iterator[torch.Tensor]:
    """Timestep batches T−1, …, 0 (one per sample), with an optional tqdm bar."""
    indices: Any = range(num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices)
    for i in indices:
        yield torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
