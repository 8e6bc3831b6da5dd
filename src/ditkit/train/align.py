"""REPA (Yu et al., ICLR 2025; github sihyun-yu/REPA): the projector and the representation-alignment loss.

The hidden states h (N×T×D) after block `depth` go through a projector MLP — Linear(D, P), SiLU, Linear(P, P),
SiLU, Linear(P, F), REPA's `build_mlp` — and each token's projection is compared with the frozen encoder's
feature of the same patch by cosine similarity; the loss is the negative cosine averaged over the patches,
per sample (REPA's `proj_loss` before its batch mean), and enters the training loss as `coeff ·` its batch mean.

The projector lives on the DiT as `model.projectors[0]`, REPA's own module path, so REPA's released SiT-XL/2
checkpoint (`projectors.0.0.weight`, …) loads strictly into a DiT with it attached (`load_repa_checkpoint`), and
ditkit's checkpoints keep it (and its EMA and AdamW state) with the rest. Sampling does not need it:
`ditkit.weights.checkpoints` drops `projectors.*` when it builds a network to sample.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ditkit.models.routing import gather_tokens
from ditkit.runtime.errors import UserError
from ditkit.training_methods import PROJECTOR_PREFIX, REPA_DEPTH, Alignment


def build_projector(hidden_size: int, projector_dim: int, feature_dim: int) -> nn.Sequential:
    """REPA's projector: Linear-SiLU-Linear-SiLU-Linear (indices 0, 2, 4 hold the weights, as in their files)."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, feature_dim),
    )


def attach_projector(model: nn.Module, alignment: Alignment) -> nn.Module:
    """Give `model` REPA's head as `model.projectors` (a one-entry ModuleList), initialised as REPA does
    (Xavier-uniform weights, zero biases) from the caller's random state; returns the model."""
    projector = build_projector(model.config.hidden_size, alignment.projector_dim, alignment.feature_dim)
    for layer in projector:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    model.projectors = nn.ModuleList([projector])
    return model


def alignment_loss(projected: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample REPA loss (N,): −cos(projected token, target token) averaged over the T tokens.

    projected, targets: N×T×F. Computed in float32 whatever the autocast dtype (cosines of bf16 vectors lose
    the small differences the loss is made of)."""
    if projected.shape != targets.shape:
        raise UserError(f"REPA: the projector gives {tuple(projected.shape)} but the encoder's features are "
                        f"{tuple(targets.shape)}; the encoder's feature width and patch grid must match the recipe")
    z_tilde = F.normalize(projected.float(), dim=-1)
    z = F.normalize(targets.float(), dim=-1)
    return -(z_tilde * z).sum(dim=-1).mean(dim=1)


def tapped_alignment_loss(tapped: torch.Tensor | None, tap_ids: torch.Tensor | None,
                          targets: torch.Tensor) -> torch.Tensor:
    """`alignment_loss` for what the training path tapped: when the tap sat inside a TREAD route only the kept
    tokens exist there, so the same tokens of the targets are compared (REPA over the routed model's tokens)."""
    if tapped is None:
        raise RuntimeError("REPA: the forward pass tapped no hidden state (the model is not in training mode?)")
    if tap_ids is not None:
        targets = gather_tokens(targets, tap_ids.to(targets.device))
    return alignment_loss(tapped, targets)


def load_repa_checkpoint(path: str | os.PathLike, feature_dim: int = 768, projector_dim: int = 2048,
                         key: str = "ema", **overrides: Any) -> nn.Module:
    """REPA's released SiT checkpoint (a `.pt` dict holding `model`/`ema`/`opt`, or a bare state dict) as a
    ditkit DiT with the projector attached, loaded with `strict=True` (every key, the projector's included).

    REPA's SiT is a DiT without the learned variance; the model size is read from the tensor shapes.
    `overrides` go to the config (e.g. `num_classes`). Sampling it needs REPA's time convention (t = 1 is
    noise), which ditkit's flow objective does not use; this loads the weights for inspection and fine-tuning.
    """
    from ditkit.models import build_model
    from ditkit.runtime.io import safe_torch_load
    from ditkit.weights.checkpoints import extract_state_dict, infer_config

    obj = safe_torch_load(path)
    weights = obj[key] if isinstance(obj, dict) and isinstance(obj.get(key), dict) else obj
    state = extract_state_dict(weights, path)
    backbone = {k: v for k, v in state.items() if not k.startswith(PROJECTOR_PREFIX)}
    config = infer_config(backbone, **overrides)  # no learned variance: read from the output layer's shape
    model = build_model(config)
    alignment = Alignment(encoder="repa-checkpoint", feature_dim=feature_dim, projector_dim=projector_dim,
                          depth=min(REPA_DEPTH, config.depth))
    attach_projector(model, alignment)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1:2] or [str(err)]
        raise UserError(f"{path}: not a REPA SiT checkpoint of this shape ({first[0].strip()})") from None
    return model.eval()
