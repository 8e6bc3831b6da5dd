"""Classifier-free guidance as a model wrapper that any sampler can use.

`guided(model, scale, null_label)` returns `model'(x, t, y)` that evaluates the conditional and unconditional
halves in ONE batched forward ([x; x], labels [y; null]) and returns N rows:
ε = ε_u + s·(ε_c − ε_u) on the guided channels, the conditional output elsewhere (the remaining ε channels and
the learned-variance channels). `channels=3` is the official DiT code (it guides 3 of the 4 latent channels,
which its FID 2.27 was measured with); "all" guides every ε channel (the paper's formula).
An optional `interval=(t_lo, t_hi)` (original timestep indices, inclusive) applies guidance only there; outside
it the scale is 1 and only the conditional half is evaluated, saving half the compute on those steps.

`guided_captions(model, scale, ...)` does the same for text models, whose unconditional half is the model's
null caption (or a negative prompt's features) instead of a null label.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ditkit.runtime.errors import UserError

Model = Callable[..., torch.Tensor]


def cfg_mix(
    cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor, channels: int
) -> torch.Tensor:
    """ε_u + s·(ε_c − ε_u) on the first `channels` channels: ditkit's one classifier-free-guidance formula,
    used by `guided` below and by the models' `forward_with_cfg` (through `cfg_halves`)."""
    return uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])


def cfg_halves(out: torch.Tensor, scale: float, channels: int) -> torch.Tensor:
    """The authors' `forward_with_cfg` output from a forward over [cond; uncond] (2N rows): both halves get the
    guided ε on the first `channels` channels; the other channels (and the variance values) pass through from
    each half unchanged, as in the official code."""
    cond, uncond = torch.split(out, len(out) // 2, dim=0)
    half_eps = cfg_mix(cond, uncond, scale, channels)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), out[:, channels:]], dim=1)


def _guided_rows(out: torch.Tensor, active: torch.Tensor, scale: float, channels: int | str,
                 in_channels: int) -> torch.Tensor:
    """The N guided rows of a forward over [cond; uncond] (2N rows): `cfg_mix` on the first `channels` channels
    ("all" = the input's `in_channels`), with scale 1 where `active` is False, and the conditional half's other
    channels. The scale is a where() over Python numbers: a tensor made from `scale` would be a copy from host
    memory, which makes the host wait for the GPU at every step."""
    n = len(active)
    c = in_channels if channels == "all" else min(int(channels), in_channels)
    cond, uncond = out[:n], out[n:]
    s = torch.where(active, scale, 1.0).to(out.dtype).view(-1, *([1] * (out.ndim - 1)))
    return torch.cat([cfg_mix(cond, uncond, s, c), cond[:, c:]], dim=1)


def _doubled(value: object, n: int) -> object:
    """Per-sample tensors (first dimension N) are repeated for the unconditional half; others pass unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n:
        return torch.cat([value, value], dim=0)
    return value


def _check_arguments(channels: int | str, interval: tuple[float, float] | None) -> None:
    if channels != "all" and (not isinstance(channels, int) or isinstance(channels, bool) or channels < 1):
        raise UserError(f"guidance channels must be a positive integer or 'all', got {channels!r}")
    if interval is not None and (len(interval) != 2 or interval[0] > interval[1]):
        raise UserError(f"guidance interval must be (t_lo, t_hi) with t_lo <= t_hi, got {interval!r}")


def guided(
    model: Model,
    scale: float,
    null_label: int,
    channels: int | str = 3,
    interval: tuple[float, float] | None = None,
) -> Model:
    """Wrap `model(x, t, y, **kw)` into a classifier-free-guided one with the same call and output shape.

    null_label: the unconditional label (`num_classes` for DiT). channels: how many leading ε channels are
    guided, an int or "all" (= the input's channel count). interval: (t_lo, t_hi) where guidance is on.
    """
    _check_arguments(channels, interval)

    def guided_model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        n = x.shape[0]
        if scale == 1.0:
            return model(x, t, y, **kwargs)  # no guidance: the conditional half alone
        if interval is None:
            active = torch.ones(n, dtype=torch.bool, device=x.device)  # no host sync on this common path
        else:
            active = (t >= interval[0]) & (t <= interval[1])
            if not bool(active.any()):  # outside the interval: skip the unconditional half (one host sync)
                return model(x, t, y, **kwargs)
        null = torch.full_like(y, null_label)
        out = model(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), **{k: _doubled(v, n) for k, v in kwargs.items()}
        )
        return _guided_rows(out, active, scale, channels, x.shape[1])

    guided_model.scale = scale  # type: ignore[attr-defined]
    return guided_model


def _padded(tokens: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions (N×L[×C]) and masks (N×L) padded with masked-out zeros to `length` tokens (which changes
    nothing: masked tokens are ignored), so that two sets of captions fit one batch."""
    extra = length - tokens.shape[1]
    if extra <= 0:
        return tokens, mask
    pad = torch.zeros((tokens.shape[0], extra, *tokens.shape[2:]), dtype=tokens.dtype, device=tokens.device)
    off = torch.zeros((mask.shape[0], extra), dtype=mask.dtype, device=mask.device)
    return torch.cat([tokens, pad], dim=1), torch.cat([mask, off], dim=1)


def guided_captions(
    model: Model,
    scale: float,
    channels: int | str = "all",
    interval: tuple[float, float] | None = None,
    negative: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Model:
    """Classifier-free guidance for text models: `model'(x, t, y, mask=None)` with y the captions (N×L×C
    features, or token ids for a model that encodes them itself) and mask N×L (None: every token is real).

    The unconditional half is the model's null caption under each caption's own mask (PixArt-α's training
    and sampling), or, with `negative = (captions, mask)` of one row or N rows, those captions (a negative
    prompt; diffusers' pipeline guides with the empty prompt's features this way). Both halves run in ONE
    batched forward; the combination is `guided`'s.
    """
    _check_arguments(channels, interval)

    def guided_model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
                     **kwargs) -> torch.Tensor:
        n = x.shape[0]
        if scale == 1.0:
            return model(x, t, y, mask=mask, **kwargs)
        if interval is not None:
            active = (t >= interval[0]) & (t <= interval[1])
            if not bool(active.any()):
                return model(x, t, y, mask=mask, **kwargs)
        else:
            active = torch.ones(n, dtype=torch.bool, device=x.device)
        if mask is None:
            mask = torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)
        kwargs = {k: _doubled(v, n) for k, v in kwargs.items()}
        if negative is None:
            uncond_y, uncond_mask = y, mask
            kwargs["force_drop_ids"] = torch.cat([torch.zeros(n, device=x.device), torch.ones(n, device=x.device)])
        else:
            uncond_y, uncond_mask = (v.to(y.device).expand(n, *v.shape[1:]) for v in negative)
        length = max(y.shape[1], uncond_y.shape[1])
        y, mask = _padded(y, mask.to(uncond_mask.dtype), length)
        uncond_y, uncond_mask = _padded(uncond_y.to(y.dtype), uncond_mask, length)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, uncond_y]),
                    mask=torch.cat([mask, uncond_mask]), **kwargs)
        return _guided_rows(out, active, scale, channels, x.shape[1])

    guided_model.scale = scale  # type: ignore[attr-defined]
    return guided_model
