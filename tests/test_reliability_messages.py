"""Messages that named the wrong problem or refused valid work (issue 17, items 13 and 14; the one-line cases
of items 11-15 are rows of the table in test_bad_input.py).

- Resume compares the data by its resolved path: `imgs`, `./imgs/` and an absolute path are one data set; data
  that really changed (an image added) is refused naming both choices.
- `ditkit sample` takes the VAE's own downsampling factor: a model trained through a factor-2 VAE samples at
  its own image size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from ditkit.cli import main
from helpers.images import smooth_image
from helpers.models import TINY
from helpers.vae import make_tiny_vae


def _images(root: Path, count: int = 4) -> Path:
    for i in range(count):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth_image(20, 18, seed=i)).save(root / f"c{i % 2}" / f"{i}.png")
    return root


def _train(data_path: str, results: Path, **kw):
    from ditkit.train import TrainOptions, train

    settings = dict(model="DiT-S/2", image_size=8, global_batch_size=2, log_every=1, num_workers=0, progress=False,
                    model_overrides=TINY, results_dir=str(results), max_steps=1, ckpt_every=1)
    return train(TrainOptions(data_path=data_path, **{**settings, **kw}))


def test_resume_accepts_the_same_data_typed_differently_and_names_the_choice_when_it_changed(
        tmp_path, monkeypatch, capsys, one_thread):
    from ditkit.runtime.errors import UserError

    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "imgs")
    run = tmp_path / "run"
    _train("imgs", run)
    for step, spelling in enumerate(["./imgs/", str(tmp_path / "imgs"), "imgs"], start=2):
        capsys.readouterr()
        assert _train(spelling, run, max_steps=step, resume="auto").step == step, spelling
        assert f"at step {step - 1}" in capsys.readouterr().err
    Image.fromarray(smooth_image(20, 18, seed=9)).save(tmp_path / "imgs" / "c0" / "new.png")
    with pytest.raises(UserError) as caught:
        _train("imgs", run, max_steps=5, resume="auto")
    message = str(caught.value)
    assert "holds a run on other data" in message and "4 images" in message and "5 images" in message
    assert "start a new run with another --results-dir, or resume with the data as it was" in message


def test_a_model_trained_through_a_factor_2_vae_samples_at_its_own_size(tmp_path, capsys, one_thread):
    """A VAE with two down blocks halves the side once: 16-pixel images are 8×8 latents. `sample` used to
    assume the SD-VAE's factor 8 and refused --image-size 16 for this model."""
    pytest.importorskip("diffusers")
    vae = make_tiny_vae(tmp_path / "vae2", down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8))
    result = _train(str(_images(tmp_path / "imgs")), tmp_path / "run", image_size=16, vae=str(vae))
    assert result.model.config.input_size == 8 and result.model.config.in_channels == 4
    ckpt = tmp_path / "run" / "checkpoints" / "0000001"
    argv = ["sample", "--ckpt", str(ckpt), "--vae", str(vae), "--image-size", "16", "--num-steps", "2",
            "--sampler", "ddim", "--device", "cpu", "--no-progress", "--class-labels", "0", "1", "--out"]
    capsys.readouterr()
    assert main(argv + [str(tmp_path / "grid")]) == 0, capsys.readouterr().err
    assert main(argv[:-1] + ["--num-samples", "2", "--batch-size", "2", "--out", str(tmp_path / "npz")]) == 0
    import numpy as np

    (npz,) = (tmp_path / "npz").glob("samples_*.npz")
    with np.load(npz) as f:
        assert f["arr_0"].shape == (2, 16, 16, 3)
