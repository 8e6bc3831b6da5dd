"""The shared test helpers and the conftest fixtures over them build what they say (tests/helpers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ditkit
from helpers.images import CORRUPT, IMAGES
from helpers.models import TINY, sampling_dit, tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_dit_is_the_tiny_training_model_and_its_inits_differ_as_documented():
    model = tiny_dit()
    cfg = model.config
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads) == (TINY["depth"], TINY["hidden_size"], TINY["num_heads"])
    assert (cfg.patch_size, cfg.input_size, cfg.in_channels, cfg.num_classes) == (2, 8, 1, 10)
    assert model.training and float(model.final_layer.linear.weight.detach().abs().sum()) == 0  # official init
    outputs = tiny_dit(0, init="outputs")
    assert float(outputs.final_layer.linear.weight.detach().std()) == pytest.approx(0.05, rel=0.2)
    every = tiny_dit(0, init="all", std=0.15, eval=True)
    assert not every.training and float(every.blocks[0].attn.qkv.weight.detach().std()) == pytest.approx(0.15, rel=0.1)
    assert torch.equal(every.pos_embed, outputs.pos_embed)  # the fixed sin-cos table is left alone
    a, b = tiny_dit(3, init="all"), tiny_dit(3, init="all")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_fixtures_give_the_helpers_models_and_files(tiny_model, sampling_checkpoint, image_folder, tmp_path):
    assert tiny_model.config == tiny_dit().config
    loaded = ditkit.load_model(sampling_checkpoint)
    for k, v in sampling_dit().state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    files = sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*") if p.is_file())
    expected = sorted([f"{cls}/{name}" for name, (cls, *_) in IMAGES.items()] + ["/".join(CORRUPT)])
    assert files == sorted(expected + [".hidden_notes.txt"])


def test_training_and_process_fixtures(train_options, subprocess_env, tmp_path):
    opts = train_options(max_steps=2)
    assert opts.max_steps == 2 and opts.ckpt_every == 3 and opts.model_overrides == TINY
    assert Path(opts.results_dir) == tmp_path / "run"
    assert (Path(subprocess_env["PYTHONPATH"]) / "ditkit" / "__init__.py").exists()
    assert subprocess_env["OMP_NUM_THREADS"] == "1"


def test_tiny_vae_fixture_is_the_8x_four_level_vae(tiny_vae_dir):
    config = json.loads((tiny_vae_dir / "config.json").read_text())
    assert config["block_out_channels"] == [8, 8, 8, 8] and config["latent_channels"] == 4
    assert len(config["down_block_types"]) == 4  # three halvings: 8× downsampling
