"""The recipe: round trips, one-line errors for bad stored recipes, overrides and inference for old files."""

import json

import pytest

from ditkit.models.config import DiTConfig
from ditkit.recipe import (
    RECIPE_VERSION,
    Conditioning,
    DiffusionProcess,
    FlowProcess,
    LatentSpace,
    Recipe,
    infer_recipe,
)
from ditkit.runtime.errors import UserError


def _recipe(**parts) -> Recipe:
    return Recipe(model=DiTConfig.from_name("DiT-S/2", input_size=8, num_classes=10), **parts)


@pytest.mark.parametrize(
    "parts",
    [
        {},
        {"process": DiffusionProcess(noise_schedule="cosine", prediction="v", diffusion_steps=500)},
        {"process": FlowProcess(path_type="GVP", prediction="score", loss_weight="likelihood", train_eps=1e-5)},
        {"latents": LatentSpace.sd_vae("/models/vae"), "conditioning": Conditioning(classes=tuple("abc"))},
        {"conditioning": Conditioning(kind="text", text_encoder="t5", max_tokens=120)},
    ],
)
def test_round_trip_through_json(parts):
    recipe = _recipe(**parts)
    back = Recipe.from_json(recipe.to_json())
    assert back == recipe
    assert back.objective == recipe.process.kind


def test_derived_facts_are_not_stored_twice():
    recipe = _recipe(latents=LatentSpace.sd_vae())
    assert recipe.image_size == 8 * 8 and recipe.null_label == 10
    stored = recipe.to_dict()
    assert "image_size" not in json.dumps(stored["latents"]) and "learn_sigma" not in stored["process"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(version=RECIPE_VERSION + 1), "newer ditkit"),
        (lambda d: d.update(version="1"), "version must be a positive integer"),
        (lambda d: d.update(extra=1), "unknown key(s) extra"),
        (lambda d: d["process"].update(kind="score-sde"), "unknown process kind 'score-sde'"),
        (lambda d: d["process"].update(noise_schedule="sqrt"), "unknown process.noise_schedule 'sqrt'"),
        (lambda d: d["process"].update(betas=[0.1]), "unknown key(s) betas"),
        (lambda d: d["latents"].update(scale=float("nan")), "latents.scale must be a finite number"),
        (lambda d: d["latents"].update(downsample=8), "must have latents.downsample 1"),
        (lambda d: d["conditioning"].update(kind="audio"), "unknown conditioning.kind 'audio'"),
        (lambda d: d["conditioning"].update(classes=[str(i) for i in range(11)]), "11 class names"),
        (lambda d: d["model"].update(depth=0), "depth must be a positive integer"),
    ],
)
def test_bad_stored_recipes_get_one_line(edit, message):
    data = _recipe().to_dict()
    edit(data)
    with pytest.raises(UserError, match=None) as err:
        Recipe.from_dict(data)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_flow_eps_must_be_finite():
    with pytest.raises(UserError, match="train_eps must be a finite number"):
        _recipe(process=FlowProcess(train_eps=float("inf")))


def test_not_json_is_named():
    with pytest.raises(UserError, match="ckpt.safetensors: the stored recipe is not valid JSON"):
        Recipe.from_json("{", where="ckpt.safetensors")


def test_override_replaces_or_refuses():
    recipe = _recipe(latents=LatentSpace.sd_vae("stabilityai/sd-vae-ft-ema"))
    moved = recipe.override("latents.vae", "/local/sd-vae", "--vae")
    assert moved.latents.vae == "/local/sd-vae" and moved.latents.scale == recipe.latents.scale
    assert recipe.override("process.noise_schedule", None) is recipe  # no flag given: recorded value
    assert recipe.override("process.noise_schedule", "linear", conflict=True) is recipe  # same value: fine
    with pytest.raises(UserError, match=r"--noise-schedule 'cosine' conflicts .*process.noise_schedule = 'linear'"):
        recipe.override("process.noise_schedule", "cosine", "--noise-schedule", conflict=True)
    assert recipe.get("model.num_classes") == 10


def test_inferred_recipe_is_the_authors_defaults():
    latent = infer_recipe(DiTConfig.from_name("DiT-XL/2"))
    assert latent.process == DiffusionProcess(1000, "linear", "epsilon")
    assert latent.latents == LatentSpace(vae="stabilityai/sd-vae-ft-ema", scale=0.18215, shift=0.0, downsample=8)
    assert latent.image_size == 256
    pixels = infer_recipe(DiTConfig.from_name("DiT-S/2", input_size=16, in_channels=1, num_classes=10))
    assert pixels.latents.is_pixels and pixels.image_size == 16
