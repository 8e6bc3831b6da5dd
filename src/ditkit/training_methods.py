"""The recipe part that names the training-only methods that shaped the weights: REPA and TREAD.

- `Alignment` (REPA, Yu et al. 2025): the hidden states after block `depth` go through a projector MLP
  (`projector_dim` wide, out to the encoder's `feature_dim`) and are pulled towards a frozen encoder's patch
  features by a negative-cosine loss, weighted by `coeff`, added to the objective's loss.
- `Routing` (TREAD, Krause et al. 2025): during training a random `rate` of the tokens skips blocks
  `start`…`end` (both inclusive, 0-based) and re-enters after block `end`; sampling runs every token.

Both change how a model is trained, so a checkpoint records them and a resumed run must ask for the same;
neither changes the network that samples (the projector is a training-only head). Recipes written before this
part existed read back with `TrainingMethods()` (neither method). Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ditkit.runtime.errors import UserError

REPA_DEPTH = 8  # REPA's defaults for SiT-XL/2 (their train.py: --encoder-depth 8, --proj-coeff 0.5)
REPA_COEFF = 0.5
REPA_PROJECTOR_DIM = 2048
TREAD_RATE = 0.5  # TREAD's guideline: half the tokens, from block 2 to block depth − 4 (configs/model/tread.yaml)
TREAD_START = 2
TREAD_END_FROM_LAST = 4
PROJECTOR_PREFIX = "projectors."  # REPA's head on the DiT (state-dict keys); training-only, sampling drops it


@dataclass(frozen=True)
class Alignment:
    """REPA: align block `depth`'s hidden states (through the projector) with encoder `encoder`'s patch features."""

    encoder: str
    feature_dim: int
    depth: int = REPA_DEPTH
    coeff: float = REPA_COEFF
    projector_dim: int = REPA_PROJECTOR_DIM

    def validate(self, model_depth: int) -> None:
        if not isinstance(self.encoder, str) or not self.encoder:
            raise UserError(f"recipe: training.alignment.encoder must name an encoder, got {self.encoder!r}")
        for name in ("feature_dim", "projector_dim"):
            _positive_int(getattr(self, name), f"training.alignment.{name}")
        _positive_int(self.depth, "training.alignment.depth")
        if self.depth > model_depth:
            raise UserError(f"--repa-depth {self.depth} is deeper than the model's {model_depth} blocks; "
                            f"use 1..{model_depth}")
        if not (isinstance(self.coeff, (int, float)) and math.isfinite(self.coeff) and self.coeff > 0):
            raise UserError(f"--repa-coeff must be a positive number, got {self.coeff!r}")


@dataclass(frozen=True)
class Routing:
    """TREAD: a fraction `rate` of the tokens (chosen at random per sample) skips blocks `start`…`end`."""

    rate: float = TREAD_RATE
    start: int = TREAD_START
    end: int = -1  # -1: depth − 4, TREAD's guideline (resolved by `resolved`)

    def resolved(self, model_depth: int) -> Routing:
        """The same routing with `end` -1 replaced by TREAD's default for this depth."""
        if self.end != -1:
            return self
        return dataclasses.replace(self, end=model_depth - TREAD_END_FROM_LAST)

    def validate(self, model_depth: int) -> None:
        if not (isinstance(self.rate, (int, float)) and 0.0 <= self.rate < 1.0):
            raise UserError(f"--tread-rate must be in [0, 1), got {self.rate!r}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserError(f"recipe: training.routing.{name} must be an integer, got {value!r}")
        if not 0 <= self.start <= self.end < model_depth:
            raise UserError(f"--tread-start {self.start} / --tread-end {self.end}: need 0 <= start <= end < "
                            f"{model_depth} (the model's depth)")


@dataclass(frozen=True)
class TrainingMethods:
    """Which training-only methods a run used (None: not used)."""

    alignment: Alignment | None = None
    routing: Routing | None = None

    @property
    def is_plain(self) -> bool:
        return self.alignment is None and self.routing is None

    def validate(self, model_depth: int) -> None:
        if self.alignment is not None:
            self.alignment.validate(model_depth)
        if self.routing is not None:
            self.routing.validate(model_depth)

    def to_dict(self) -> dict[str, Any]:
        return {name: None if part is None else dataclasses.asdict(part)
                for name, part in (("alignment", self.alignment), ("routing", self.routing))}

    @classmethod
    def from_dict(cls, data: Any) -> TrainingMethods:
        """Read back `to_dict` (None or a missing key: neither method); one line for anything malformed."""
        if data is None:
            return cls()
        if not isinstance(data, dict) or set(data) - {"alignment", "routing"}:
            raise UserError("recipe: training must be an object with keys alignment and routing")
        parts = {}
        for name, part_cls in (("alignment", Alignment), ("routing", Routing)):
            value = data.get(name)
            if value is None:
                continue
            if not isinstance(value, dict) or set(value) - {f.name for f in dataclasses.fields(part_cls)}:
                raise UserError(f"recipe: training.{name} has unknown or malformed fields: {value!r}")
            try:
                parts[name] = part_cls(**value)
            except TypeError as err:
                raise UserError(f"recipe training.{name}: {err}") from None
        return cls(**parts)


def _positive_int(value: Any, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"recipe: {name} must be a positive integer, got {value!r}")
