"""ditkit: Diffusion Transformers (DiT) — models, diffusion, training, sampling and evaluation.

    import ditkit
    model = ditkit.create_model("DiT-XL/2", input_size=32, num_classes=1000)
    model = ditkit.load_model("DiT-XL-2-256x256.pt")   # official, train.py or ditkit checkpoints
    model, recipe = ditkit.load_model_with_recipe(path)  # and how it was made (schedule, VAE, classes)
"""

from ditkit.models import CONDITIONINGS, MODEL_NAMES, DiT, DiTConfig, create_model
from ditkit.recipe import Recipe
from ditkit.runtime.errors import UserError
from ditkit.weights.checkpoints import load_model, load_model_with_recipe, save_model

__version__ = "0.1.0"

__all__ = [
    "CONDITIONINGS",
    "MODEL_NAMES",
    "DiT",
    "DiTConfig",
    "Recipe",
    "UserError",
    "create_model",
    "load_model",
    "load_model_with_recipe",
    "save_model",
    "list_models",
]


def list_models() -> list[str]:
    """The paper's 12 model names, `DiT-S/8` … `DiT-XL/2`."""
    return list(MODEL_NAMES)
