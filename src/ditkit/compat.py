"""The official DiT code's names, importable, so the authors' scripts port by changing their import lines only.

    from models import DiT_models          →  from ditkit.compat import DiT_models
    from download import find_model        →  from ditkit.compat import find_model
    from diffusion import create_diffusion →  from ditkit.diffusion import create_diffusion

`DiT_models["DiT-XL/2"](input_size=32, num_classes=1000)` builds the same network (same state_dict keys and
shapes) as the authors' factory of that name, and `find_model(name_or_path)` returns the state_dict their
`download.find_model` returns: a released name is fetched into the cache, a training checkpoint gives its EMA
weights. Files are read without unpickling code (`ditkit.runtime.io.safe_torch_load`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from ditkit.models import create_model
from ditkit.models.config import MODEL_NAMES
from ditkit.models.dit import DiT
from ditkit.weights.checkpoints import load_weights
from ditkit.weights.pretrained import resolve_checkpoint


def _factory(name: str) -> Callable[..., DiT]:
    def build(**kwargs) -> DiT:
        return create_model(name, **kwargs)

    build.__name__ = name.replace("-", "_").replace("/", "_")  # DiT_XL_2, as the authors name it
    return build


DiT_models: dict[str, Callable[..., DiT]] = {name: _factory(name) for name in MODEL_NAMES}


def find_model(model_name: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state_dict of a released checkpoint name (downloaded once) or of a checkpoint file (its EMA weights
    when it holds both), ready for `model.load_state_dict`."""
    state_dict, _, _ = load_weights(resolve_checkpoint(str(model_name)))
    return state_dict


__all__ = ["DiT_models", "find_model"]
