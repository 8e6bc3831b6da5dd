"""The modern recipe's training and sampling knobs: logit-normal t (mean, std), the velocity-direction loss, the
sampling defaults a recipe records, the flags, SIGKILL-resume with every knob on and one-line refusals."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys

import pytest
import torch

import ditkit
from ditkit.models import DiTConfig
from ditkit.recipe import FlowProcess, LatentSpace, Recipe, SamplingDefaults
from ditkit.train import train
from ditkit.transport import create_transport
from helpers.processes import ENV
from helpers.processes import train_script as _train_script
from helpers.processes import wait_for as _wait_for
from helpers.training import options

pytestmark = pytest.mark.usefixtures("one_thread")

KNOBS = dict(norm="rmsnorm", qk_norm="rmsnorm", rope=True, mlp="swiglu")
FLOW = dict(objective="flow", t_sampling="lognormal", t_mean=-0.3, t_std=1.4, loss_cosine_weight=0.5,
            sample_time_shift=2.5, sample_guidance_interval=(0.2, 1.0))


def test_logit_normal_times_follow_the_normal_quantiles():
    """t = sigmoid(mean + std·z) with z the normal quantile of the uniform draw (stdlib NormalDist as reference)."""
    transport = create_transport(t_sampling="lognormal", t_mean=-0.3, t_std=1.4)
    u = torch.tensor([0.01, 0.2, 0.5, 0.77, 0.999], dtype=torch.float64)
    ref = [1 / (1 + math.exp(-(-0.3 + 1.4 * statistics.NormalDist().inv_cdf(float(p))))) for p in u]
    assert torch.allclose(transport.times_from_uniform(u), torch.tensor(ref, dtype=torch.float64), atol=1e-12)


def test_the_cosine_term_matches_the_float64_formula():
    torch.manual_seed(0)
    transport = create_transport(cosine_weight=0.7)
    x1, x0, t = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5), torch.rand(3)
    weight = torch.randn(4, 4)
    model = lambda x, t: torch.einsum("oc,nchw->nohw", weight.to(x.dtype), x) + 0.1  # noqa: E731  a velocity model
    terms = transport.training_losses(model, x1, t=t, x0=x0)
    xt = t.view(-1, 1, 1, 1).double() * x1.double() + (1 - t.view(-1, 1, 1, 1).double()) * x0.double()
    v, u = model(xt, t).double(), x1.double() - x0.double()
    cos = (v * u).sum(1) / (v.norm(dim=1) * u.norm(dim=1))  # over the channels, at each position
    ref = ((v - u) ** 2).mean((1, 2, 3)) + 0.7 * (1 - cos).mean((1, 2))
    assert torch.allclose(terms["loss"].double(), ref, rtol=1e-5)
    assert torch.allclose(terms["mse"].double(), ((v - u) ** 2).mean((1, 2, 3)), rtol=1e-5)


def test_a_recipe_with_every_knob_round_trips_and_a_version_1_recipe_reads_with_the_defaults():
    model = DiTConfig.from_name("DiT-S/2", input_size=8, num_classes=10, **KNOBS)
    recipe = Recipe(model=model, process=FlowProcess(t_sampling="lognormal", t_mean=0.2, t_std=0.8, cosine_weight=1.0),
                    latents=LatentSpace(vae="vae", scale=0.5, downsample=8, mean=(0.1, -0.2, 0.0, 1.0),
                                        std=(1.0, 2.0, 0.5, 1.5)),
                    sampling=SamplingDefaults(time_shift=1 / 0.3, guidance_interval=(0.11, 1.0)))
    assert Recipe.from_json(recipe.to_json()) == recipe
    assert json.loads(recipe.to_json())["version"] == 2
    # A recipe that uses none of the new fields is written as before (version 1, no new keys): older ditkits
    # read it, and it reads back with every new field at its default.
    old = json.loads(Recipe(model=DiTConfig.from_name("DiT-S/2"), process=FlowProcess()).to_json())
    assert old["version"] == 1 and "sampling" not in old and not {"t_mean", "t_std", "cosine_weight"} & set(
        old["process"]) and not {"mean", "std"} & set(old["latents"]) and not set(KNOBS) & set(old["model"])
    read = Recipe.from_dict(old)
    assert read.sampling == SamplingDefaults() and (read.process.t_mean, read.process.t_std) == (0.0, 1.0)
    assert read.latents.mean is None and not read.model.knobs


@pytest.mark.parametrize("bad, match", [
    (dict(process=FlowProcess(t_mean=1.0)), "lognormal only"),
    (dict(process=FlowProcess(t_sampling="lognormal", t_std=0.0)), "t_std"),
    (dict(process=FlowProcess(prediction="noise", cosine_weight=1.0)), "needs prediction velocity"),
    (dict(latents=LatentSpace(mean=(0.0,), std=None)), "go together"),
    (dict(latents=LatentSpace(mean=(0.0,), std=(-1.0,))), "std"),
    (dict(sampling=SamplingDefaults(guidance_interval=(0.5, 0.1))), "lo <= hi"),
])
def test_bad_recipe_values_get_one_line(bad, match):
    with pytest.raises(ditkit.runtime.errors.UserError, match=match) as err:
        Recipe(model=DiTConfig.from_name("DiT-S/2"), **bad)
    assert "\n" not in str(err.value)


def test_train_flags_and_the_preset_set_the_model_switches():
    from ditkit.train import TrainOptions
    from ditkit.train.options import add_arguments, model_knobs, options_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parse = lambda *a: TrainOptions(**options_from_args(parser.parse_args(["--data-path", "digits", *a])))  # noqa: E731
    assert model_knobs(parse("--norm", "rmsnorm", "--qk-norm", "--rope", "--mlp", "swiglu")) == KNOBS
    assert model_knobs(parse("--preset-model", "lightningdit")) == dict(norm="rmsnorm", rope=True, mlp="swiglu")
    assert model_knobs(parse("--preset-model", "lightningdit", "--qk-norm", "layernorm"))["qk_norm"] == "layernorm"
    assert model_knobs(parse()) == {}


@pytest.fixture(scope="module")
def knob_run(tmp_path_factory):
    return train(options(tmp_path_factory.mktemp("knobs"), max_steps=2, ckpt_every=2, **KNOBS, **FLOW))


def test_training_with_every_knob_records_them_and_sampling_uses_the_recorded_defaults(knob_run, tmp_path):
    from ditkit.sample.pipeline import load_for_sampling
    from helpers.cli import parse

    ckpt = knob_run.results_dir / "checkpoints" / "0000002"
    recipe = ditkit.load_model_with_recipe(ckpt)[1]
    assert recipe.model.knobs == KNOBS
    p = recipe.process
    assert (p.t_sampling, p.t_mean, p.t_std, p.cosine_weight) == ("lognormal", -0.3, 1.4, 0.5)
    assert recipe.sampling == SamplingDefaults(time_shift=2.5, guidance_interval=(0.2, 1.0))
    cpu = torch.device("cpu")
    by_recipe = load_for_sampling(parse(ckpt, "--class-labels", "1"), cpu)
    assert (by_recipe.time_shift, by_recipe.interval) == (2.5, (0.2, 1.0))
    flagged = load_for_sampling(parse(ckpt, "--class-labels", "1", "--time-shift", "1", "--guidance-interval",
                                      "0", "1"), cpu)
    assert (flagged.time_shift, flagged.interval) == (1.0, (0.0, 1.0))  # a flag wins over the recorded default


@pytest.mark.parametrize("change", [dict(rope=False), dict(mlp="gelu"), dict(t_std=1.0), dict(loss_cosine_weight=0.0),
                                    dict(sample_time_shift=1.0)])
def test_resuming_with_another_knob_setting_is_refused_with_one_line(knob_run, change, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(knob_run.results_dir, run)
    settings = {**KNOBS, **FLOW, **change}
    with pytest.raises(ditkit.runtime.errors.UserError) as err:
        train(options(tmp_path, max_steps=3, ckpt_every=1, resume="auto", results_dir=str(run), **settings))
    assert "\n" not in str(err.value) and ("another config" in str(err.value) or "trained with" in str(err.value))


@pytest.mark.slow
def test_sigkill_then_resume_with_every_knob_matches_the_uninterrupted_run(tmp_path):
    """Killed after its step-2 checkpoint (in a process of its own), resumed and run uninterrupted in this one
    (one thread both ways: the same arithmetic), the final weights are equal bit for bit."""
    from safetensors.torch import load_file

    settings = dict(max_steps=12, ckpt_every=2, resume="auto", **KNOBS, **FLOW)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _train_script(**settings), str(killed)], env=ENV,
                            stderr=subprocess.DEVNULL)
    _wait_for(killed / "checkpoints" / "0000002", proc)
    proc.kill()
    assert proc.wait() == -9 and not (killed / "checkpoints" / "0000012").exists(), "it finished before the kill"
    for run in (killed, tmp_path / "clean"):
        train(options(tmp_path, results_dir=str(run), **settings))
    for name in ("ema.safetensors", "model.safetensors"):
        a, b = (load_file(str(r / "checkpoints" / "0000012" / name)) for r in (killed, tmp_path / "clean"))
        assert a.keys() == b.keys() and "feat_rope.freqs_cos" in a
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_latent_norm_uses_the_stores_channel_statistics_and_sampling_undoes_them(tmp_path):
    """--latent-norm: items are ((z − shift)·scale − mean_c)/std_c with the manifest's statistics (float64 check),
    the recipe records them, and the sampler maps the model's output back before the VAE decodes it."""
    from ditkit.data.extract import extract
    from ditkit.data.store import LatentStore
    from ditkit.encoders.autoencoder import load_vae
    from ditkit.sample.pipeline import load_for_sampling
    from helpers.cli import parse
    from helpers.images import make_image_folder
    from helpers.vae import make_tiny_vae

    folder, vae_dir = make_image_folder(tmp_path / "images", corrupt=False), make_tiny_vae(tmp_path / "vae")
    extract(folder, tmp_path / "latents", load_vae(str(vae_dir)), image_size=16, batch_size=4, shard_size=8,
            dtype="float32", workers=0, progress=False)
    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    run = train(options(tmp_path, data_path=str(tmp_path / "latents"), image_size=None, global_batch_size=4,
                        max_steps=1, ckpt_every=1, latent_norm=True, model_overrides=dict(depth=1, hidden_size=32,
                                                                                          num_heads=2)))
    recipe = ditkit.load_model_with_recipe(run.results_dir / "checkpoints" / "0000001")[1]
    assert recipe.latents.mean == tuple(manifest["channel_mean"])
    assert recipe.latents.std == tuple(manifest["channel_std"])
    plain = LatentStore(tmp_path / "latents", resample=False, random_flip=False)
    normed = LatentStore(tmp_path / "latents", resample=False, random_flip=False)
    normed.channel_norm = recipe.latents
    m, s = (torch.tensor(manifest[k], dtype=torch.float64).view(-1, 1, 1) for k in ("channel_mean", "channel_std"))
    assert torch.allclose(normed[0][0].double(), (plain[0][0].double() - m) / s, atol=1e-6)
    x = torch.randn(2, *plain[0][0].shape, dtype=torch.float64)
    assert torch.allclose(recipe.latents.denormalize(recipe.latents.normalize(x)), x, atol=1e-12)
    sampler = load_for_sampling(parse(run.results_dir / "checkpoints" / "0000001", "--class-labels", "0"),
                                torch.device("cpu"))
    assert sampler.recipe.latents.mean == recipe.latents.mean  # kept when the VAE is loaded for decoding
    with pytest.raises(ditkit.runtime.errors.UserError, match="needs a latent store"):
        train(options(tmp_path / "digits", max_steps=1, latent_norm=True))
