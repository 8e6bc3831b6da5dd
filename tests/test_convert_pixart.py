"""ditkit text models ⇄ diffusers' PixArtTransformer2DModel, checked against diffusers' own implementation.

Tolerance: "float32 round-off" is max |Δ| ≤ 2e-5 · max(1, max |reference|) for these 2-block, 64-wide models;
round trips must be bit-exact. Inputs have captions of different lengths, padded and masked.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

import ditkit
from ditkit.cli import main
from ditkit.models import build_model
from ditkit.models.config import DiTConfig
from ditkit.weights import convert, convert_pixart
from helpers import models

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

ROUNDOFF = 2e-5
TINY = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2, input_size=8, in_channels=4,
            conditioning="text", caption_channels=24, max_tokens=8)
randomise = partial(models.randomise, std=0.15)  # (module, seed): every trained weight random, eval


def random_pixart(**overrides) -> torch.nn.Module:
    """A tiny randomised diffusers PixArt transformer (every weight random, scale-shift tables included)."""
    cfg = dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
               cross_attention_dim=64, sample_size=8, patch_size=2, caption_channels=24, norm_eps=1e-6,
               use_additional_conditions=False)
    cfg.update(overrides)
    return randomise(diffusers.PixArtTransformer2DModel(**cfg), seed=5)


def assert_roundoff(actual: torch.Tensor, reference: torch.Tensor) -> None:
    gap = (actual.double() - reference.double()).abs().max().item()
    bound = ROUNDOFF * max(1.0, reference.abs().max().item())
    assert gap <= bound, f"max |diff| {gap:.3g} > {bound:.3g}"


def outputs(model, net, config):
    x, t, y, mask = convert_pixart.random_inputs(config, batch=4, tokens=6)
    with torch.no_grad():
        return model(x, t, y, mask), convert_pixart.diffusers_output(net, x, t, y, mask)


@pytest.mark.parametrize("interpolation_scale", [None, 2.0])
def test_random_diffusers_pixart_converts_to_ditkit_and_back(tmp_path, capsys, interpolation_scale):
    net = random_pixart(interpolation_scale=interpolation_scale)
    src = tmp_path / "pixart"
    net.save_pretrained(str(src), safe_serialization=True)
    dst = tmp_path / "text.safetensors"
    assert main(["convert", "--to", "ditkit", str(src), str(dst)]) == 0
    assert "no null caption" in capsys.readouterr().out
    model = ditkit.load_model(dst)
    assert model.config.is_text and model.config.caption_channels == 24
    assert model.config.interpolation_scale == (interpolation_scale or 1.0)
    ours, theirs = outputs(model, net, model.config)
    assert_roundoff(ours, theirs)
    assert torch.count_nonzero(model.y_embedder.y_embedding) == 0  # stock diffusers has no null caption
    back = tmp_path / "back"
    assert main(["convert", "--to", "diffusers", str(dst), str(back)]) == 0
    again = diffusers.PixArtTransformer2DModel.from_pretrained(str(back))
    original = net.state_dict()
    for key, value in again.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_ditkit_text_model_converts_to_diffusers_and_back_exactly(tmp_path):
    model = randomise(build_model(DiTConfig(**TINY, class_dropout_prob=0.2)), seed=1)
    folder = tmp_path / "out"
    stock = convert.to_diffusers(model, folder)
    assert stock["max_abs"] <= ROUNDOFF * max(1.0, stock["ref_max"])
    net = diffusers.PixArtTransformer2DModel.from_pretrained(str(folder))
    assert net.config.use_additional_conditions is False
    ours, theirs = outputs(model, net, model.config)
    assert_roundoff(ours, theirs)
    assert (folder / convert_pixart.NULL_CAPTION_FILE).is_file()
    state_dict, config, _ = convert.read_diffusers_folder(folder)
    assert config == model.config  # caption dropout and token count come back from the side file
    for key, value in model.state_dict().items():
        assert torch.equal(state_dict[key], value), key


def test_no_mask_in_ditkit_is_a_mask_of_ones_in_diffusers():
    model = randomise(build_model(DiTConfig(**TINY)), seed=2)
    net = convert.to_diffusers_transformer(model)
    x, t, y, _ = convert_pixart.random_inputs(model.config, batch=2, tokens=8)
    with torch.no_grad():
        ours = model(x, t, y)
        theirs = convert_pixart.diffusers_output(net, x, t, y, torch.ones(2, 8))
    assert_roundoff(ours, theirs)


def test_micro_conditioned_and_foreign_folders_are_refused_with_one_line(tmp_path, capsys):
    ms = tmp_path / "ms"
    random_pixart(use_additional_conditions=True).save_pretrained(str(ms))
    assert main(["convert", "--to", "ditkit", str(ms), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "aspect ratio" in err and len(err.strip().splitlines()) == 1
    text = randomise(build_model(DiTConfig(**TINY)), seed=3)
    path = tmp_path / "text.safetensors"
    ditkit.save_model(text, path)
    assert main(["convert", "--to", "diffusers", str(path), str(tmp_path / "p"), "--vae", str(ms)]) == 2
    assert "transformer alone" in capsys.readouterr().err


def test_side_file_that_does_not_fit_is_refused(tmp_path):
    model = randomise(build_model(DiTConfig(**TINY)), seed=4)
    folder = tmp_path / "out"
    convert.to_diffusers(model, folder)
    meta = json.loads((folder / convert.SIDECAR).read_text())
    meta["config"]["depth"] = 3
    (folder / convert.SIDECAR).write_text(json.dumps(meta))
    with pytest.raises(ditkit.UserError, match="does not match"):
        convert.read_diffusers_folder(folder)
