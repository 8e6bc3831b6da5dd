"""`ditkit sample` for text models: prompts in, a grid labelled with them out, every sampler, guidance."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import ditkit
from ditkit.cli import main
from helpers.models import randomise, tiny_text_dit
from helpers.text import save_t5


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A tiny random pixel-space text model reading the tiny T5's 16 features, and that encoder."""
    root = tmp_path_factory.mktemp("text")
    save_t5(root / "t5")
    model = randomise(tiny_text_dit(depth=1, hidden_size=32, num_heads=2, in_channels=3, caption_channels=16,
                                    max_tokens=8), 0, std=0.1)
    ditkit.save_model(model, root / "text.safetensors")
    return root


def args(run, out, *extra):
    return ["sample", "--ckpt", str(run / "text.safetensors"), "--text-encoder", str(run / "t5"), "--out", str(out),
            "--no-progress", *extra]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver"])
def test_every_sampler_makes_a_grid_labelled_with_the_prompts(text_run, tmp_path, sampler, capsys):
    out = tmp_path / sampler
    cmd = args(text_run, out, "--prompt", "a red seven", "--prompt", "a blue cube on a red background",
               "--sampler", sampler, "--num-steps", "4", "--per-label", "3", "--cfg-scale", "2")
    assert main(cmd) == 0
    grid = Image.open(out / "grid.png")
    assert grid.size[1] == 2 * (64 + 2) + 2  # two prompt rows of 8×8 samples shown at 64 px
    assert "wrote" in capsys.readouterr().out


def test_same_seed_same_grid_and_the_negative_prompt_changes_it(text_run, tmp_path):
    base = ["--prompt", "a red seven", "--sampler", "ddim", "--num-steps", "3", "--per-label", "2"]
    assert main(args(text_run, tmp_path / "a", *base)) == 0
    assert main(args(text_run, tmp_path / "b", *base)) == 0
    assert main(args(text_run, tmp_path / "c", *base, "--negative-prompt", "a blue cube")) == 0
    a, b, c = (np.asarray(Image.open(tmp_path / k / "grid.png")) for k in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_prompt_file_with_num_samples_writes_an_npz(text_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red seven\n\na blue cube\n")
    out = tmp_path / "eval"
    assert main(args(text_run, out, "--prompt-file", str(prompts), "--num-samples", "5", "--sampler", "ddim",
                     "--num-steps", "3", "--batch-size", "2")) == 0
    data = np.load(out / "samples_5.npz")
    assert data["arr_0"].shape == (5, 8, 8, 3) and data["arr_0"].dtype == np.uint8
    assert data["prompt_index"].tolist() == [0, 1, 0, 1, 0]
    protocol = json.loads((out / "settings.json").read_text())["protocol"]  # recorded as for class models
    assert protocol["num_samples"] == 5 and protocol["labels"].startswith("prompt i mod 2")


def test_bad_prompt_input_is_one_line(text_run, tmp_path, capsys):
    assert main(args(text_run, tmp_path / "x")) == 2
    assert "--prompt" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(args(text_run, tmp_path / "y", "--prompt-file", str(empty))) == 2
    assert "holds no prompt" in capsys.readouterr().err
    cmd = ["sample", "--ckpt", str(text_run / "text.safetensors"), "--out", str(tmp_path / "z"), "--prompt", "a"]
    assert main(cmd) == 2
    assert "--text-encoder" in capsys.readouterr().err  # a 16-feature model has no default encoder
