"""The recipe travels: latent store manifest → training run → checkpoint → in-training grids and `ditkit sample`.

Issue 14's defects 1 (a store's VAE reaches the in-training sampler) and 2 (the noise schedule is a flag, is
stored, and sampling reads it from the checkpoint alone); both tests fail on the code before the recipe.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from ditkit.cli import main
from ditkit.recipe import METADATA_KEY, Recipe
from helpers.images import make_image_folder
from helpers.models import TINY
from helpers.vae import make_tiny_vae

SIZE = 32  # pixels; the tiny VAE downsamples 8x -> 4x4 latents


@pytest.fixture
def tiny_cli(monkeypatch):
    """The CLI's own entry point with a tiny model (its --model takes only the paper's names)."""
    import ditkit.train

    real = ditkit.train.TrainOptions
    monkeypatch.setattr(ditkit.train, "TrainOptions", lambda **kw: real(**kw, model_overrides=TINY))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from ditkit.data.extract import extract
    from ditkit.encoders.autoencoder import load_vae

    root = tmp_path_factory.mktemp("store")
    folder = make_image_folder(root / "images", corrupt=False)
    vae_dir = make_tiny_vae(root / "vae")
    extract(folder, root / "latents", load_vae(str(vae_dir)), image_size=SIZE, batch_size=4, shard_size=8,
            dtype="float32", workers=0, progress=False)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    return {"store": root / "latents", "vae": vae_dir, "classes": classes}


def _stored_recipe(path) -> Recipe:
    from ditkit.runtime.io import read_safetensors

    return Recipe.from_json(read_safetensors(path)[1][METADATA_KEY])


def test_the_store_manifest_carries_its_latent_space_and_label_map(store):
    manifest = json.loads((store["store"] / "manifest.json").read_text())
    part = manifest["recipe"]
    assert part["latents"] == {"vae": str(store["vae"]), "scale": manifest["scale"], "shift": 0.0, "downsample": 8}
    assert part["conditioning"]["classes"] == store["classes"] == manifest["classes"]


def test_train_cli_on_a_latent_store_writes_its_sample_grid(store, tmp_path, tiny_cli):
    """Defect 1: the README's command with --sample-every crashed at the first grid (the VAE came from --vae
    only). Now the grid is decoded by the store's own VAE, and the checkpoint records it."""
    run = tmp_path / "run"
    code = main(["train", "--data-path", str(store["store"]), "--model", "DiT-S/2", "--global-batch-size", "4",
                 "--max-steps", "2", "--sample-every", "2", "--log-every", "1", "--ckpt-every", "1000",
                 "--num-workers", "0", "--no-progress", "--results-dir", str(run)])
    assert code == 0
    grid = run / "samples" / "0000002" / "grid.png"
    assert grid.stat().st_size > 0
    from PIL import Image

    assert Image.open(grid).size[1] > 3 * SIZE  # 3 class rows of decoded SIZE-pixel images (enlarged)
    recipe = _stored_recipe(run / "checkpoints" / "0000002" / "ema.safetensors")
    assert recipe.latents.vae == str(store["vae"]) and recipe.latents.downsample == 8
    assert recipe.conditioning.classes == tuple(store["classes"]) and recipe.image_size == SIZE

    # ... and `ditkit sample` needs no --vae: the checkpoint's recipe names it.
    out = tmp_path / "samples"
    code = main(["sample", "--ckpt", str(run / "checkpoints" / "0000002"), "--num-steps", "2", "--per-label", "1",
                 "--class-labels", "0", "1", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert code == 0 and (out / "grid.png").stat().st_size > 0


def _sample_args(ckpt, **kw) -> argparse.Namespace:
    from ditkit.sample import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--ckpt", str(ckpt), "--device", "cpu", "--no-progress"])
    for key, value in kw.items():
        setattr(args, key, value)
    return args


@pytest.mark.parametrize("schedule", ["cosine"])
def test_a_cosine_run_samples_with_cosine_betas_from_the_checkpoint_alone(tmp_path, schedule, tiny_cli):
    """Defect 2: --noise-schedule is a flag, stored in the checkpoint's recipe, and `ditkit sample` (and the
    in-training grids, which build the same Sampler from the run's recipe) sample with those betas."""
    from ditkit.diffusion import samplers
    from ditkit.sample import load_for_sampling

    run = tmp_path / "run"
    code = main(["train", "--data-path", "digits", "--model", "DiT-S/8", "--image-size", "8",
                 "--global-batch-size", "16", "--max-steps", "1", "--ckpt-every", "1000", "--num-workers", "0",
                 "--no-progress", "--noise-schedule", schedule, "--results-dir", str(run)])
    assert code == 0
    ckpt = run / "checkpoints" / "0000001"
    assert _stored_recipe(ckpt / "model.safetensors").process.noise_schedule == schedule
    args = _sample_args(ckpt, sampler="ddim", num_steps=5, cfg_scale=1.0)
    before = vars(args).copy()
    import ditkit.weights.checkpoints as ck

    reads = []
    real_read = ck.read_safetensors
    ck.read_safetensors = lambda path: reads.append(path) or real_read(path)
    try:
        sampler = load_for_sampling(args, torch.device("cpu"))
    finally:
        ck.read_safetensors = real_read
    assert vars(args) == before  # load_for_sampling does not write into the arguments (defect 3)
    assert len(reads) == 1  # ... and reads the checkpoint once
    assert sampler.recipe.process.noise_schedule == schedule

    labels = torch.tensor([0, 1, 2])
    got = sampler.images(labels, torch.Generator().manual_seed(0)).numpy()

    def reference(noise_schedule: str) -> np.ndarray:
        g = torch.Generator().manual_seed(0)
        noise = torch.randn((3, 1, 8, 8), generator=g)
        x = samplers.sample(sampler.model, noise, sampler="ddim", num_steps=5, model_kwargs={"y": labels},
                            clip_denoised=True, generator=g, noise_schedule=noise_schedule)
        return torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()

    assert np.array_equal(got, reference(schedule))
    assert not np.array_equal(got, reference("linear"))  # the schedule matters for this model: the test can fail


def test_resuming_with_another_noise_schedule_is_refused(tmp_path, tiny_cli):
    flags = ["train", "--data-path", "digits", "--model", "DiT-S/8", "--image-size", "8", "--global-batch-size",
             "16", "--ckpt-every", "1000", "--num-workers", "0", "--no-progress", "--results-dir", str(tmp_path)]
    assert main([*flags, "--max-steps", "1", "--noise-schedule", "cosine"]) == 0
    assert main([*flags, "--max-steps", "2", "--resume", "auto"]) == 2  # linear now: one line, exit 2


def test_old_files_load_with_an_inferred_recipe(tmp_path):
    """Official .pt (bare EMA state_dict), train.py dicts (their args name the VAE) and ditkit files written
    before recipes existed load with the recipe the authors' code implies; a stored recipe reads back as is."""
    import argparse as ap

    from safetensors.torch import save_file

    import ditkit
    from ditkit.recipe import DiffusionProcess, LatentSpace
    from ditkit.weights.checkpoints import CONFIG_KEY

    model = ditkit.create_model("DiT-S/8", input_size=8, num_classes=10)  # 4 channels: SD-VAE latents
    torch.save(model.state_dict(), tmp_path / "official.pt")
    _, recipe = ditkit.load_model_with_recipe(tmp_path / "official.pt")
    assert recipe.process == DiffusionProcess() and recipe.latents == LatentSpace.sd_vae()
    args = ap.Namespace(image_size=64, num_classes=10, vae="mse", model="DiT-S/8")
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "args": args}, tmp_path / "t.pt")
    _, recipe = ditkit.load_model_with_recipe(tmp_path / "t.pt")
    assert recipe.latents.vae == "stabilityai/sd-vae-ft-mse" and recipe.image_size == 64
    pixels = ditkit.create_model("DiT-S/8", input_size=8, in_channels=1, num_classes=10)
    tensors = {k: v.contiguous() for k, v in pixels.state_dict().items()}
    save_file(tensors, tmp_path / "old.safetensors", metadata={CONFIG_KEY: json.dumps(pixels.config.to_dict())})
    _, recipe = ditkit.load_model_with_recipe(tmp_path / "old.safetensors")
    assert recipe.latents.is_pixels and recipe.model == pixels.config
    cosine = recipe.replace(process=DiffusionProcess(noise_schedule="cosine"))
    ditkit.save_model(pixels, tmp_path / "new.safetensors", recipe=cosine)
    loaded, back = ditkit.load_model_with_recipe(tmp_path / "new.safetensors")
    assert back == cosine and ditkit.load_model(tmp_path / "new.safetensors").config == loaded.config


