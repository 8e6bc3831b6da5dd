"""Flow matching through ditkit's training loop and `ditkit sample`: recipe, resume after SIGKILL, samplers chosen
from the checkpoint alone, one-line errors for mismatches, SiT's released-file layout."""

from __future__ import annotations

import json

import pytest
import torch

import ditkit
from ditkit.cli import main
from ditkit.train import train, validate
from helpers.processes import assert_sigkill_resume_matches_uninterrupted
from helpers.processes import train_script as _train_script
from helpers.training import options, read_losses

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flow")
    return train(options(tmp, max_steps=4, ckpt_every=4, objective="flow", t_sampling="lognormal"))


def test_flow_training_records_its_recipe_and_logs_the_loss(flow_run):
    from safetensors import safe_open

    losses = read_losses(flow_run.results_dir)
    assert sorted(losses) == [1, 2, 3, 4] and all(v == v and v < 10 for v in losses.values())
    with safe_open(str(flow_run.results_dir / "checkpoints" / "0000004" / "ema.safetensors"), "pt") as f:
        process = json.loads(f.metadata()["recipe"])["process"]
    assert process["kind"] == "flow" and process["path_type"] == "Linear" and process["t_sampling"] == "lognormal"


def test_flow_sigkill_then_resume_auto_matches_uninterrupted_run(tmp_path):
    script = _train_script(max_steps=16, ckpt_every=2, resume="auto", objective="flow", path_type="GVP",
                           prediction="noise", loss_weight="likelihood")
    assert_sigkill_resume_matches_uninterrupted(tmp_path, script, 16)


def test_resuming_a_flow_run_as_diffusion_is_refused(tmp_path):
    train(options(tmp_path, max_steps=1, ckpt_every=1, objective="flow"))
    with pytest.raises(ditkit.runtime.errors.UserError, match="process") as err:
        train(options(tmp_path, max_steps=2, ckpt_every=1, resume="auto"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(objective="flow", prediction="epsilon"), "prediction"),
    (dict(objective="diffusion", prediction="velocity"), "prediction"),
    (dict(objective="flow", prediction="noise", train_eps=0.0), "train_eps"),
    (dict(objective="diffusion", path_type="GVP"), "--path-type"),
])
def test_bad_flow_training_flags_get_one_line(tmp_path, kwargs, match):
    with pytest.raises(ditkit.runtime.errors.UserError, match=match) as err:
        validate(options(tmp_path, **kwargs), 1)
    assert "\n" not in str(err.value)


def run_sample(capsys, *argv: str) -> tuple[int, str]:
    code = main(["sample", *argv, "--no-progress"])
    return code, capsys.readouterr().err


def test_sample_picks_a_flow_sampler_from_the_checkpoint_and_refuses_diffusion_ones(flow_run, tmp_path, capsys):
    ckpt = str(flow_run.results_dir / "checkpoints" / "0000004")
    code, _ = run_sample(capsys, "--ckpt", ckpt, "--class-labels", "1", "2", "--out", str(tmp_path / "a"),
                         "--sampler", "heun", "--num-steps", "3", "--cfg-scale", "2", "--time-shift", "2")
    assert code == 0 and (tmp_path / "a" / "grid.png").stat().st_size > 0
    code, err = run_sample(capsys, "--ckpt", ckpt, "--class-labels", "1", "--out", str(tmp_path / "b"),
                           "--sampler", "ddpm")
    assert code == 2 and "does not apply to a flow model" in err and err.strip().count("\n") == 0


def test_a_diffusion_checkpoint_refuses_flow_samplers_and_the_time_shift(tmp_path, capsys):
    result = train(options(tmp_path, max_steps=1, ckpt_every=1))
    ckpt = str(result.results_dir / "checkpoints" / "0000001")
    code, err = run_sample(capsys, "--ckpt", ckpt, "--class-labels", "1", "--out", str(tmp_path / "a"),
                           "--sampler", "euler")
    assert code == 2 and "does not apply to a diffusion model" in err
    code, err = run_sample(capsys, "--ckpt", ckpt, "--class-labels", "1", "--out", str(tmp_path / "b"),
                           "--time-shift", "3")
    assert code == 2 and "--time-shift" in err


def test_a_sit_release_layout_loads_and_samples_as_flow(tmp_path, capsys):
    """SiT's released files are bare EMA state dicts with DiT's keys; a file named SiT-* is read as flow/velocity."""
    from ditkit.sample.pipeline import load_for_sampling
    from helpers.cli import parse
    from helpers.models import sampling_dit as tiny_model

    model = tiny_model()
    path = tmp_path / "SiT-S-2-8px.pt"
    torch.save(model.state_dict(), path)
    loaded = ditkit.load_model(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    sampler = load_for_sampling(parse(path, "--class-labels", "1"), torch.device("cpu"))
    assert sampler.recipe.process.kind == "flow" and sampler.recipe.process.prediction == "velocity"
    assert sampler.sampler == "dopri5"  # SiT's sample.py default
    renamed = tmp_path / "model.pt"
    torch.save(model.state_dict(), renamed)
    assert load_for_sampling(parse(renamed, "--class-labels", "1"), torch.device("cpu")).recipe.process.kind == (
        "diffusion")
    flow = load_for_sampling(parse(renamed, "--class-labels", "1", "--objective", "flow"), torch.device("cpu"))
    assert flow.recipe.process.kind == "flow"
    code, _ = run_sample(capsys, "--ckpt", str(path), "--class-labels", "3", "--sampler", "euler", "--num-steps", "4",
                         "--out", str(tmp_path / "grid"))
    assert code == 0

