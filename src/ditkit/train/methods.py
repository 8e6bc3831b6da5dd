"""What the training step does for the recipe's training-only methods (REPA, TREAD): set up, draw, add the loss.

`MethodHooks.attach(model)` gives a model the projector (REPA) and the training path (both); the step then calls
`before_forward` for each micro-batch (TREAD's routing scores for its rows, drawn from the (seed, step) generator,
so a resumed run routes the same tokens) and `alignment_loss` after it (REPA's term, already weighted). The
encoder's targets are computed from the images (`targets`) where the batch still holds them: the digits and
image folders (before the VAE). A latent store holds no images: there the targets are the features that `ditkit
extract --repa-encoder` stored beside the latents (data/feature_store.py), read with each batch
(`stored_targets`); docs/repa_tread.md gives the storage cost.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ditkit.encoders.features import fast_encoder, load_encoder, to_grid
from ditkit.models.routing import TrainingPath
from ditkit.runtime.errors import UserError
from ditkit.train.align import attach_projector, tapped_alignment_loss
from ditkit.training_methods import Alignment, Routing, TrainingMethods

ROUTING_STREAM = 0x7EAD  # the routing generator's offset from the step's own (t, noise, label-drop) generator


class MethodHooks:
    """REPA and TREAD for one training run; `encoder` is the frozen feature encoder (REPA only)."""

    def __init__(self, methods: TrainingMethods, encoder: nn.Module | None = None):
        self.methods = methods
        self.encoder = encoder
        self.path: TrainingPath | None = None

    @property
    def active(self) -> bool:
        return not self.methods.is_plain

    def attach(self, model: nn.Module) -> nn.Module:
        """Projector (REPA) and training path on `model` (call on the model and its EMA, before the copy); a plain
        run's model is left as it is."""
        if not self.active:
            return model
        align = self.methods.alignment
        if align is not None:
            attach_projector(model, align)
        model.training_path = TrainingPath(routing=self.methods.routing,
                                           tap_depth=align.depth if align is not None else None)
        return model

    def use(self, model: nn.Module) -> None:
        """The path of the model the step trains (its scores are set before each forward)."""
        self.path = getattr(model, "training_path", None)

    @torch.no_grad()
    def targets(self, images: torch.Tensor, grid: int) -> torch.Tensor | None:
        """The encoder's patch features of `images` ([-1, 1]) on the model's grid×grid tokens (REPA only)."""
        if self.methods.alignment is None:
            return None
        if self.encoder is None:
            raise RuntimeError("REPA needs the frozen encoder: MethodHooks(methods, encoder)")
        return to_grid(self.encoder(images), grid)

    @staticmethod
    def stored_targets(features: torch.Tensor, grid: int) -> torch.Tensor:
        """Stored features (N×T×F, float16, from the batch) on the model's grid×grid tokens, in float32."""
        return to_grid(features.float(), grid)

    def before_forward(self, seed: int, step: int, global_batch: int, rows: slice, num_tokens: int,
                       device: torch.device) -> None:
        """TREAD's per-token scores for this micro-batch's rows of the global batch of step `step`."""
        if self.path is None or self.methods.routing is None:
            return
        gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + step + 1) ^ ROUTING_STREAM)
        self.path.scores = torch.rand(global_batch, num_tokens, generator=gen, device=device)[rows]

    def alignment_loss(self, targets: torch.Tensor | None) -> torch.Tensor | None:
        """coeff · REPA's loss (batch mean) for the forward that just ran, or None without REPA."""
        align = self.methods.alignment
        if align is None or self.path is None:
            return None
        if targets is None:
            raise RuntimeError("REPA: the step was given no encoder targets")
        per_sample = tapped_alignment_loss(self.path.tapped, self.path.tap_ids, targets)
        return align.coeff * per_sample.mean()


def methods_from_flags(opts: Any, model_depth: int, feature_dim: int | None) -> TrainingMethods:
    """The recipe's training part from the `--repa-*` / `--tread-*` flags (checked against the depth)."""
    alignment = None
    if opts.repa_encoder:
        alignment = Alignment(encoder=opts.repa_encoder, feature_dim=int(feature_dim or 0), depth=opts.repa_depth,
                              coeff=opts.repa_coeff, projector_dim=opts.repa_projector_dim)
    routing = None
    if opts.tread_rate:
        end = opts.tread_end if opts.tread_end is not None else -1
        routing = Routing(rate=opts.tread_rate, start=opts.tread_start, end=end).resolved(model_depth)
    methods = TrainingMethods(alignment=alignment, routing=routing)
    methods.validate(model_depth)
    return methods


def method_hooks(opts: Any, config: Any, data: Any, device: torch.device) -> MethodHooks:
    """The run's hooks: the frozen encoder loaded once (REPA), on `device`; one line where REPA cannot run."""
    encoder, feature_dim = None, None
    stored = getattr(data, "features", None)  # a latent store with the encoder's features (data/feature_store)
    if opts.repa_encoder:
        if not data.latents.is_pixels and data.encoder is None and stored is None:
            raise UserError("--repa-encoder needs the images, and a latent store holds latents only; run ditkit "
                            "extract --repa-encoder to store the features beside the latents, or train on the "
                            "image folder with --vae (features computed on the fly), or drop --repa-encoder")
        if config.conditioning not in ("adaln-zero", "adaln"):
            raise UserError(f"--repa-encoder / --tread-rate run on the adaLN blocks, not --conditioning "
                            f"{config.conditioning}")
        if stored is not None:  # the targets come with the batches: no encoder on the GPU
            feature_dim = int(stored["channels"])
        else:
            encoder = load_encoder(opts.repa_encoder).to(device)
            if device.type == "cuda" and opts.precision in (None, "bf16", "fp8"):  # its matmuls run in bf16 anyway
                encoder = fast_encoder(encoder)
            feature_dim = encoder.feature_dim
    elif opts.tread_rate and config.conditioning not in ("adaln-zero", "adaln"):
        raise UserError(f"--tread-rate runs on the adaLN blocks, not --conditioning {config.conditioning}")
    return MethodHooks(methods_from_flags(opts, config.depth, feature_dim), encoder)