def test_diffusion_tables_are_moved_once_per_device():
    """Issue 13's cache miss: np.log(betas) was a new array per call, so an id()-keyed cache grew every step."""
    from ditkit.diffusion import create_diffusion

    diffusion = create_diffusion("")  # learned variance: the path that looked up log β every call
    model = lambda x, t, **_: torch.cat([torch.zeros_like(x), torch.zeros_like(x)], dim=1)  # noqa: E731
    x, t = torch.zeros(2, 1, 4, 4), torch.tensor([0, 500])
    diffusion.training_losses(model, x, t)
    tables = dict(diffusion._device_tables)
    for _ in range(3):
        diffusion.training_losses(model, x, t)
        diffusion.p_mean_variance(model, x, t)
    assert diffusion._device_tables.keys() == tables.keys()
    assert all(diffusion._device_tables[k] is v for k, v in tables.items())  # the same tensors, not new copies
    assert torch.equal(diffusion.table("log_betas", torch.device("cpu")), torch.from_numpy(np.log(diffusion.betas)))


def test_train_flags_default_to_the_options_fields():
    """Defect 3: each default is written once (the TrainOptions field); the flags read it from there."""
    import dataclasses

    from ditkit.train import TrainOptions, add_arguments
    from ditkit.train.options import options_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--data-path", "digits"])
    opts = TrainOptions(**options_from_args(args))
    assert opts == TrainOptions(data_path="digits")
    flagged = {a.dest for a in parser._actions} & {f.name for f in dataclasses.fields(TrainOptions)}
    assert {"lr", "noise_schedule", "global_batch_size", "exif_transpose"} <= flagged
    args = parser.parse_args(["--data-path", "digits", "--lr", "3e-4", "--noise-schedule", "cosine"])
    assert TrainOptions(**options_from_args(args)).lr == 3e-4  # a flag's value reaches its field
