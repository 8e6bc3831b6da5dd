"""DiT models: configs, components and the network."""

from ditkit.models.config import CONDITIONINGS, MODEL_NAMES, DiTConfig
from ditkit.models.dit import DiT, create_model

__all__ = ["CONDITIONINGS", "MODEL_NAMES", "DiT", "DiTConfig", "create_model"]
